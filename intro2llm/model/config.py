"""``ModelConfig``: every hyper-parameter of the course's decoder-only Transformer, validated at construction.

One dataclass is passed whole to every module constructor (nanoGPT style). The defaults describe a Llama-style
model (RMSNorm, RoPE, SwiGLU, Pre-LN, GQA-capable attention); the switches (``use_rms_norm``, ``use_rope``,
``ffn_type``, ``norm_position``) turn it into the GPT-2-style model of the early lessons.

Reference for field names: Hugging Face ``LlamaConfig`` / ``Qwen2Config`` (the interop layer maps them 1:1).
Not handled: mixture-of-experts, encoder-decoder, partial rotary dimensions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

FFN_TYPES = ("swiglu", "geglu", "relu", "gelu")
NORM_POSITIONS = ("pre", "post")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass
class ModelConfig:
    """Decoder-only Transformer hyper-parameters; bad combinations raise ``ValueError`` naming the numbers."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None → num_attention_heads (MHA); 1 → MQA
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    rms_norm_eps: float = 1e-6
    use_rms_norm: bool = True  # False → LayerNorm (with bias)
    use_rope: bool = True  # False → sinusoidal absolute positions added to the embeddings
    ffn_type: str = "swiglu"  # swiglu | geglu | relu | gelu (the last two: plain 2-layer MLP)
    norm_position: str = "pre"  # pre (Pre-LN, default) | post (Post-LN, the original Transformer)
    sliding_window: int | None = None  # each token sees itself and the window-1 tokens before it
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    attention_output_bias: bool = False  # bias on o_proj (Llama attention_bias=True sets both)
    mlp_bias: bool = False
    dropout: float = 0.0  # residual/attention-output dropout (training only)
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"  # the Hugging Face architecture used by save_pretrained
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata, round-tripped

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"ModelConfig: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"ModelConfig: head_dim must be a positive int, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"ModelConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.use_rope and self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if not self.use_rope and self.hidden_size % 2 != 0:
            raise ValueError(f"ModelConfig: sinusoidal positions need an even hidden_size, got {self.hidden_size}")
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ModelConfig: ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"ModelConfig: norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            raise ValueError(f"ModelConfig: sliding_window must be None or >= 1, got {self.sliding_window!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"ModelConfig: rope_theta must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"ModelConfig: rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig: {name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ValueError(f"ModelConfig: rope_scaling must be a dict or None, got {type(rs).__name__}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"ModelConfig: rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {kind!r}")
        if not float(rs.get("factor", 0)) >= 1.0:
            raise ValueError(f"ModelConfig: rope_scaling factor must be >= 1, got {rs.get('factor')!r}")
        if kind == "llama3":
            missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                       if k not in rs]
            if missing:
                raise ValueError(f"ModelConfig: llama3 rope_scaling needs {missing}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them (typos must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
