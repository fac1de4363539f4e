"""Token embeddings and position information: a lookup table, sinusoidal absolute positions, rotary positions.

- ``TokenEmbedding``: ``E[token_id]`` — a (V, C) table; ids are checked before indexing (a bad id would
  otherwise read out of bounds on GPU, or raise an opaque IndexError on CPU).
- ``SinusoidalPositionalEncoding`` (Vaswani et al., 2017): ``PE[p, 2i] = sin(p / 10000^(2i/C))``,
  ``PE[p, 2i+1] = cos(p / 10000^(2i/C))``, added to the token embeddings.
- ``RotaryEmbedding`` (RoPE, Su et al., 2021): rotates each (x_i, x_{i+D/2}) pair of q and k by the angle
  ``p · θ_i`` with ``θ_i = base^(-2i/D)``, so that ``<R_m q, R_n k>`` depends only on ``m - n``. It owns the
  cos/sin tables (fp32, grown lazily up to ``max_position_embeddings``) and looks them up by ``position_ids``;
  the rotation itself is ``intro2llm.ops.apply_rope`` (Hugging Face Llama's split-half convention). Scaling:
  ``linear`` (position interpolation, Chen et al., 2023) and ``llama3`` (frequency-dependent, as in
  ``transformers``' ``_compute_llama3_parameters``).

Not handled: NTK/YaRN/dynamic scaling, learned absolute positions, interleaved (GPT-J) rotary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``input_ids`` is an integer tensor with ids in [0, vocab_size)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"input_ids contain id {bad} outside the vocabulary [0, {vocab_size}) (shape {tuple(input_ids.shape)})"
        )


class TokenEmbedding(nn.Module):
    """(B, T) int ids → (B, T, C) vectors: row ``id`` of a learned (V, C) table."""

    def __init__(self, vocab_size: int, hidden_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    @lesson_task(1)
    def forward(self, input_ids: torch.Tensor, check: bool = True) -> torch.Tensor:  # (B, T) → (B, T, C)
        if check:
            check_token_ids(input_ids, self.vocab_size)
        return nn.functional.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


@lesson_task(1)
def sinusoidal_table(num_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(P, C) fp32 table: even channels sin(p·ω_i), odd channels cos(p·ω_i), ω_i = base^(-2i/C)."""
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal_table: dim must be even, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (P, 1)
    omega = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (C/2,)
    table = torch.empty(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * omega)
    table[:, 1::2] = torch.cos(pos * omega)
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to x (B, T, C) at ``position_ids`` (default 0..T-1)."""

    def __init__(self, hidden_size: int, max_position_embeddings: int, base: float = 10000.0) -> None:
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        self.register_buffer("table", sinusoidal_table(max_position_embeddings, hidden_size, base), persistent=False)

    @lesson_task(1)
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)
        check_positions(position_ids, self.max_position_embeddings)
        return x + self.table[position_ids].to(x.dtype)  # (B, T, C)


def check_positions(position_ids: torch.Tensor, max_positions: int) -> None:
    """``ValueError`` when a position is negative or ≥ ``max_position_embeddings`` (sequence too long)."""
    if position_ids.numel() == 0:
        return
    hi = int(position_ids.max())
    if hi >= max_positions or int(position_ids.min()) < 0:
        raise ValueError(
            f"position {hi} is outside [0, max_position_embeddings={max_positions}): the sequence is too long "
            f"for this model (configure rope_scaling and a larger max_position_embeddings to extend it)"
        )


@lesson_task(1)
def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies θ_i = base^(-2i/D), adjusted by ``scaling`` (linear | llama3)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor  # position interpolation: p → p / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are interpolated, short ones kept, the middle band blended
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type must be 'linear' or 'llama3', got {kind!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE and their application to (q, k).

    ``forward(position_ids)`` returns (cos, sin): (T, D) for a 1-D ``position_ids`` or (B, T, D) for a 2-D one
    (per-row offsets: left padding, decoding). Tables are fp32 plain attributes, not buffers, so that
    ``model.to(torch.bfloat16)`` does not round the angles.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int, base: float = 10000.0,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.inv_freq = rope_inv_freq(head_dim, base, scaling)  # (D/2,) fp32
        self._cos = torch.empty(0, head_dim)
        self._sin = torch.empty(0, head_dim)

    def _grow(self, length: int, device: torch.device) -> None:
        # tables grow in powers of two up to max_position_embeddings (llama3_8b-sized maxima would be 100+ MB)
        n = min(self.max_position_embeddings, max(256, 1 << (max(length, 1) - 1).bit_length()))
        t = torch.arange(n, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D): split-half layout
        self._cos, self._sin = emb.cos(), emb.sin()

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` rows of the cos/sin tables on ``device``: (length, D) each."""
        if length > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        if self._cos.shape[0] < length or self._cos.device != torch.device(device):
            self._grow(length, torch.device(device))
        return self._cos[:length], self._sin[:length]

    def forward(self, position_ids: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if check:
            check_positions(position_ids, self.max_position_embeddings)
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 1
        else:
            needed = self._cos.shape[0] if self._cos.device == position_ids.device else 1
        cos, sin = self.tables(max(needed, 1), position_ids.device)
        return cos[position_ids], sin[position_ids]  # (T, D) or (B, T, D)

    @staticmethod
    @lesson_task(1)
    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by the angles in cos/sin (T, D) | (B, T, D)."""
        return ops.apply_rope(q, k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_position_embeddings={self.max_position_embeddings}"
