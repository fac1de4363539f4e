"""Fast decoding for ``CausalLM``: one-token steps on a decode-time copy of the weights, in Python or in one C++ call.

A decode step is a chain of small matrix products bound by reading the weights (batch 1) or by the multiply-adds
(batch 8). ``DecodeWeights.from_model`` builds, once per ``generate`` call, a named bundle in the layout those
products want: q/k/v (and gate/up) concatenated so one product reads them in one pass, each matrix stored
(in, out) row-major so ``x @ W`` streams the weight rows (faster than ``F.linear``'s (out, in) for one row
with MKL; the figures are in lesson 04's README). It costs one copy of the weights while generating.

Two steps use the bundle, with the same math as the module path (``CausalLM._backbone`` on one token):

- ``python_step``: the ops (``rms_norm``, ``apply_rope``, ``flash_attention``, ``swiglu``) on the bundle,
  skipping ``nn.Module.__call__`` — any device and dtype, any backend; the readable version and the oracle.
- ``cpp_step``: ``intro2llm::decode_step`` (csrc/cpu/decode_step.cpp), every layer in one C++ call with a
  no-packing small-M GEMM — fp32 CPU with the extension built and the cpp backend chosen (``cpp_applies``).

``step_for(weights, cache)`` picks the fastest that applies. Only the plain Llama-style stack has a bundle:
any swapped or different module (LoRA, 4-bit linear, LayerNorm, GeGLU, Post-LN, active dropout) gives None
and decoding takes the module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from intro2llm import ops
from intro2llm.model.kv_cache import KVCache, StaticKVCache
from intro2llm.ops import _dispatch

if TYPE_CHECKING:
    from intro2llm.model.causal_lm import CausalLM


@dataclass(frozen=True)
class DecodeLayer:
    """One block's decode-time weights. Matrices are (in, out) row-major; biases may be None. The field order
    is the C++ op's (``LayerWeights`` in csrc/cpu/decode_step.cpp): ``DecodeWeights.flat`` lists them in it."""

    input_norm: torch.Tensor  # (C,)
    w_qkv: torch.Tensor  # (C, H·D + 2·Hkv·D)
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # (H·D, C)
    b_o: torch.Tensor | None
    post_norm: torch.Tensor  # (C,)
    w_gate_up: torch.Tensor  # (C, 2F)
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # (F, C)
    b_down: torch.Tensor | None


