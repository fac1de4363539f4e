"""Lesson 06 advanced tests: MinHash vs exact Jaccard, the LSH S-curve, perplexity outliers, resumable DDP sampler."""

import math
import random

import numpy as np
import pytest
import torch

from intro2llm.data import dedup, filtering, pretrain_dataset
from intro2llm.data.synthetic import pretrain_documents


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    base = [rng.choice(words) for _ in range(150)]
    other = list(base)
    for i in rng.sample(range(150), 30):
        other[i] = rng.choice(words)
    a, b = " ".join(base), " ".join(other)
    exact = dedup.jaccard(dedup.shingles(a), dedup.shingles(b))
    mh = dedup.MinHash(num_perm=512, seed=0)
    est = dedup.MinHash.estimate(mh.signature(a), mh.signature(b))
    assert abs(est - exact) < 4 * math.sqrt(exact * (1 - exact) / 512)


def test_s_curve_values():
    # P = 1 - (1 - s^r)^b, worked example from the README: b=20, r=5
    assert dedup.candidate_probability(0.8, 20, 5) == pytest.approx(1 - (1 - 0.8**5) ** 20)
    assert dedup.candidate_probability(0.8, 20, 5) > 0.999
    assert dedup.candidate_probability(0.3, 20, 5) < 0.05
    b, r = dedup.optimal_bands(0.8, 128)
    assert b * r <= 128 and abs((1 / b) ** (1 / r) - 0.8) < 0.1


def test_near_duplicates_removed_distinct_kept():
    a = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill all day"
    b = a.replace("warm", "sunny")
    c = "Completely different text about training language models on filtered and deduplicated web data"
    res = dedup.near_dedup([a, b, c], threshold=0.6, num_perm=128)
    assert res.kept_indices == [0, 2] and res.duplicates[1][0] == 0


def test_perplexity_filter_drops_outliers():
    scores = [20.0, 22.0, 19.0, 21.0, 20.5, 500.0, 1.01]
    f = filtering.PerplexityFilter(lambda i: scores[int(i)], k=3.0)
    res = filtering.Pipeline([f], normalize=False).run([str(i) for i in range(7)])
    assert res.dropped == {5: "perplexity.high", 6: "perplexity.low"}


class ByteTokenizer:
    eos_token_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode())


def test_sampler_resume_and_ranks(tmp_path):
    pretrain_dataset.write_shards(pretrain_documents(200, seed=0), ByteTokenizer(), tmp_path)
    ds = pretrain_dataset.PretrainDataset(tmp_path, block_size=32, seed=0)
    full = pretrain_dataset.PretrainLoader(ds, global_batch_size=4)
    ref = [full.next_batch()[0] for _ in range(6)]
    # resume after 3 steps on two ranks: rank r gets rows r*2..r*2+1 of the same global batch
    state = {"step": 3, "global_batch_size": 4, "seed": 0, "block_size": 32, "num_tokens": ds.num_tokens}
    ranks = [pretrain_dataset.PretrainLoader(ds, 4, rank=r, world_size=2) for r in range(2)]
    for rk in ranks:
        rk.load_state_dict(state)
    for step in range(3, 6):
        parts = [rk.next_batch()[0] for rk in ranks]
        assert np.array_equal(np.concatenate([p.numpy() for p in parts]), ref[step].numpy())


def test_bad_data_is_caught_before_training(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pretrain_dataset.PretrainDataset(tmp_path / "missing", block_size=8)
    pretrain_dataset.write_shards(["some text here"], ByteTokenizer(), tmp_path / "d")
    with pytest.raises(ValueError, match="vocab_size 100"):
        pretrain_dataset.PretrainDataset(tmp_path / "d", block_size=4, vocab_size=100)


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_cross_entropy_fwd_kernel")
def test_triton_cross_entropy_kernel_matches_reference():
    import intro2llm.ops as ops

    torch.manual_seed(0)
    logits, targets = torch.randn(6, 50), torch.randint(0, 50, (6,))
    targets[1] = -100
    torch.testing.assert_close(ops.cross_entropy(logits, targets, backend="triton"),
                               ops.cross_entropy_reference(logits, targets), atol=1e-5, rtol=1e-5)
