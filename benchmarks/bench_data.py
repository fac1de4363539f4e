"""Data-pipeline benchmarks (CPU): MinHash+LSH dedup throughput and token-shard writing throughput.

    pytest benchmarks/bench_data.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median
    python benchmarks/bench_data.py          # same figures, printed

Groups:
- ``dedup``: ``NearDuplicateDeduplicator`` (MinHash 128 + LSH) vs brute-force exact Jaccard over all
  pairs (O(N^2) set operations) on the same N documents; ``extra_info["docs/s"]``.
- ``shards``: ``ShardWriter`` (uint16, atomic temp-file + fsync + rename) vs ``ndarray.tofile`` + fsync of
  the same tokens (the write floor), and ``write_shards`` with tokenization by a byte tokenizer;
  ``extra_info["tokens/s"]``. CPU numbers are only meaningful as ratios within one run.
"""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest

from intro2llm.data import dedup as dd
from intro2llm.data import pretrain_dataset as pd
from intro2llm.data.synthetic import pretrain_documents

N_DOCS = 300
N_TOKENS = 4_000_000
WORDS = [f"w{i}" for i in range(3000)]


def _docs(n=N_DOCS, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(n)]  # ~1 KB each
    for i in range(0, n, 10):  # 10% near-duplicates
        words = docs[i].split()
        words[rng.randrange(len(words))] = "changed"
        docs[(i + 5) % n] = " ".join(words)
    return docs


def brute_force_dedup(docs, threshold=0.8, n=5):
    sets = [dd.shingles(d, n) for d in docs]
    kept = []
    for i, s in enumerate(sets):
        if not any(dd.jaccard(s, sets[j]) >= threshold for j in kept):
            kept.append(i)
    return kept


class ByteTokenizer:
    eos_token_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())


def _run_dedup(impl, docs):
    if impl == "minhash_lsh":
        return dd.NearDuplicateDeduplicator(0.8, num_perm=128).deduplicate(docs).kept_indices
    return brute_force_dedup(docs)


def _run_shards(impl, tokens, docs, out):
    if impl == "tofile_floor":  # same bytes, one file, also fsync'd: the write floor
        with open(out / "floor.bin", "wb") as f:
            tokens.tofile(f)
            f.flush()
            os.fsync(f.fileno())
    elif impl == "shard_writer":
        with pd.ShardWriter(out, 257, shard_tokens=1 << 20) as w:
            for chunk in np.array_split(tokens, 1000):  # ~1000 "documents"
                w.add(chunk, append_eos=False)
    else:
        pd.write_shards(docs, ByteTokenizer(), out, shard_tokens=1 << 20)


@pytest.mark.parametrize("impl", ["minhash_lsh", "brute_force_exact"])
def test_dedup(benchmark, impl):
    docs = _docs()
    benchmark.group = f"dedup-{N_DOCS}docs"
    benchmark.pedantic(_run_dedup, args=(impl, docs), rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["docs/s"] = round(N_DOCS / benchmark.stats.stats.min, 1)


@pytest.mark.parametrize("impl", ["shard_writer", "tofile_floor", "write_shards_tokenize"])
def test_shards(benchmark, impl, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, N_TOKENS).astype(np.uint16)
    docs = list(pretrain_documents(20_000, seed=0))
    n_tok = sum(len(d) + 1 for d in docs) if impl == "write_shards_tokenize" else N_TOKENS
    counter = iter(range(1000))

    def run():
        out = tmp_path / str(next(counter))
        out.mkdir()
        _run_shards(impl, tokens, docs, out)

    benchmark.group = "shards"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tokens"] = n_tok
    benchmark.extra_info["tokens/s"] = round(n_tok / benchmark.stats.stats.min)


if __name__ == "__main__":
    from intro2llm.testing import best_seconds as best

    docs = _docs()
    same = set(_run_dedup("minhash_lsh", docs)) == set(_run_dedup("brute_force_exact", docs))
    print(f"minhash+lsh keeps the same documents as brute force: {same}")
    t_lsh = best(lambda: _run_dedup("minhash_lsh", docs))
    t_bf = best(lambda: _run_dedup("brute_force_exact", docs))
    print(f"dedup {N_DOCS} docs: minhash+lsh {N_DOCS / t_lsh:.0f} docs/s, brute-force exact {N_DOCS / t_bf:.0f} docs/s")
    tokens = np.random.default_rng(0).integers(0, 257, N_TOKENS).astype(np.uint16)
    sdocs = list(pretrain_documents(20_000, seed=0))
    n_sdocs = sum(len(d) + 1 for d in sdocs)
    with tempfile.TemporaryDirectory() as tmp:
        k = iter(range(100))
        for impl, n in (("shard_writer", N_TOKENS), ("tofile_floor", N_TOKENS), ("write_shards_tokenize", n_sdocs)):

            def once(impl=impl):
                out = Path(tmp) / str(next(k))
                out.mkdir()
                _run_shards(impl, tokens, sdocs, out)

            print(f"shards {impl}: {n / best(once) / 1e6:.1f} M tokens/s")
