"""Readable references of two attention approximations that lesson 15 explains: linear attention and block-sparse
attention (local window + random + global blocks). Both are for teaching and testing, not for training speed.

Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"): replace ``exp(q·k)`` by a kernel
``φ(q)·φ(k)`` with a positive feature map (here ``φ(x) = elu(x) + 1``). Then

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) = φ(q_i)ᵀ S / φ(q_i)ᵀ z,   S = Σ_j φ(k_j) v_jᵀ,  z = Σ_j φ(k_j)

so the (T, T) matrix never exists: O(T·D²) time and O(D²) state instead of O(T²·D) and O(T²). Causal: S and z
become prefix sums, which is an RNN with a (D, D) state (``linear_attention_step`` is one decoding step).
``linear_attention_quadratic`` computes the same numbers the slow way (the kernel matrix, masked and
row-normalized), the oracle of the tests. It is a different model from softmax attention, not an approximation
of a trained softmax model's outputs.

Block-sparse attention (Child et al., 2019 "Sparse Transformers"; Zaheer et al., 2020 "BigBird"): cut the (T, T)
score matrix into (block, block) tiles and compute only the tiles a boolean ``layout`` (nQB, nKB) keeps: a band
of local blocks (sliding window), a few random blocks per row, and global blocks (the first blocks, which every
row sees and which see every block). ``block_sparse_attention`` loops over query blocks and gathers only their
kept key blocks, so the work is proportional to ``layout.sum()``, not nQB·nKB; ``block_sparse_mask`` expands the
layout to the token-level mask under which naive attention gives the same result (the tests' oracle).

Shapes: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with H a multiple of Hkv (GQA: each group of H / Hkv query heads
reads one key/value head, through ``repeat_kv``). Not handled: key padding masks, dropout, fast kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from intro2llm.ops.flash_attention import naive_attention, repeat_kv


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be 4-D (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"{name}: q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")


# ------------------------------------------------------------------------------------------------ linear attention
def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0: the feature map of Katharopoulos et al. (keeps every kernel value positive)."""
    return F.elu(x) + 1.0