@dataclass(frozen=True)
class DecodeWeights:
    """The whole stack's decode-time weights: per-layer bundles, the final norm, the LM head (C, V), and the
    RMSNorm epsilon (one for every norm)."""

    layers: tuple[DecodeLayer, ...]
    norm: torch.Tensor  # (C,)
    head: torch.Tensor  # (C, V)
    eps: float

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: CausalLM) -> DecodeWeights | None:
        """The bundle of a plain Llama-style ``model``, or None where the module path must run."""
        from intro2llm.model.feedforward import SwiGLU
        from intro2llm.model.norm import RMSNorm

        c = model.config
        if not (c.use_rope and c.use_rms_norm and c.ffn_type == "swiglu" and c.norm_position == "pre"):
            return None
        if model.training and c.dropout > 0:
            return None
        norms = [n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(model.norm)
        if any(type(n) is not RMSNorm or n.eps != norms[0].eps for n in norms) or type(model.lm_head) is not nn.Linear:
            return None

        def cat_t(*mods: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = torch.cat([m.weight for m in mods]).t().contiguous()  # (in, out)
            return w, None if mods[0].bias is None else torch.cat([m.bias for m in mods])

        layers = []
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(mlp, "gate_proj", None),
                       getattr(mlp, "up_proj", None), getattr(mlp, "down_proj", None))
            if not isinstance(mlp, SwiGLU) or any(type(m) is not nn.Linear for m in linears):
                return None
            w_qkv, b_qkv = cat_t(a.q_proj, a.k_proj, a.v_proj)
            w_o, b_o = cat_t(a.o_proj)
            w_gu, b_gu = cat_t(mlp.gate_proj, mlp.up_proj)
            w_down, b_down = cat_t(mlp.down_proj)
            layers.append(DecodeLayer(layer.input_layernorm.weight.detach().contiguous(), w_qkv, b_qkv, w_o, b_o,
                                      layer.post_attention_layernorm.weight.detach().contiguous(), w_gu, b_gu,
                                      w_down, b_down))
        head = model.lm_head.weight.t().contiguous()
        return cls(tuple(layers), model.norm.weight.detach().contiguous(), head, float(norms[0].eps))

    def flat(self) -> list[torch.Tensor | None]:
        """The per-layer entries of every layer in one list: the ``layers`` argument of ``intro2llm::decode_step``."""
        return [getattr(layer, f.name) for layer in self.layers for f in fields(DecodeLayer)]


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


def python_step(model: CausalLM, w: DecodeWeights, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                kpm: torch.Tensor | None) -> torch.Tensor:
    """One decode step: next ids (B,) at positions ``pos`` → (B, V) logits, appending to ``cache``."""
    c = model.config
    B = ids.shape[0]
    H, Hkv, D, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    qs, ks = H * D, Hkv * D
    h = nn.functional.embedding(ids, model.embed_tokens.weight)  # (B, C)
    cos, sin = model.rotary(pos, check=False)
    for i, lw in enumerate(w.layers):
        qkv = _mm(ops.rms_norm(h, lw.input_norm, w.eps), lw.w_qkv, lw.b_qkv)  # (B, q + 2kv)
        q = qkv[:, :qs].view(B, H, 1, D)  # (B, H, 1, D)
        k = qkv[:, qs : qs + ks].view(B, Hkv, 1, D)  # (B, Hkv, 1, D)
        v = qkv[:, qs + ks :].view(B, Hkv, 1, D)
        q, k = ops.apply_rope(q, k, cos, sin)
        k, v = cache.update(i, k, v)  # (B, Hkv, T, D)
        o = ops.flash_attention(q, k, v, causal=True, window=c.sliding_window, key_padding_mask=kpm)
        h = h + _mm(o.view(B, qs), lw.w_o, lw.b_o)  # (B, C)
        gu = _mm(ops.rms_norm(h, lw.post_norm, w.eps), lw.w_gate_up, lw.b_gate_up)  # (B, 2F)
        h = h + _mm(ops.swiglu(gu[:, :F], gu[:, F:]), lw.w_down, lw.b_down)
    cache.advance(1)
    return ops.rms_norm(h, w.norm, w.eps) @ w.head  # (B, V)


_DECODE_STEP = _dispatch.Op("decode_step", backends=("reference", "cpp"), compiled="decode_step")


def cpp_applies(w: DecodeWeights, cache: KVCache) -> bool:
    """Whether ``cpp_step`` can run: a float32 ``StaticKVCache`` and weights on the CPU, the extension built and
    the cpp backend chosen (``use_backend`` / ``INTRO2LLM_BACKEND`` naming another backend keeps the ops path)."""
    if not (isinstance(cache, StaticKVCache) and cache.k.dtype == torch.float32 and w.head.device.type == "cpu"):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (w.norm, w.head, *w.flat())):
        return False
    try:
        return _DECODE_STEP.resolve(w.head.device, dtype=torch.float32) == "cpp"
    except _dispatch.BackendUnavailableError:
        return False  # a backend this step does not have was asked for: the ops path honours it


def cpp_step(model: CausalLM, w: DecodeWeights, ids: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache,
             kpm: torch.Tensor | None, flat: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``python_step``'s math in one C++ call (``cpp_applies`` must hold); ``flat``: ``w.flat()``, made once."""
    c = model.config
    D = c.head_dim
    h = nn.functional.embedding(ids, model.embed_tokens.weight)  # (B, C)
    cos, sin = model.rotary(pos, check=False)
    logits = torch.ops.intro2llm.decode_step(
        h, w.flat() if flat is None else flat, w.norm, w.head, cache.k, cache.v, cache.seq_len,
        cos.reshape(-1, D).float().contiguous(), sin.reshape(-1, D).float().contiguous(), kpm,
        c.num_attention_heads, w.eps, c.sliding_window or 0,
    )  # fmt: skip
    cache.advance(1)
    return logits


def step_for(model: CausalLM, cache: KVCache) -> Callable | None:
    """The fastest decode step for ``model`` with ``cache``: ``step(ids (B,), pos, kpm) -> (B, V) logits``
    (C++ where ``cpp_applies``, else Python on the bundle), or None where the module path must run."""
    w = DecodeWeights.from_model(model)
    if w is None:
        return None
    if cpp_applies(w, cache):
        flat = w.flat()
        return lambda ids, pos, kpm: cpp_step(model, w, ids, pos, cache, kpm, flat)
    return lambda ids, pos, kpm: python_step(model, w, ids, pos, cache, kpm)
