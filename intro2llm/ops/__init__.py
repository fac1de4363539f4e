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
from intro2llm.ops.rms_norm import rms_norm, rms_norm_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "use_backend",
    "rms_norm",
    "rms_norm_reference",
]

# Ops still being written by other issues are added here as their modules land (see DESIGN.md's op list).
import importlib as _importlib

for _module, _names in (
    ("layer_norm", ("layer_norm", "layer_norm_reference")),
    ("rope", ("apply_rope", "apply_rope_reference")),
    ("swiglu", ("swiglu", "swiglu_reference", "geglu", "geglu_reference")),
    ("cross_entropy", ("cross_entropy", "cross_entropy_reference")),
    ("fused_linear_cross_entropy", ("fused_linear_cross_entropy", "fused_linear_cross_entropy_reference")),
    ("flash_attention", ("flash_attention", "flash_attention_reference", "flash_attention_tiled_reference")),
):
    try:
        _mod = _importlib.import_module(f"intro2llm.ops.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"intro2llm.ops.{_module}":
            raise
        continue
    for _name in _names:
        if hasattr(_mod, _name):
            globals()[_name] = getattr(_mod, _name)
            __all__.append(_name)
