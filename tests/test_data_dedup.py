"""Tests for intro2llm.data.dedup: exact dedup, MinHash vs exact Jaccard, the LSH S-curve, near-dedup."""

import math
import random

import numpy as np
import pytest

from intro2llm.data import dedup as dd

VOCAB = [f"{a}{b}{c}" for a in "bcdfglmnprst" for b in "aeiou" for c in "klmnrstxz"]  # 540 words


def _doc(rng: random.Random, n: int = 120) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def _mutate(words: list[str], rng: random.Random, k: int) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), k):
        out[i] = rng.choice(VOCAB)
    return out


def _exact_j(a: str, b: str, n: int = 5) -> float:
    return dd.jaccard(dd.shingles(a, n), dd.shingles(b, n))


def test_shingles_known_answers():
    assert dd.shingles("abcdef", 3) == {"abc", "bcd", "cde", "def"}
    assert dd.shingles("AB  cd", 3) == {"ab ", "b c", " cd"}  # lower case, whitespace collapsed
    assert dd.shingles("ab", 5) == {"ab"}
    assert dd.shingles("", 5) == set()
    assert dd.shingles("a b c d", 2, kind="word") == {"a b", "b c", "c d"}
    assert dd.shingles("我爱自然语言", 2, kind="word") == {"我 爱", "爱 自", "自 然", "然 语", "语 言"}
    assert dd.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert dd.jaccard(set(), set()) == 1.0
    with pytest.raises(ValueError, match="shingle kind"):
        dd.shingles("abc", 2, kind="byte")


def test_exact_dedup_normalized():
    docs = ["Hello World", "hello   world", "HELLO WORLD\n", "Hello World!", "ＨＥＬＬＯ world", "other"]
    res = dd.exact_dedup(docs)
    assert res.kept_indices == [0, 3, 5]
    assert res.duplicates == {1: (0, 1.0), 2: (0, 1.0), 4: (0, 1.0)}
    assert res.kept(docs) == ["Hello World", "Hello World!", "other"]
    assert dd.exact_dedup(docs, normalize=False).kept_indices == [0, 1, 2, 3, 4, 5]


def test_signature_deterministic_and_seeded():
    text = "the quick brown fox jumps over the lazy dog"
    a = dd.MinHash(64, seed=1).signature(text)
    assert a.shape == (64,) and a.dtype == np.uint32
    np.testing.assert_array_equal(a, dd.MinHash(64, seed=1).signature(text))
    assert not np.array_equal(a, dd.MinHash(64, seed=2).signature(text))
    # a signature is a function of the shingle set only
    np.testing.assert_array_equal(a, dd.MinHash(64, seed=1).signature("THE quick  brown fox jumps over the lazy dog"))
    assert (dd.MinHash(8).signature("") == np.iinfo(np.uint32).max).all()


def test_minhash_estimate_matches_exact_jaccard():
    rng = random.Random(0)
    mh = dd.MinHash(256, seed=3)
    errors = []
    for k in range(0, 121, 4):  # from identical to unrelated
        base = _doc(rng)
        a, b = " ".join(base), " ".join(_mutate(base, rng, k))
        j = _exact_j(a, b)
        est = dd.MinHash.estimate(mh.signature(a), mh.signature(b))
        sd = math.sqrt(j * (1 - j) / 256)
        assert abs(est - j) <= 4 * sd + 1e-9, (k, j, est)
        errors.append(est - j)
    assert abs(np.mean(errors)) < 0.02  # unbiased
    assert np.mean(np.abs(errors)) < 0.03


def test_s_curve_formula_against_simulation():
    rng = np.random.default_rng(0)
    b, r = 9, 13
    for s in (0.6, 0.8, 0.9):
        rows_equal = rng.random((20_000, b, r)) < s  # each signature row agrees with probability s
        empirical = rows_equal.all(axis=2).any(axis=1).mean()
        assert empirical == pytest.approx(dd.candidate_probability(s, b, r), abs=0.015)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_optimal_bands(threshold):
    b, r = dd.optimal_bands(threshold, 128)
    assert b * r <= 128
    assert abs((1 / b) ** (1 / r) - threshold) < 0.1  # the S-curve's step sits near the threshold
    p = dd.candidate_probability(np.array([threshold - 0.3, threshold, min(threshold + 0.1, 1.0)]), b, r)
    assert p[0] < 0.1 and p[2] > p[1] > p[0]
    # more false-negative weight moves the step left: more bands per row
    b2, r2 = dd.optimal_bands(threshold, 128, fp_weight=0.1, fn_weight=0.9)
    assert (1 / b2) ** (1 / r2) <= (1 / b) ** (1 / r)


