"""Lesson 06 basic tests: normalization, words, the length filter, Gopher rules, language detection, exact dedup,
synthetic format, shards -> (x, y); cross-entropy (stable at huge logits, ignore_index=-100) and perplexity."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from intro2llm.data import dedup, filtering, pretrain_dataset, synthetic


def test_nfkc_and_control_characters():
    # full-width letters fold to ASCII; zero-width space and BEL disappear; newlines stay
    assert filtering.normalize_text("Ｈｅｌｌｏ\u200b\x07 world\r\n") == "Hello world\n"


def test_chinese_counts_characters_as_words():
    assert filtering.count_words("今天天气很好") == 6
    assert filtering.count_words("今天 weather 很好") == 5  # 今 天 weather 很 好


@pytest.mark.task("QualityFilter.check")
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


@pytest.mark.task("LengthFilter.check")
def test_length_filter_by_characters_and_words():
    f = filtering.LengthFilter(min_chars=5, max_chars=20)
    assert f.check("abcd") == "length.chars" and f.check("x" * 21) == "length.chars"
    assert f.check("hello") is None and f("x" * 20)
    w = filtering.LengthFilter(min_words=3, max_words=4)
    assert w.check("two words") == "length.words"
    assert w.check("今天天气") is None  # 4 Chinese characters = 4 words
    assert w.check("今天天气很好") == "length.words"  # 6 > 4
    res = filtering.Pipeline([w], normalize=False).run(["a b", "a b c", "a b c d e", "我爱 NLP"])
    assert res.kept == ["a b c", "我爱 NLP"] and res.dropped == {0: "length.words", 2: "length.words"}


@pytest.mark.task("QualityFilter.check")
def test_gopher_rules_keep_clean_prose_and_drop_repetition():
    q = filtering.QualityFilter()
    prose = ("The history of the printing press shows how a single invention can change the way that people share "
             "ideas with each other. Before it, books were copied by hand, which was slow and expensive, and only a "
             "few libraries could afford to have them. After it, pamphlets and newspapers spread quickly across "
             "Europe, and the number of readers grew with every decade.")
    assert q.check(prose) is None
    line = "the weather today is pleasant and that makes everyone happy"
    assert q.check("\n".join([line] * 20)) == "quality.duplicate_lines"  # 19 of 20 lines repeat
    assert q.check(prose + " #trending" * 10) == "quality.symbol_word_ratio"  # 10 '#' over ~70 words > 0.1
    assert q.check("too short") == "quality.word_count"
    assert q.check(" ".join(["lorem ipsum dolor sit amet"] * 12)) in {"quality.stop_words", "quality.top_ngram"}


@pytest.mark.task("detect_language")
def test_language_detection_zh_en_code():
    assert filtering.detect_language("机器学习是人工智能的一个分支，它让计算机从数据中学习规律。") == "zh"
    assert filtering.detect_language("Machine learning lets computers learn patterns from data.") == "en"
    code = "import os\n\ndef main():\n    x = os.getcwd()\n    return x\n\nif __name__ == '__main__':\n    main()\n"
    assert filtering.detect_language(code) == "code"
    assert filtering.detect_language("Машинное обучение — раздел искусственного интеллекта.") == "other"
    keep_zh = filtering.LanguageFilter(keep=("zh",))
    res = filtering.Pipeline([keep_zh], normalize=False).run(["中文的句子，很短。", "An English sentence.", code])
    assert res.kept == ["中文的句子，很短。"] and res.dropped == {1: "language.en", 2: "language.code"}
    with pytest.raises(ValueError, match="klingon"):
        filtering.LanguageFilter(keep=("klingon",))


@pytest.mark.task("CrossEntropyLoss.forward")
def test_cross_entropy_at_huge_logits_does_not_overflow():
    from intro2llm.loss import CrossEntropyLoss

    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 999.0]])
    target = torch.tensor([0, 2])
    loss = CrossEntropyLoss()(logits, target)
    # row 0: log-sum-exp = 1000, loss 0; row 1: lse = 1000 + log(1 + e^-1), loss = 1 + log(1 + e^-1)
    assert math.isfinite(loss.item())
    # fp32 spacing at 1000 is 6e-5, so agreement is to a few 1e-5
    assert loss.item() == pytest.approx((0 + 1 + math.log1p(math.exp(-1))) / 2, abs=1e-4)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, target), atol=1e-4, rtol=0)


@pytest.mark.task("CrossEntropyLoss.forward")
def test_cross_entropy_ignores_label_minus_100():
    from intro2llm.loss import CrossEntropyLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = -100  # e.g. prompt tokens or padding: no loss, no gradient
    targets[1, 4] = -100
    loss = CrossEntropyLoss()(logits, targets)
    keep = targets != -100
    logp = torch.log_softmax(logits, -1)  # L_t = -log softmax(z_t)[y_t], averaged over the 7 kept positions
    want = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)
    per_token = CrossEntropyLoss(reduction="none")(logits.detach(), targets)
    assert per_token.shape == (2, 5) and torch.all(per_token[~keep] == 0)
    torch.testing.assert_close(per_token[keep].mean(), want.detach())


@pytest.mark.task("CrossEntropyLoss.forward")
def test_perplexity_is_exp_of_the_mean_loss():
    from intro2llm.loss import CrossEntropyLoss

    # a model that knows nothing puts 1/V on every token: loss log V, perplexity V (the "branching factor")
    loss = CrossEntropyLoss()(torch.zeros(10, 50), torch.randint(0, 50, (10,)))
    assert loss.item() == pytest.approx(math.log(50)) and math.exp(loss.item()) == pytest.approx(50.0)
