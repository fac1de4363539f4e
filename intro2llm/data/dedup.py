"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH banding).

References: Broder 1997, "On the resemblance and containment of documents" (MinHash); Leskovec,
Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3 (LSH banding, the S-curve); Lee et al. 2022,
"Deduplicating Training Data Makes Language Models Better".

MinHash. A document becomes a set of shingles (character n-grams by default, so Chinese works the
same as English). For a random hash function ``h``, ``P[min h(A) == min h(B)] = J(A, B)`` (the
Jaccard similarity ``|A ∩ B| / |A ∪ B|``): the minimum of ``A ∪ B`` is equally likely to be any of its
elements, and both minima agree exactly when it lies in ``A ∩ B``. With ``num_perm`` independent
functions the fraction of equal signature entries estimates ``J`` with standard deviation
``sqrt(J (1 - J) / num_perm)`` (0.03 at J = 0.5 and 256 functions). We hash a shingle to 32 bits
with CRC32 (deterministic across processes, unlike Python's ``hash``) and apply the
multiply-shift family ``h_i(x) = ((a_i x + b_i) mod 2^64) >> 32`` (a_i odd), seeded by ``seed``.

LSH banding. Cut the signature into ``b`` bands of ``r`` rows; two documents become candidates when
all ``r`` rows of at least one band agree. For similarity ``s``:
``P(candidate) = 1 - (1 - s^r)^b`` — an S-curve in ``s`` whose steep part sits near
``t ≈ (1/b)^(1/r)``. More rows per band move the step right and make it steeper (fewer false
positives); more bands move it left (fewer false negatives). ``optimal_bands`` picks ``(b, r)`` with
``b * r <= num_perm`` minimizing the false-positive area ``∫_0^t P(s) ds`` plus the false-negative area
``∫_t^1 1 - P(s) ds`` (the rule datasketch uses). Example: ``num_perm=128, t=0.8`` -> ``b=9, r=13``:
P(0.5) ≈ 0.001, P(0.7) ≈ 0.08, P(0.8) ≈ 0.40, P(0.9) ≈ 0.93, P(0.95) ≈ 1.0. The step sits at the
threshold, so pairs just above it are found only about half the time; raise ``fn_weight`` (or index
with a lower threshold) to catch more of them. Candidates are then verified (estimated or exact
Jaccard >= threshold), so false positives cost time, not correctness.

Policy: keep the first document of each group; later documents are compared with the kept ones
only. ``DedupFilter`` makes either method a ``filtering.Pipeline`` stage. Not handled: sub-document
(span) dedup with suffix arrays, distributed dedup across machines.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .filtering import Filter, words

_WS_RE = re.compile(r"\s+")
_MASK32 = np.uint64(0xFFFFFFFF)
_MAX_SIG = np.uint32(0xFFFFFFFF)


def normalize_for_dedup(text: str) -> str:
    """NFKC, lower case, whitespace runs -> one space, stripped. Two texts differing only there are equal."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_hash(text: str, *, normalize: bool = True) -> str:
    """128-bit BLAKE2b hex digest of (normalized) text."""
    t = normalize_for_dedup(text) if normalize else text
    return hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity; two empty sets count as identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class DedupResult:
    kept_indices: list[int]
    duplicates: dict[int, tuple[int, float]] = field(default_factory=dict)  # dup index -> (kept index, similarity)

    def kept(self, docs: Sequence[str]) -> list[str]:
        return [docs[i] for i in self.kept_indices]


class ExactDeduplicator:
    """Streaming exact dedup: ``add(text)`` is True the first time a normalized text is seen."""

    def __init__(self, *, normalize: bool = True) -> None:
        self.normalize = normalize
        self.seen: dict[str, int] = {}
        self._n = 0

    def add(self, text: str) -> bool:
        h = text_hash(text, normalize=self.normalize)
        idx = self._n
        self._n += 1
        if h in self.seen:
            return False
        self.seen[h] = idx
        return True

    def first_index(self, text: str) -> int | None:
        return self.seen.get(text_hash(text, normalize=self.normalize))


def exact_dedup(docs: Iterable[str], *, normalize: bool = True) -> DedupResult:
    """Keep the first of each group of documents with equal (normalized) text."""
    d = ExactDeduplicator(normalize=normalize)
    kept, dups = [], {}
    for i, t in enumerate(docs):
        if d.add(t):
            kept.append(i)
        else:
            dups[i] = (d.first_index(t), 1.0)
    return DedupResult(kept, dups)


# ------------------------------------------------------------------ MinHash


def shingles(text: str, n: int = 5, kind: str = "char") -> set[str]:
    """Character or word ``n``-grams of ``normalize_for_dedup(text)``; a text shorter than ``n`` is one shingle."""
    t = normalize_for_dedup(text)
    if kind == "char":
        if len(t) <= n:
            return {t} if t else set()
        return {t[i : i + n] for i in range(len(t) - n + 1)}
    if kind == "word":
        ws = words(t)
        if len(ws) <= n:
            return {" ".join(ws)} if ws else set()
        return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}
    raise ValueError(f"shingle kind must be 'char' or 'word', got {kind!r}")


class MinHash:
    """MinHash signatures: ``signature(text)`` -> ``(num_perm,)`` uint32."""

    def __init__(self, num_perm: int = 128, *, ngram: int = 5, shingle: str = "char", seed: int = 0) -> None:
        if num_perm <= 0:
            raise ValueError(f"num_perm must be positive, got {num_perm}")
        if ngram <= 0:
            raise ValueError(f"ngram must be positive, got {ngram}")
        if shingle not in ("char", "word"):
            raise ValueError(f"shingle must be 'char' or 'word', got {shingle!r}")
        self.num_perm, self.ngram, self.shingle, self.seed = num_perm, ngram, shingle, seed
        rng = np.random.default_rng(seed)
        hi = np.iinfo(np.uint64).max
        self.a = rng.integers(0, hi, size=(num_perm, 1), dtype=np.uint64, endpoint=True) | np.uint64(1)  # odd
        self.b = rng.integers(0, hi, size=(num_perm, 1), dtype=np.uint64, endpoint=True)

    def shingles(self, text: str) -> set[str]:
        return shingles(text, self.ngram, self.shingle)

    def signature_of_shingles(self, sh: Iterable[str]) -> np.ndarray:
        x = np.fromiter((zlib.crc32(s.encode("utf-8", "surrogatepass")) for s in sh), dtype=np.uint64)
        if x.size == 0:
            return np.full(self.num_perm, _MAX_SIG, dtype=np.uint32)
        with np.errstate(over="ignore"):
            h = (self.a * x[None, :] + self.b) >> np.uint64(32)  # (num_perm, n_shingles), wraps mod 2^64
        return h.min(axis=1).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        """``(num_perm,)`` uint32 signature of ``text``."""
        return self.signature_of_shingles(self.shingles(text))

    @staticmethod
    def estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        """Estimated Jaccard similarity: fraction of equal entries."""
        if sig_a.shape != sig_b.shape:
            raise ValueError(f"signature shapes differ: {sig_a.shape} vs {sig_b.shape}")
        return float(np.mean(sig_a == sig_b))


# ------------------------------------------------------------------ LSH


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """The S-curve: probability that two documents of Jaccard ``s`` share at least one band."""
    return 1.0 - (1.0 - np.power(s, rows)) ** bands


def _area(f, lo: float, hi: float, steps: int = 200) -> float:
    if hi <= lo:
        return 0.0
    xs = lo + (np.arange(steps) + 0.5) * (hi - lo) / steps  # midpoint rule
    return float(np.sum(f(xs)) * (hi - lo) / steps)


def optimal_bands(
    threshold: float, num_perm: int, *, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimizing weighted false-positive and
    false-negative areas under/over the S-curve around ``threshold``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _area(lambda s, b=b, r=r: candidate_probability(s, b, r), 0.0, threshold)
            fn = _area(lambda s, b=b, r=r: 1.0 - candidate_probability(s, b, r), threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class MinHashLSH:
    """Band index: ``insert(key, sig)``, ``query(sig)`` -> keys sharing at least one band."""

    def __init__(self, num_perm: int, bands: int, rows: int) -> None:
        if bands * rows > num_perm:
            raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {num_perm}")
        self.num_perm, self.bands, self.rows = num_perm, bands, rows
        self.tables: list[dict[bytes, list[Hashable]]] = [{} for _ in range(bands)]

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        if sig.shape != (self.num_perm,):
            raise ValueError(f"signature shape {sig.shape} != ({self.num_perm},)")
        r = self.rows
        return [sig[i * r : (i + 1) * r].tobytes() for i in range(self.bands)]

    def insert(self, key: Hashable, sig: np.ndarray) -> None:
        for table, k in zip(self.tables, self._keys(sig)):
            table.setdefault(k, []).append(key)

    def query(self, sig: np.ndarray) -> list[Hashable]:
        out: dict[Hashable, None] = {}
        for table, k in zip(self.tables, self._keys(sig)):
            for key in table.get(k, ()):
                out[key] = None
        return list(out)


class NearDuplicateDeduplicator:
    """MinHash + LSH near-duplicate removal with a Jaccard ``threshold``.

    ``verify``: ``"minhash"`` (estimated Jaccard of the signatures, default), ``"exact"`` (Jaccard of
    the shingle sets; keeps them in memory) or ``"none"`` (every LSH candidate is a duplicate).
    """

    def __init__(
        self,
        threshold: float = 0.8,
        *,
        num_perm: int = 128,
        ngram: int = 5,
        shingle: str = "char",
        seed: int = 0,
        bands: int | None = None,
        rows: int | None = None,
        verify: str = "minhash",
    ) -> None:
        if verify not in ("minhash", "exact", "none"):
            raise ValueError(f"verify must be 'minhash', 'exact' or 'none', got {verify!r}")
        if (bands is None) != (rows is None):
            raise ValueError("give both bands and rows, or neither")
        if bands is None:
            bands, rows = optimal_bands(threshold, num_perm)
        self.threshold, self.verify = threshold, verify
        self.minhash = MinHash(num_perm, ngram=ngram, shingle=shingle, seed=seed)
        self.lsh = MinHashLSH(num_perm, bands, rows)
        self._sigs: dict[int, np.ndarray] = {}
        self._sets: dict[int, set[str]] = {}
        self._n = 0

    def add(self, text: str) -> tuple[int, float] | None:
        """Index ``text`` unless it duplicates a kept document; returns ``(kept index, similarity)`` if so."""
        idx = self._n
        self._n += 1
        sh = self.minhash.shingles(text)
        sig = self.minhash.signature_of_shingles(sh)
        best: tuple[int, float] | None = None
        for cand in self.lsh.query(sig):
            if self.verify == "none":
                sim = MinHash.estimate(sig, self._sigs[cand])
            elif self.verify == "exact":
                sim = jaccard(sh, self._sets[cand])
            else:
                sim = MinHash.estimate(sig, self._sigs[cand])
            if (self.verify == "none" or sim >= self.threshold) and (best is None or sim > best[1]):
                best = (cand, sim)
        if best is not None:
            return best
        self.lsh.insert(idx, sig)
        self._sigs[idx] = sig
        if self.verify == "exact":
            self._sets[idx] = sh
        return None

    def reset(self) -> None:
        self.lsh = MinHashLSH(self.lsh.num_perm, self.lsh.bands, self.lsh.rows)
        self._sigs, self._sets, self._n = {}, {}, 0

    def deduplicate(self, docs: Iterable[str]) -> DedupResult:
        """Dedup ``docs`` from an empty index (indices in the result are positions in ``docs``)."""
        self.reset()
        kept, dups = [], {}
        for i, t in enumerate(docs):
            hit = self.add(t)
            if hit is None:
                kept.append(i)
            else:
                dups[i] = hit
        return DedupResult(kept, dups)


def near_dedup(docs: Sequence[str], threshold: float = 0.8, **kwargs) -> DedupResult:
    """Shortcut: ``NearDuplicateDeduplicator(threshold, **kwargs).deduplicate(docs)``."""
    return NearDuplicateDeduplicator(threshold, **kwargs).deduplicate(docs)


class DedupFilter(Filter):
    """A ``filtering.Pipeline`` stage: drop a document that duplicates one that passed this stage before.

    ``method="exact"`` (normalized hash) or ``"near"`` (MinHash + LSH; ``kwargs`` go to
    ``NearDuplicateDeduplicator``). The index persists across ``Pipeline.run`` calls, so a corpus can be
    fed in batches; ``reset()`` empties it. Dropped documents are reported as ``"dedup.exact"`` /
    ``"dedup.near"``.
    """

    name = "dedup"

    def __init__(self, method: str = "exact", **kwargs) -> None:
        if method not in ("exact", "near"):
            raise ValueError(f"method must be 'exact' or 'near', got {method!r}")
        self.method, self.kwargs = method, kwargs
        self.reset()

    def reset(self) -> None:
        if self.method == "exact":
            self._index = ExactDeduplicator(**self.kwargs)
        else:
            self._index = NearDuplicateDeduplicator(**self.kwargs)

    def check(self, text: str) -> str | None:
        if self.method == "exact":
            return None if self._index.add(text) else "dedup.exact"
        return None if self._index.add(text) is None else "dedup.near"