def test_lsh_candidate_rate_follows_s_curve():
    rng = random.Random(1)
    mh = dd.MinHash(128, seed=0)
    b, r = dd.optimal_bands(0.8, 128)
    expected, found, n = 0.0, 0, 0
    for k in (6, 10, 14, 20):  # similarities around the threshold
        for _ in range(25):
            base = _doc(rng)
            a, c = " ".join(base), " ".join(_mutate(base, rng, k))
            lsh = dd.MinHashLSH(128, b, r)
            lsh.insert("a", mh.signature(a))
            found += lsh.query(mh.signature(c)) == ["a"]
            expected += float(dd.candidate_probability(_exact_j(a, c), b, r))
            n += 1
    sd = math.sqrt(expected * (1 - expected / n))
    assert abs(found - expected) <= 4 * sd + 1, (found, expected)


def _corpus(seed=2):
    rng = random.Random(seed)
    originals = [" ".join(_doc(rng)) for _ in range(30)]
    docs, is_dup = [], []
    for o in originals:
        docs.append(o)
        is_dup.append(False)
    for o in originals[:15]:
        docs.append(" ".join(_mutate(o.split(), rng, 2)))  # near-duplicate: 2 of 120 words changed
        is_dup.append(True)
    docs.append(originals[0].upper())  # exact duplicate after normalization
    is_dup.append(True)
    zh = "活字印刷术是中国古代的重要发明之一北宋时期毕昇用胶泥制成单个的字经过火烧变硬后排版印刷这种方法更加灵活"
    docs += [zh, zh.replace("北宋", "宋朝"), "深度学习模型需要大量的数据和计算资源才能训练出好的效果而数据清洗非常重要"]
    is_dup += [False, True, False]
    return docs, is_dup


@pytest.mark.parametrize("verify", ["minhash", "exact"])
def test_near_dedup_finds_constructed_duplicates(verify):
    docs, is_dup = _corpus()
    res = dd.near_dedup(docs, threshold=0.7, num_perm=128, seed=0, verify=verify)
    assert sorted(res.duplicates) == [i for i, d in enumerate(is_dup) if d]
    assert res.kept_indices == [i for i, d in enumerate(is_dup) if not d]
    for i, (j, sim) in res.duplicates.items():
        assert j < i and not is_dup[j]
        assert _exact_j(docs[i], docs[j]) >= 0.7 - (0.12 if verify == "minhash" else 0.0)
        if verify == "exact":
            assert sim == pytest.approx(_exact_j(docs[i], docs[j]))


def test_near_dedup_against_brute_force():
    docs, _ = _corpus(seed=5)
    res = dd.near_dedup(docs, threshold=0.8, num_perm=128, seed=1)
    for i in range(len(docs)):
        best = max((_exact_j(docs[i], docs[j]) for j in res.kept_indices if j < i), default=0.0)
        if best >= 0.95:
            assert i in res.duplicates  # P(candidate) > 0.999 at J >= 0.95
        if best < 0.6:
            assert i not in res.duplicates  # far below the threshold: never verified as a duplicate


def test_near_dedup_deterministic_and_non_duplicates_kept():
    rng = random.Random(9)
    docs = [" ".join(_doc(rng)) for _ in range(60)]  # unrelated documents over one small vocabulary
    r1 = dd.near_dedup(docs, 0.5, seed=4)
    r2 = dd.near_dedup(docs, 0.5, seed=4)
    assert r1.kept_indices == r2.kept_indices == list(range(60))
    d = dd.NearDuplicateDeduplicator(0.8, bands=16, rows=8)
    assert d.add(docs[0]) is None and d.add(docs[0]) == (0, 1.0)
    assert d.deduplicate(docs[:3]).kept_indices == [0, 1, 2]  # deduplicate starts from an empty index


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        dd.optimal_bands(1.0, 128)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        dd.MinHashLSH(64, 10, 10)
    with pytest.raises(ValueError, match="both bands and rows"):
        dd.NearDuplicateDeduplicator(0.8, bands=4)
    with pytest.raises(ValueError, match="verify"):
        dd.NearDuplicateDeduplicator(0.8, verify="maybe")
    with pytest.raises(ValueError, match="signature shapes"):
        dd.MinHash.estimate(np.zeros(3), np.zeros(4))


def test_dedup_as_pipeline_stage():
    from intro2llm.data.filtering import LengthFilter, Pipeline

    docs, is_dup = _corpus()
    exact = dd.DedupFilter("exact")
    near = dd.DedupFilter("near", threshold=0.7, seed=0)
    res = Pipeline([LengthFilter(min_chars=10), exact, near]).run(docs + ["tiny"])
    assert res.kept_indices == [i for i, d in enumerate(is_dup) if not d]
    assert res.report["dropped.dedup.exact"] == 1  # the upper-cased copy
    assert res.report["dropped.dedup.near"] == sum(is_dup) - 1
    assert res.report["dropped.length.chars"] == 1
    # the index persists across runs: feeding the corpus again drops everything
    assert Pipeline([exact, near]).run(docs).report["kept"] == 0
    exact.reset()
    near.reset()
    assert Pipeline([exact, near]).run(docs).report["kept"] == len(res.kept_indices)
    with pytest.raises(ValueError, match="method"):
        dd.DedupFilter("fuzzy")
