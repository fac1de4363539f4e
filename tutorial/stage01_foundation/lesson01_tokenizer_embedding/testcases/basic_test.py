"""Lesson 01 basic tests: the BPE ideas worked by hand — the merge loop on a classic example, the pair-count
update after one merge, the byte <-> unicode map, round trips, special tokens, save/load."""

from __future__ import annotations

import pytest

from intro2llm.tokenizer import BPETokenizer, ByteLevelBPETokenizer, bytes_to_unicode
from intro2llm.tokenizer._train import get_stats, merge_word


@pytest.mark.task("BPETokenizer.train", "BPETokenizer.encode_ordinary", "BPETokenizer._bpe", "BaseTokenizer.decode")
def test_bpe_known_answer_aaabdaaabac():
    # Wikipedia's byte-pair-encoding example: aa -> Z, ab -> Y, ZY -> X turns "aaabdaaabac" into "XdXac".
    tok = BPETokenizer().train("aaabdaaabac", vocab_size=4 + 3 + 1)  # a b c d + 3 merges + <unk>
    assert tok.merges == [("a", "a"), ("a", "b"), ("aa", "ab")]
    ids = tok.encode("aaabdaaabac")
    assert [tok.decode([i]) for i in ids] == ["aaab", "d", "aaab", "a", "c"]
    assert tok.decode(ids) == "aaabdaaabac"


def test_bpe_pair_counts_and_their_update_by_hand():
    # The Hugging Face course corpus: hug x10, pug x5, pun x12, bun x4, hugs x5 (ids: b=0 g=1 h=2 n=3 p=4 s=5 u=6).
    b, g, h, n, p, s, u = range(7)
    words = [[h, u, g], [p, u, g], [p, u, n], [b, u, n], [h, u, g, s]]
    counts = [10, 5, 12, 4, 5]
    stats = get_stats(words, counts)
    assert stats[(u, g)] == 10 + 5 + 5 and stats[(p, u)] == 5 + 12 and stats[(u, n)] == 12 + 4
    assert stats[(h, u)] == 15 and stats[(g, s)] == 5 and max(stats, key=stats.get) == (u, g)
    ug = 7
    merged = [merge_word(w, (u, g), ug) for w in words]
    assert merged == [[h, ug], [p, ug], [p, u, n], [b, u, n], [h, ug, s]]
    after = get_stats(merged, counts)
    # Only pairs touching the merged words changed: (h,u) 15 -> 0, (u,g) 20 -> 0, (g,s) 5 -> 0, (p,u) 17 -> 12,
    # new (h,ug) 15, (p,ug) 5, (ug,s) 5; (u,n) and (b,u) are untouched.
    assert after == {(h, ug): 15, (p, ug): 5, (ug, s): 5, (p, u): 12, (u, n): 16, (b, u): 4}


def test_bpe_merge_word_is_left_to_right_without_overlap():
    assert merge_word([0, 0, 0], (0, 0), 9) == [9, 0]
    assert merge_word([0, 0, 0, 0], (0, 0), 9) == [9, 9]
    assert merge_word([1, 0, 1], (0, 0), 9) == [1, 0, 1]


def test_bpe_bytes_to_unicode_map():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


@pytest.mark.task(
    "BPETokenizer.train",
    "ByteLevelBPETokenizer._to_symbols",
    "ByteLevelBPETokenizer._symbol_bytes",
    "BaseTokenizer.decode",
)
def test_tokenizer_round_trip_and_unknown_free():
    text = "def f(x):\n    return x ** 2  # 平方 🙂\n"
    tok = ByteLevelBPETokenizer().train([text * 20], vocab_size=300)
    for s in [text, "完全没见过的文字 ✓", "", "\x00\t\r\n", "é" * 10]:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.task("BaseTokenizer.decode", "ByteLevelBPETokenizer._symbol_bytes")
def test_tokenizer_decode_never_raises():
    tok = ByteLevelBPETokenizer().train(["héllo wörld"], vocab_size=270)
    euro = "€".encode()
    assert tok.decode([euro[0]]) == "\ufffd"  # a lone lead byte: replacement character, no exception
    assert tok.decode([euro[0], euro[1], euro[2]]) == "€"


@pytest.mark.task("BPETokenizer.train")
def test_tokenizer_special_tokens():
    eot = "<|endoftext|>"
    tok = ByteLevelBPETokenizer().train(["some text"], 300, special_tokens=[eot], eos_token=eot)
    text = f"a{eot}b"
    with pytest.raises(ValueError, match="special token"):
        tok.encode(text)  # as in tiktoken: special text in ordinary input is an error by default
    assert tok.encode(text, allowed_special={eot}) == tok.encode("a") + [tok.eos_token_id] + tok.encode("b")
    as_text = tok.encode(text, disallowed_special=())
    assert tok.eos_token_id not in as_text and tok.decode(as_text) == text


@pytest.mark.task("BaseTokenizer.save", "BaseTokenizer.load")
def test_tokenizer_save_load(tmp_path):
    tok = ByteLevelBPETokenizer().train(["the cat sat on the mat"] * 3, 270)
    tok.save(tmp_path / "tok.json")
    back = ByteLevelBPETokenizer.load(tmp_path / "tok.json")
    assert back.merges == tok.merges and back.encode("the mat") == tok.encode("the mat")


