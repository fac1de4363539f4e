"""Key/value caches for autoregressive decoding: a static pre-allocated one (gpt-fast style) and a dynamic one.

Without a cache every new token re-runs attention over the whole prefix: O(T²) work per token. With one, the
keys and values of past tokens are kept, and a step computes only the new token's q/k/v: O(T) per token.

- ``StaticKVCache``: one (L, B, Hkv, T_max, D) buffer for keys and one for values, allocated once; a step
  writes its T new columns in place and attention reads the filled prefix (a view, no ``torch.cat``, no
  re-allocation per step).
- ``DynamicKVCache``: per-layer tensors grown with ``torch.cat`` (simple, no maximum length, O(T) copies).

Rows of different lengths (left-padded batches) share one write position: every row has ``seq_len`` slots
filled, and padded slots are hidden by the attention mask (``key_padding_mask``) that ``CausalLM`` passes to
attention. ``seq_len`` advances once per model forward (``advance``), after every layer has written.

Not handled: rolling (ring-buffer) windows for sliding-window attention, paged/block caches, beam reordering.
"""

from __future__ import annotations

import torch

from intro2llm.course import lesson_task


class KVCache:
    """Common interface: ``update(layer, k, v) → (k_all, v_all)``, ``advance(n)``, ``seq_len``."""

    seq_len: int

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def advance(self, n: int) -> None:
        self.seq_len += n

    def get_seq_length(self) -> int:
        return self.seq_len

    def reset(self) -> None:
        self.seq_len = 0


class StaticKVCache(KVCache):
    """Pre-allocated cache: keys/values (L, B, Hkv, max_seq_len, D); writes in place, reads prefix views."""

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_seq_len", max_seq_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"StaticKVCache: {name} must be >= 1, got {value}")
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, Tmax, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, Tmax, D)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.seq_len = 0

    @classmethod
    def from_config(cls, config, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> StaticKVCache:
        return cls(config.num_hidden_layers, batch_size, max_seq_len, config.num_key_value_heads, config.head_dim,
                   dtype, device)

    @lesson_task(4)
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at [seq_len, seq_len + T); return the filled prefix (B, Hkv, seq_len + T, D)."""
        start, T = self.seq_len, k.shape[2]
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(
                f"StaticKVCache: writing {T} positions at {start} overflows max_seq_len={self.max_seq_len}"
            )
        if k.shape[0] != self.batch_size:
            raise ValueError(f"StaticKVCache: batch size {k.shape[0]} != cache batch size {self.batch_size}")
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class DynamicKVCache(KVCache):
    """Cache that grows by concatenation: per layer (B, Hkv, T, D) keys and values."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.seq_len = 0

    @lesson_task(4)
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)  # (B, Hkv, T_past + T, D)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reset(self) -> None:
        self.keys, self.values, self.seq_len = [], [], 0

    def memory_bytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.keys if t is not None)