def linear_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The oracle: A = φ(Q) φ(K)ᵀ (masked when causal), out = A V / A·1 — an explicit (Tq, Tk) matrix.
    Causal masks are bottom-right aligned (query i sits at position i + Tk - Tq)."""
    _check_qkv("linear_attention_quadratic", q, k, v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_rep = q.shape[1] // k.shape[1]
    fq, fk = elu_feature_map(q.to(acc)), elu_feature_map(repeat_kv(k, n_rep).to(acc))
    a = fq @ fk.transpose(-1, -2)  # (B, H, Tq, Tk), every entry > 0
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        keep = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        a = a * keep
    return ((a @ repeat_kv(v, n_rep).to(acc)) / a.sum(-1, keepdim=True)).to(q.dtype)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Linear attention in O(T·D²): out_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i with S_i = Σ_{j visible} φ(k_j) v_jᵀ and
    z_i = Σ_{j visible} φ(k_j) (prefix sums when causal; one sum for every query otherwise)."""
    _check_qkv("linear_attention", q, k, v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_rep = q.shape[1] // k.shape[1]
    fq = elu_feature_map(q.to(acc))  # (B, H, Tq, D)
    fk = elu_feature_map(repeat_kv(k, n_rep).to(acc))  # (B, H, Tk, D)
    vv = repeat_kv(v, n_rep).to(acc)  # (B, H, Tk, Dv)
    if not causal:
        s = fk.transpose(-1, -2) @ vv  # (B, H, D, Dv): Σ_j φ(k_j) v_jᵀ
        z = fk.sum(dim=2)  # (B, H, D)
        num = fq @ s  # (B, H, Tq, Dv)
        den = (fq * z[:, :, None]).sum(-1, keepdim=True)  # (B, H, Tq, 1)
        return (num / den).to(q.dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    # prefix sums over keys: S_j = Σ_{j' <= j} φ(k_j') v_j'ᵀ (B, H, Tk, D, Dv) — the RNN's state after key j.
    # (Materializing every prefix state costs O(T·D²) memory; a kernel would keep one state and stream.)
    s = torch.cumsum(fk[..., :, None] * vv[..., None, :], dim=2)
    z = torch.cumsum(fk, dim=2)  # (B, H, Tk, D)
    last = torch.arange(Tq, device=q.device) + (Tk - Tq)  # the last key query i sees
    s, z = s[:, :, last], z[:, :, last]  # (B, H, Tq, D, Dv), (B, H, Tq, D)
    num = (fq[..., None] * s).sum(-2)  # (B, H, Tq, Dv)
    den = (fq * z).sum(-1, keepdim=True)
    return (num / den).to(q.dtype)


def linear_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One causal decoding step as an RNN: q/k/v (B, H, D) for the new token (k/v already repeated to H heads),
    ``state = (S (B, H, D, Dv), z (B, H, D))`` or None at the start → (out (B, H, Dv), new state). Constant memory
    per step, whatever the context length: what a KV cache cannot do."""
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    s_prev, z_prev = state if state is not None else (torch.zeros(*fk.shape, v.shape[-1], dtype=fk.dtype,
                                                                  device=fk.device), torch.zeros_like(fk))
    s = s_prev + fk[..., :, None] * v[..., None, :]
    z = z_prev + fk
    out = (fq[..., None] * s).sum(-2) / (fq * z).sum(-1, keepdim=True)
    return out, (s, z)


# ------------------------------------------------------------------------------------------ block-sparse attention
def sparse_layout(
    n_q_blocks: int,
    n_k_blocks: int | None = None,
    *,
    local_blocks: int = 1,
    random_blocks: int = 0,
    global_blocks: int = 0,
    causal: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """BigBird-style block layout (n_q_blocks, n_k_blocks) bool, True = compute this tile.

    - local: query block i sees key blocks i - local_blocks + 1 … i (and … i + local_blocks - 1 when not causal);
    - random: ``random_blocks`` extra key blocks per query row, drawn with ``seed`` among the allowed ones;
    - global: the first ``global_blocks`` key blocks are seen by every row, and (not causal) those query rows see
      every block.
    Causal layouts never keep a tile above the diagonal. Blocks are aligned at the top-left (Tq == Tk).
    """
    n_k_blocks = n_q_blocks if n_k_blocks is None else n_k_blocks
    for name, val in (("n_q_blocks", n_q_blocks), ("n_k_blocks", n_k_blocks), ("local_blocks", local_blocks)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"sparse_layout: {name} must be an int >= 1, got {val!r}")
    if random_blocks < 0 or global_blocks < 0:
        raise ValueError(f"sparse_layout: random_blocks and global_blocks must be >= 0, got {random_blocks}, "
                         f"{global_blocks}")
    i = torch.arange(n_q_blocks)[:, None]
    j = torch.arange(n_k_blocks)[None, :]
    allowed = j <= i if causal else torch.ones(n_q_blocks, n_k_blocks, dtype=torch.bool)
    layout = (j > i - local_blocks) & (j <= i if causal else j < i + local_blocks)
    if global_blocks:
        layout |= j < global_blocks
        if not causal:
            layout |= i < global_blocks
    if random_blocks:
        g = torch.Generator().manual_seed(seed)
        for r in range(n_q_blocks):
            free = (allowed[r] & ~layout[r]).nonzero().flatten()
            if len(free):
                pick = free[torch.randperm(len(free), generator=g)[:random_blocks]]
                layout[r, pick] = True
    return layout & allowed


def block_sparse_mask(layout: torch.Tensor, block_size: int, Tq: int, Tk: int, causal: bool = True) -> torch.Tensor:
    """Token-level (Tq, Tk) keep-mask of ``layout``: tile (bi, bj) covers queries bi·block … and keys bj·block …;
    with ``causal`` the token-level causal mask is applied inside the diagonal tiles too."""
    if layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError(f"block_sparse_mask: layout must be a 2-D bool tensor, got {layout.dtype} "
                         f"{tuple(layout.shape)}")
    nqb, nkb = math.ceil(Tq / block_size), math.ceil(Tk / block_size)
    if tuple(layout.shape) != (nqb, nkb):
        raise ValueError(f"block_sparse_mask: layout shape {tuple(layout.shape)} does not fit Tq={Tq}, Tk={Tk} "
                         f"with block_size {block_size} (expected ({nqb}, {nkb}))")
    keep = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:Tq, :Tk]
    if causal:
        keep = keep & (torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None])
    return keep.to(layout.device)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention computed only on the tiles that ``layout`` keeps: each query block gathers its kept key blocks
    (never the whole row) and runs softmax over them. Same result as naive attention under
    ``block_sparse_mask(layout, ...)``; work ∝ ``layout.sum()`` tiles. Tq == Tk (self-attention)."""
    _check_qkv("block_sparse_attention", q, k, v)
    B, H, T, D = q.shape
    if k.shape[2] != T:
        raise ValueError(f"block_sparse_attention: needs Tq == Tk, got {T} and {k.shape[2]}")
    n_blocks = math.ceil(T / block_size)
    if tuple(layout.shape) != (n_blocks, n_blocks) or layout.dtype != torch.bool:
        raise ValueError(f"block_sparse_attention: layout must be bool ({n_blocks}, {n_blocks}) for T={T}, "
                         f"block_size={block_size}; got {layout.dtype} {tuple(layout.shape)}")
    n_rep = H // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out = torch.zeros_like(q)
    for bi in range(n_blocks):
        q0, q1 = bi * block_size, min((bi + 1) * block_size, T)
        cols = layout[bi].nonzero().flatten().tolist()
        if not cols:
            continue  # a row with no kept tile sees nothing: output 0 (as naive attention with an empty row)
        idx = torch.cat([torch.arange(bj * block_size, min((bj + 1) * block_size, T)) for bj in cols]).to(q.device)
        keep = None
        if causal:
            keep = idx[None, :] <= torch.arange(q0, q1, device=q.device)[:, None]  # (bq, n_kept_keys)
        out[:, :, q0:q1] = naive_attention(q[:, :, q0:q1], k[:, :, idx], v[:, :, idx], keep, scale)
    return out
