"""Pretraining data: tokenized token shards on disk, random windows, a resumable rank-aware loader.

Pipeline (the nanoGPT / Megatron "packed" format):

1. ``write_shards(docs, tokenizer, out_dir)`` tokenizes each document, appends ``eos_token_id``
   (documents are joined by EOS: ``d0 EOS d1 EOS ...``) and writes flat ``uint16`` token files
   (``uint32`` when ``vocab_size > 65536``) of about ``shard_tokens`` tokens each, plus ``index.json``
   (dtype, vocab_size, eos id, token count per shard). Each file is written to a temporary name in
   the same directory and renamed with ``os.replace`` (atomic on POSIX), and ``index.json`` is
   written last: a crash never leaves a half-written shard under its final name, and a directory
   without ``index.json`` is never read as a dataset. Rewriting a directory writes the new
   shards under names the old index does not use and swaps ``index.json`` last, so an interrupted
   rewrite leaves the old dataset whole and loadable, never a mix of old and new shards.
2. ``PretrainDataset(path, block_size)`` memory-maps the shards (no copy into RAM) and treats them
   as one stream of ``N`` tokens. Sample ``i`` is a window of ``block_size + 1`` tokens;
   ``x = w[:-1]``, ``y = w[1:]`` (next-token targets). Epoch ``e = i // len(ds)`` uses a
   permutation of the ``len(ds)`` disjoint windows, and a random shift of the window grid, both
   drawn from ``numpy.random.default_rng([seed, e])``: every epoch sees each token once, in a new
   order and with new window boundaries, and sample ``i`` is the same on every machine and run.
3. ``PretrainLoader(ds, global_batch_size, rank, world_size)`` — global step ``s`` consists of the
   samples ``s*G .. s*G+G-1``; rank ``r`` takes rows ``r*G/W .. (r+1)*G/W - 1``. So the union over
   ranks of one step equals the batch that one process with ``G`` rows sees, the ranks never
   overlap, and the only state is ``step`` (``state_dict`` / ``load_state_dict``) — a checkpoint
   written by rank 0 restores every rank, even with a different world size.

Windows may cross document (EOS) boundaries and shard boundaries; attention is not masked at EOS
(as in GPT-2/nanoGPT pretraining). Not handled: per-document attention masks, weighted mixing of
several datasets, streaming from remote storage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from intro2llm._io import atomic_write

INDEX_FILE = "index.json"
FORMAT = "intro2llm-pretrain-v1"


class DataPathError(FileNotFoundError, ValueError):
    """A data path that is missing or holds no usable data (catch as ValueError or FileNotFoundError)."""


class TokenizerLike(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so it covers ``vocab_size <= 65536``; larger vocabularies need uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def _tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """The number of ids a tokenizer can emit: the largest of ``len()``, ``vocab_size`` and ``n_vocab``.

    Hugging Face tokenizers report added special tokens (often the EOS) in ``len()`` but not in
    ``vocab_size``, so taking the largest covers every id.
    """
    sizes = []
    for name in ("vocab_size", "n_vocab"):
        v = getattr(tokenizer, name, None)
        if callable(v):
            v = v()
        if isinstance(v, int):
            sizes.append(v)
    try:
        sizes.append(len(tokenizer))
    except TypeError:
        pass
    return max(sizes) if sizes else None


class ShardWriter:
    """Append token ids; every ``shard_tokens`` tokens a shard file is written atomically.

    Use as a context manager or call ``close()``; ``close()`` writes ``index.json`` (atomically, last).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        vocab_size: int,
        *,
        eos_token_id: int | None = None,
        shard_tokens: int = 1 << 24,
        dtype: str | np.dtype | None = None,
        prefix: str = "shard",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(dtype) if dtype is not None else dtype_for_vocab(self.vocab_size)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"shard dtype must be uint16 or uint32, got {self.dtype}")
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit in {self.dtype}")
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside [0, vocab_size={self.vocab_size})")
        self.eos_token_id = eos_token_id
        self.shard_tokens = int(shard_tokens)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Rewriting a dataset in place: the new shards get names the old index does not use, and the new
        # index.json replaces the old one atomically at close(). Until then the old dataset stays whole and
        # loadable; an interrupted rewrite leaves only unreferenced files, removed by the next rewrite.
        self._base_prefix = prefix
        old = {p.name for p in self.out_dir.glob(f"{prefix}*.bin")}
        generation = 0
        while any(name.startswith(self._prefix_for(generation) + "_") for name in old):
            generation += 1
        self.prefix = self._prefix_for(generation)
        self._buf = np.empty(self.shard_tokens, dtype=self.dtype)
        self._fill = 0
        self._pending: list[int] = []
        self._shards: list[dict[str, Any]] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._closed = False

    def _prefix_for(self, generation: int) -> str:
        return self._base_prefix if generation == 0 else f"{self._base_prefix}-g{generation}"

    def add(self, ids: Sequence[int] | np.ndarray, *, append_eos: bool = True) -> None:
        """Add one document's ids (and EOS after it when ``append_eos`` and an EOS id is set)."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        eos = append_eos and self.eos_token_id is not None
        if isinstance(ids, np.ndarray):
            arr = ids.reshape(-1)
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
                self._bad_id(arr.tolist())
            self._drain()
            self._copy(arr)
            if eos:
                self._copy(np.array([self.eos_token_id]))
            n = arr.size + eos
        else:
            # small Python lists (typical tokenizer output) are batched: one numpy conversion per 64K
            # tokens instead of one per document, ~10x faster for short documents
            ids = list(ids)
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                self._bad_id(ids)
            self._pending.extend(ids)
            if eos:
                self._pending.append(self.eos_token_id)
            if len(self._pending) >= 1 << 16:
                self._drain()
            n = len(ids) + eos
        self.num_documents += 1
        self.num_tokens += n

    def _bad_id(self, ids: list[int]) -> None:
        bad = next(i for i in ids if not 0 <= i < self.vocab_size)
        raise ValueError(f"document {self.num_documents}: token id {bad} is outside [0, vocab_size={self.vocab_size})")

    def _drain(self) -> None:
        if self._pending:
            self._copy(np.array(self._pending, dtype=self.dtype))
            self._pending = []

    def _copy(self, arr: np.ndarray) -> None:
        pos = 0
        while pos < arr.size:
            take = min(arr.size - pos, self.shard_tokens - self._fill)
            self._buf[self._fill : self._fill + take] = arr[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        name = f"{self.prefix}_{len(self._shards):05d}.bin"
        atomic_write(self.out_dir / name, memoryview(self._buf[: self._fill]).cast("B"))
        self._shards.append({"file": name, "num_tokens": int(self._fill)})
        self._fill = 0

    def close(self) -> dict[str, Any]:
        """Flush the last shard and write ``index.json``; returns the index."""
        if self._closed:
            return self.index
        self._drain()
        self._flush()
        self.index = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "shards": self._shards,
        }
        atomic_write(self.out_dir / INDEX_FILE, (json.dumps(self.index, indent=1) + "\n").encode())
        written = {sh["file"] for sh in self._shards}
        for path in self.out_dir.glob(f"{self._base_prefix}*.bin"):  # the replaced dataset, orphans of crashes
            if path.name not in written:
                path.unlink()
        self._closed = True
        return self.index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on error: finished shards stay, but no index.json is written, so the directory is not a dataset


def write_shards(
    documents: Iterable[str],
    tokenizer: TokenizerLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    shard_tokens: int = 1 << 24,
    dtype: str | np.dtype | None = None,
) -> dict[str, Any]:
    """Tokenize ``documents`` with ``tokenizer.encode`` and write shards + ``index.json`` to ``out_dir``.

    ``vocab_size`` defaults to the tokenizer's (the largest of ``vocab_size``, ``n_vocab`` and ``len()``).
    Returns the index dict.
    """
    if vocab_size is None:
        vocab_size = _tokenizer_vocab_size(tokenizer)
        if vocab_size is None:
            raise ValueError("cannot read vocab_size from the tokenizer; pass vocab_size=")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; documents are joined with EOS")
    with ShardWriter(out_dir, vocab_size, eos_token_id=eos, shard_tokens=shard_tokens, dtype=dtype) as w:
        for doc in documents:
            w.add(tokenizer.encode(doc))
    return w.index


def load_index(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Read and check ``index.json`` of a shard directory (or the index file itself)."""
    p = Path(path)
    if not p.exists():
        raise DataPathError(f"pretraining data path does not exist: {str(p)!r}")
    index_path = p / INDEX_FILE if p.is_dir() else p
    if p.is_dir() and not index_path.exists():
        if not any(p.iterdir()):
            raise DataPathError(f"pretraining data directory is empty: {str(p)!r}")
        raise DataPathError(
            f"no {INDEX_FILE} in {str(p)!r}: not a shard directory (write one with write_shards), "
            "or an interrupted write"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read shard index {str(index_path)!r}: {e}") from e
    for key in ("dtype", "vocab_size", "shards"):
        if key not in index:
            raise ValueError(f"shard index {str(index_path)!r} has no {key!r} field")
    return index_path.parent, index


class PretrainDataset:
    """Random windows of ``block_size + 1`` tokens over memory-mapped shards.

    ``ds[i]`` -> ``(x, y)``, two int64 numpy arrays of shape ``(block_size,)``; ``i`` is any
    non-negative global sample index (epoch ``i // len(ds)``). ``vocab_size`` (e.g. the model's) is
    checked against the data: an id >= it raises before training starts.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        block_size: int,
        *,
        seed: int = 0,
        vocab_size: int | None = None,
        validate: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.root, self.index = load_index(path)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.dtype = np.dtype(self.index["dtype"])
        self.data_vocab_size = int(self.index["vocab_size"])
        self.vocab_size = int(vocab_size) if vocab_size is not None else self.data_vocab_size
        self.eos_token_id = self.index.get("eos_token_id")
        self._maps: list[np.ndarray] = []
        sizes = []
        for shard in self.index["shards"]:
            f = self.root / shard["file"]
            if not f.exists():
                raise DataPathError(f"shard listed in the index is missing: {str(f)!r}")
            n = int(shard["num_tokens"])
            expect = n * self.dtype.itemsize
            if f.stat().st_size != expect:
                raise ValueError(
                    f"shard {str(f)!r} has {f.stat().st_size} bytes, the index says {n} tokens = {expect} bytes"
                )
            if n > 0:
                self._maps.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(n,)))
                sizes.append(n)
        self.num_tokens = int(sum(sizes))
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # shard start positions
        L = self.block_size + 1
        if self.num_tokens < L:
            raise DataPathError(
                f"pretraining data {str(self.root)!r} has {self.num_tokens} tokens, fewer than one window "
                f"of block_size + 1 = {L}"
            )
        if validate:
            self._check_ids()
        # windows per epoch: the grid is shifted by up to L-1 tokens per epoch, so leave that slack
        self._per_epoch = max(1, (self.num_tokens - (L - 1)) // L)
        self._max_shift = min(L - 1, self.num_tokens - self._per_epoch * L)
        self._epoch_cache: dict[int, tuple[np.ndarray, int]] = {}

    def _check_ids(self) -> None:
        chunk = 1 << 22
        for m, shard in zip(self._maps, [s for s in self.index["shards"] if s["num_tokens"] > 0]):
            for start in range(0, m.shape[0], chunk):
                part = m[start : start + chunk]
                hi = int(part.max())
                if hi >= self.vocab_size:
                    pos = start + int(np.argmax(part >= self.vocab_size))
                    raise ValueError(
                        f"token id {hi} >= vocab_size {self.vocab_size} in {str(self.root / shard['file'])!r} "
                        f"(first bad id {int(m[pos])} at token {pos})"
                    )

    def __len__(self) -> int:
        """Windows per epoch."""
        return self._per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        plan = self._epoch_cache.get(epoch)
        if plan is None:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self._per_epoch)
            shift = int(rng.integers(0, self._max_shift + 1))
            if len(self._epoch_cache) >= 2:  # the loader only ever needs the current and next epoch
                self._epoch_cache.pop(min(self._epoch_cache))
            plan = self._epoch_cache[epoch] = (perm, shift)
        return plan

    def window_start(self, index: int) -> int:
        """Token position where global sample ``index`` starts."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, j = divmod(int(index), self._per_epoch)
        perm, shift = self._epoch_plan(epoch)
        return shift + int(perm[j]) * (self.block_size + 1)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated shards, as int64."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            lo = start + filled - self._offsets[k]
            take = min(length - filled, self._maps[k].shape[0] - lo)
            out[filled : filled + take] = self._maps[k][lo : lo + take]
            filled += take
            k += 1
        return out

    def window(self, index: int) -> np.ndarray:
        """The ``block_size + 1`` tokens of sample ``index``."""
        return self.read(self.window_start(index), self.block_size + 1)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        w = self.window(index)
        return w[:-1], w[1:]


class PretrainLoader:
    """Batches for one rank: global step ``s`` holds samples ``s*G .. s*G+G-1``; rank ``r`` gets rows
    ``r*G/W .. (r+1)*G/W-1``. ``next_batch()`` -> ``(x, y)`` LongTensors of shape ``(G/W, block_size)``."""

    def __init__(
        self,
        dataset: PretrainDataset,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: Any = "cpu",
        start_step: int = 0,
    ) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size <= 0 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of world_size {world_size}"
            )
        self.dataset = dataset
        self.global_batch_size = int(global_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch_size = self.global_batch_size // self.world_size
        self.device = device
        self.step = int(start_step)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's first sample."""
        return self.step * self.global_batch_size // len(self.dataset)

    def indices(self, step: int) -> list[int]:
        """Global sample indices of this rank at ``step``."""
        first = step * self.global_batch_size + self.rank * self.local_batch_size
        return list(range(first, first + self.local_batch_size))

    def batch_numpy(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        w = np.stack([self.dataset.window(i) for i in self.indices(step)])  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def next_batch(self):
        """The batch of the current step, then advance. Returns torch int64 ``(x, y)``, each ``(B, T)``."""
        import torch

        x, y = self.batch_numpy(self.step)
        self.step += 1
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if str(self.device) != "cpu":
            if torch.cuda.is_available():  # pinned host memory lets the copy overlap with compute
                xt, yt = xt.pin_memory(), yt.pin_memory()
            xt = xt.to(self.device, non_blocking=True)
            yt = yt.to(self.device, non_blocking=True)
        return xt, yt

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "global_batch_size": self.global_batch_size,
            "seed": self.dataset.seed,
            "block_size": self.dataset.block_size,
            "num_tokens": self.dataset.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Batch size, seed, block size and data size must match (else ``ValueError``)."""
        mine = self.state_dict()
        for key in ("global_batch_size", "seed", "block_size", "num_tokens"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"loader state mismatch: checkpoint has {key}={state[key]}, this loader has {mine[key]}; "
                    "resuming would not continue the same sample sequence"
                )
        if "step" not in state:
            raise ValueError("loader state has no 'step'")
        self.step = int(state["step"])


def read_text_documents(
    path: str | os.PathLike, *, suffixes: tuple[str, ...] = (".txt", ".md", ".py")
) -> Iterator[str]:
    """Documents from a text file (one document) or a directory (one document per matching file, sorted).

    ``.jsonl`` files give one document per line from the ``"text"`` field. Undecodable bytes are replaced.
    """
    p = Path(path)
    if not p.exists():
        raise DataPathError(f"data path does not exist: {str(p)!r}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in suffixes or f.suffix == ".jsonl"))
        if not files:
            raise DataPathError(f"no {', '.join(suffixes + ('.jsonl',))} files under {str(p)!r}")
    else:
        files = [p]
    found = False
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"{str(f)!r} line {lineno}: expected a JSON object with 'text'") from e
                        found = True
                        yield text
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                found = True
                yield text
    if not found:
        raise DataPathError(f"data path {str(p)!r} holds no non-empty documents")
