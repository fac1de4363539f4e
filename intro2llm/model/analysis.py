"""Back-of-the-envelope arithmetic for a ``ModelConfig``: parameters by component, FLOPs per token, memory.

- ``count_parameters(config)``: exact; equals ``sum(p.numel() for p in CausalLM(config).parameters())``.
- ``estimate_flops(config, seq_len)``: matrix-multiply FLOPs (2 per multiply-add) of one forward pass, per token
  and per sequence; training ≈ 3× forward (backward = 2 matmuls per forward matmul; Kaplan et al., 2020,
  "6N" rule). Attention scores/values add ``4·T·H·D`` per token and layer when computed densely (what the
  reference kernel and ``FlopCounterMode`` count); ``causal=True`` halves that term (what a flash kernel that
  skips masked tiles does). Element-wise work (norms, RoPE, softmax, activations) is left out: < 1%.
- ``estimate_memory(config, batch, seq_len, dtype, optimizer)``: weights, gradients, optimizer state (exact
  given the dtypes), KV cache (exact: equals ``StaticKVCache.memory_bytes``), training activations (estimate:
  the tensors a layer saves for backward with flash attention and no recomputation, Korthikanti et al., 2022).

Not handled: tensor/pipeline parallel sharding, activation checkpointing, allocator fragmentation.
"""

from __future__ import annotations

from typing import Any

from intro2llm.course import lesson_task
from intro2llm.model.config import ModelConfig

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8,
                "int8": 1}
_OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adam": 8, "lion": 4, "sgd": 0, "sgd_momentum": 4, "none": 0}


def _dtype_bytes(dtype: Any) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@lesson_task(5)
def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters by component: embedding, attention, ffn, norms, lm_head (0 when tied), total."""
    C, L, V, F = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    attn = C * q + 2 * C * kv + q * C  # q, k, v, o projections
    if config.attention_bias:
        attn += q + 2 * kv
    if config.attention_output_bias:
        attn += C
    n_mats = 3 if config.ffn_type in ("swiglu", "geglu") else 2
    ffn = n_mats * C * F
    if config.mlp_bias:
        ffn += (n_mats - 1) * F + C
    norm = C if config.use_rms_norm else 2 * C  # LayerNorm has a bias
    out = {
        "embedding": V * C,
        "attention": L * attn,
        "ffn": L * ffn,
        "norms": (2 * L + 1) * norm,
        "lm_head": 0 if config.tie_word_embeddings else V * C,
    }
    out["total"] = sum(out.values())
    return out


@lesson_task(5)
def estimate_flops(config: ModelConfig, seq_len: int, causal: bool = False) -> dict[str, float]:
    """Forward/training FLOPs for one sequence of ``seq_len`` tokens (and per token)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    C, L, V, F = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    n_mats = 3 if config.ffn_type in ("swiglu", "geglu") else 2
    proj = 2 * (C * q + 2 * C * kv + q * C)  # per token per layer
    ffn = 2 * n_mats * C * F
    attn = 4 * seq_len * q * (0.5 if causal else 1.0)  # QKᵀ and PV, per token per layer (averaged over T)
    head = 2 * C * V
    fwd_tok = L * (proj + ffn + attn) + head
    return {
        "params_matmul_per_token": float(L * (proj + ffn) + head),
        "attention_per_token": float(L * attn),
        "forward_per_token": float(fwd_tok),
        "forward_per_sequence": float(fwd_tok * seq_len),
        "training_per_token": float(3 * fwd_tok),
        "training_per_sequence": float(3 * fwd_tok * seq_len),
    }


@lesson_task(15)
def kv_cache_bytes(config: ModelConfig, batch: int, seq_len: int, dtype: Any = "bfloat16") -> int:
    """Exact size of a static KV cache: 2 (k, v) · layers · batch · seq_len · kv_heads · head_dim · bytes."""
    return (2 * config.num_hidden_layers * batch * seq_len * config.num_key_value_heads * config.head_dim
            * _dtype_bytes(dtype))


@lesson_task(5)
def estimate_memory(config: ModelConfig, batch: int, seq_len: int, dtype: Any = "bfloat16",
                    optimizer: str = "adamw") -> dict[str, int]:
    """Bytes of weights, grads, optimizer state, KV cache (inference) and activations (training)."""
    if optimizer not in _OPTIMIZER_BYTES_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(_OPTIMIZER_BYTES_PER_PARAM)}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    b = _dtype_bytes(dtype)
    P = count_parameters(config)["total"]
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    n_gate = 3 if config.ffn_type in ("swiglu", "geglu") else 1
    # saved for backward per layer: 2 norm inputs + 2 norm outputs + residual, q/k/v, attention output (+ its
    # logsumexp, negligible), o_proj input, FFN: gate/up (+ product) or hidden (+ activation)
    per_layer = batch * seq_len * (5 * C + 2 * q + 2 * kv + n_gate * F) * b
    logits = batch * seq_len * V * (b + 4)  # logits + their fp32 softmax for the loss
    out = {
        "weights": P * b,
        "gradients": P * b,
        "optimizer": P * _OPTIMIZER_BYTES_PER_PARAM[optimizer] + (P * 4 if b < 4 and optimizer != "none" else 0),
        "kv_cache": kv_cache_bytes(config, batch, seq_len, dtype),
        "activations": config.num_hidden_layers * per_layer + logits,
    }
    out["training_total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    out["inference_total"] = out["weights"] + out["kv_cache"]
    return out


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {suffix}"
        n /= 1024
    return f"{n:.3g} PiB"


def format_report(config: ModelConfig, seq_len: int = 1024, batch: int = 1, dtype: str = "bfloat16",
                  optimizer: str = "adamw") -> str:
    """The ``intro2llm model-info`` table: shape, parameters, FLOPs, memory."""
    params = count_parameters(config)
    flops = estimate_flops(config, seq_len)
    mem = estimate_memory(config, batch, seq_len, dtype, optimizer)
    lines = [
        f"layers={config.num_hidden_layers} hidden={config.hidden_size} heads={config.num_attention_heads} "
        f"kv_heads={config.num_key_value_heads} head_dim={config.head_dim} ffn={config.ffn_type}"
        f"({config.intermediate_size}) vocab={config.vocab_size} max_pos={config.max_position_embeddings}",
        "",
        f"{'parameters':<28}{'count':>14}{'share':>9}",
    ]
    for k, v in params.items():
        lines.append(f"  {k:<26}{v:>14,}{100 * v / params['total']:>8.1f}%")
    lines += ["", f"FLOPs (seq_len={seq_len})"]
    for k, v in flops.items():
        lines.append(f"  {k:<26}{_human(v, 'FLOP'):>14}")
    lines += ["", f"memory (batch={batch}, seq_len={seq_len}, {dtype}, {optimizer})"]
    for k, v in mem.items():
        lines.append(f"  {k:<26}{_bytes(v):>14}")
    return "\n".join(lines)