@pytest.mark.task("BPETokenizer._pretokenize")
def test_bpe_pretokenize_splits_words_with_the_pattern():
    # GPT-2's rule: a word keeps one leading space; a run of spaces leaves its last space to the next word.
    text = "Hello world's    return 42!"
    words = BPETokenizer("gpt2")._pretokenize(text)
    assert words == ["Hello", " world", "'s", "   ", " return", " 42", "!"]
    # cl100k: digits in groups of at most three
    assert BPETokenizer("cl100k")._pretokenize("x = 1234567") == ["x", " =", " ", "123", "456", "7"]
    for pattern in ("gpt2", "cl100k"):
        assert "".join(BPETokenizer(pattern)._pretokenize("def f():\n\treturn 1  # 注释\n")) == \
            "def f():\n\treturn 1  # 注释\n"  # nothing dropped
    with pytest.raises(ValueError, match="pattern"):
        BPETokenizer(r"[a-z]+")._pretokenize("abc 123")  # a pattern that skips characters is an error


@pytest.mark.task("BaseTokenizer.vocab_size")
def test_tokenizer_vocab_size_counts_ordinary_and_special_tokens():
    tok = BPETokenizer().train("aaabdaaabac", vocab_size=8)
    assert tok.vocab_size == 4 + 3 + 1  # a b c d, three merges, <unk>
    assert tok.special_tokens["<unk>"] == tok.vocab_size - 1  # specials come after the ordinary tokens
    byte = ByteLevelBPETokenizer().train(["abc abc abc"], 260, special_tokens=["<pad>"], pad_token="<pad>")
    assert byte.vocab_size == 256 + len(byte.merges) + 1 == 260
    assert max(byte.encode("abc abd", allowed_special="all")) < byte.vocab_size


@pytest.mark.task("BaseTokenizer.encode_batch")
def test_tokenizer_encode_batch_truncation_and_padding():
    tok = ByteLevelBPETokenizer().train(["abc abc abc"], 260, special_tokens=["<pad>"], pad_token="<pad>")
    long, short = tok.encode("abcdefgh"), tok.encode("ab")
    assert len(long) > 3 > len(short)
    pad = tok.pad_token_id
    out = tok.encode_batch(["abcdefgh", "ab"], truncation=True, max_length=3, padding="max_length")
    assert out["input_ids"] == [long[:3], short + [pad] * (3 - len(short))]  # truncation keeps the start
    assert out["attention_mask"] == [[1, 1, 1], [1] * len(short) + [0] * (3 - len(short))]
    left = tok.encode_batch(["abcdefgh", "ab"], truncation=True, max_length=3, padding=True, padding_side="left")
    assert left["input_ids"][1] == [pad] * (3 - len(short)) + short
    assert left["attention_mask"][1] == [0] * (3 - len(short)) + [1] * len(short)
    assert tok.encode_batch(["abcdefgh"], truncation=False)["input_ids"] == [long]  # no truncation by default
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["abcdefgh"], truncation=True)


# ------------------------------------------------------------------------------------------------------------------
# Part 2: embeddings and positions (appended by the model lessons; own imports, names prefixed test_embedding_/rope_)
# ------------------------------------------------------------------------------------------------------------------
import math  # noqa: E402

import torch  # noqa: E402

from intro2llm.model.embedding import (  # noqa: E402
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    TokenEmbedding,
    sinusoidal_table,
)


@pytest.mark.task("TokenEmbedding.forward")
def test_embedding_lookup_is_one_hot_matmul():
    torch.manual_seed(0)
    emb = TokenEmbedding(11, 6)
    ids = torch.tensor([[3, 0, 10]])
    one_hot = torch.nn.functional.one_hot(ids, 11).float()
    torch.testing.assert_close(emb(ids), one_hot @ emb.weight)


@pytest.mark.task("TokenEmbedding.forward")
def test_embedding_rejects_out_of_range_ids():
    emb = TokenEmbedding(11, 6)
    for bad in ([[11]], [[-1]]):
        with pytest.raises(ValueError, match="vocabulary"):
            emb(torch.tensor(bad))


@pytest.mark.task("sinusoidal_table", "SinusoidalPositionalEncoding.forward")
def test_embedding_sinusoidal_by_hand():
    table = sinusoidal_table(4, 4)  # omega = [1, 1/100]
    assert table[2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert table[2, 1].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert table[2, 2].item() == pytest.approx(math.sin(2.0 / 100), abs=1e-6)
    assert table[2, 3].item() == pytest.approx(math.cos(2.0 / 100), abs=1e-6)
    x = torch.zeros(1, 4, 4)
    torch.testing.assert_close(SinusoidalPositionalEncoding(4, 4)(x)[0], table)


@pytest.mark.task("RotaryEmbedding.rotate", "rope_inv_freq")
def test_rope_preserves_norms_and_position_zero_is_identity():
    torch.manual_seed(0)
    rot = RotaryEmbedding(8, 32)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = rot(torch.arange(5))
    q_rot, k_rot = RotaryEmbedding.rotate(q, k, cos, sin)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(q_rot[:, :, 0], q[:, :, 0])  # angle 0
    # d = 2, theta_0 = 1: position 1 rotates (1, 0) by one radian
    c, s = RotaryEmbedding(2, 4)(torch.tensor([1]))
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    out, _ = RotaryEmbedding.rotate(x, x, c, s)
    torch.testing.assert_close(out.flatten(), torch.tensor([math.cos(1.0), math.sin(1.0)]))
