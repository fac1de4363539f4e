"""Lesson 06 basic tests: normalization, words, Gopher rules, exact dedup, synthetic format, shards -> (x, y)."""

import numpy as np
import pytest

from intro2llm.data import dedup, filtering, pretrain_dataset, synthetic


def test_nfkc_and_control_characters():
    # full-width letters fold to ASCII; zero-width space and BEL disappear; newlines stay
    assert filtering.normalize_text("Ｈｅｌｌｏ\u200b\x07 world\r\n") == "Hello world\n"


def test_chinese_counts_characters_as_words():
    assert filtering.count_words("今天天气很好") == 6
    assert filtering.count_words("今天 weather 很好") == 5  # 今 天 weather 很 好


def test_gopher_word_count_and_mean_length_by_hand():
    q = filtering.QualityFilter(min_words=5)
    assert q.check("the cat") == "quality.word_count"  # 2 words < 5
    # 6 words, mean length 1.0 < 3
    assert q.check("a b c d e f") == "quality.mean_word_length"


def test_duplicate_line_fraction_by_hand():
    # lines: x, y, x, x -> 2 of 4 lines repeat an earlier one
    assert filtering.duplicate_line_fraction("x\ny\nx\nx") == pytest.approx(0.5)


def test_exact_dedup_keeps_first():
    res = dedup.exact_dedup(["A b", "a  B", "c"])
    assert res.kept_indices == [0, 2] and res.duplicates == {1: (0, 1.0)}


def test_jaccard_by_hand():
    a, b = dedup.shingles("abcd", 2), dedup.shingles("abce", 2)  # {ab,bc,cd} vs {ab,bc,ce}
    assert dedup.jaccard(a, b) == pytest.approx(2 / 4)


def test_synthetic_format_and_reward():
    p = synthetic.generate_problems(1, seed=0)[0]
    assert p.prompt == f"Q: {p.question}=?\nA:" and p.response == f" {p.answer}\n"
    assert synthetic.reward("Q: 2+3=?\nA:", " 5\n") == 1.0
    assert synthetic.reward("Q: 2+3=?\nA:", " 6\n") == synthetic.FORMAT_REWARD
    assert synthetic.reward("Q: 2+3=?\nA:", "five") == 0.0


class CharTokenizer:
    eos_token_id = 0
    vocab_size = 128

    def encode(self, text):
        return [ord(c) for c in text]


def test_shards_give_shifted_windows(tmp_path):
    pretrain_dataset.write_shards(["hello world", "abc"], CharTokenizer(), tmp_path)
    ds = pretrain_dataset.PretrainDataset(tmp_path, block_size=4)
    stream = np.array([ord(c) for c in "hello world"] + [0] + [ord(c) for c in "abc"] + [0])
    assert ds.num_tokens == len(stream) == 16
    for i in range(len(ds)):
        x, y = ds[i]
        s = ds.window_start(i)
        np.testing.assert_array_equal(x, stream[s : s + 4])
        np.testing.assert_array_equal(y, stream[s + 1 : s + 5])  # y is x shifted by one token
