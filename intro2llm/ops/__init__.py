"""Public functional ops of intro2llm; each has a ``<op>_reference`` and fast backends chosen per call.

Choose a backend with the ``backend=`` argument, ``with intro2llm.ops.use_backend(name):``, env
``INTRO2LLM_BACKEND``, or let auto pick (see ``intro2llm.ops._dispatch``).
"""

from intro2llm.ops._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)
from intro2llm.ops.cross_entropy import cross_entropy, cross_entropy_reference
from intro2llm.ops.flash_attention import (
    flash_attention,
    flash_attention_reference,
    flash_attention_tiled_reference,
)
from intro2llm.ops.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from intro2llm.ops.fused_linear_logprobs import fused_linear_logprobs, fused_linear_logprobs_reference
from intro2llm.ops.layer_norm import layer_norm, layer_norm_reference
from intro2llm.ops.nf4 import (
    NF4Weight,
    dequantize_tensor,
    nf4_dequantize,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_quantize,
    quantize_tensor,
)
from intro2llm.ops.rms_norm import rms_norm, rms_norm_reference
from intro2llm.ops.rope import apply_rope, apply_rope_reference
from intro2llm.ops.swiglu import geglu, geglu_reference, swiglu, swiglu_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "use_backend",
    "apply_rope",
    "apply_rope_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_tiled_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "fused_linear_logprobs",
    "fused_linear_logprobs_reference",
    "geglu",
    "geglu_reference",
    "layer_norm",
    "layer_norm_reference",
    "NF4Weight",
    "dequantize_tensor",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_reference",
    "nf4_quantize",
    "quantize_tensor",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
