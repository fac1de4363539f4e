"""Lesson 01 basic tests: the BPE ideas worked by hand — the merge loop on a classic example, the pair-count
update after one merge, the byte <-> unicode map, round trips, special tokens, save/load."""

from __future__ import annotations

import pytest

from intro2llm.tokenizer import BPETokenizer, ByteLevelBPETokenizer, bytes_to_unicode
from intro2llm.tokenizer._train import get_stats, merge_word


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


def test_tokenizer_round_trip_and_unknown_free():
    text = "def f(x):\n    return x ** 2  # 平方 🙂\n"
    tok = ByteLevelBPETokenizer().train([text * 20], vocab_size=300)
    for s in [text, "完全没见过的文字 ✓", "", "\x00\t\r\n", "é" * 10]:
        assert tok.decode(tok.encode(s)) == s


def test_tokenizer_decode_never_raises():
    tok = ByteLevelBPETokenizer().train(["héllo wörld"], vocab_size=270)
    euro = "€".encode()
    assert tok.decode([euro[0]]) == "\ufffd"  # a lone lead byte: replacement character, no exception
    assert tok.decode([euro[0], euro[1], euro[2]]) == "€"


def test_tokenizer_special_tokens():
    eot = "<|endoftext|>"
    tok = ByteLevelBPETokenizer().train(["some text"], 300, special_tokens=[eot], eos_token=eot)
    text = f"a{eot}b"
    with pytest.raises(ValueError, match="special token"):
        tok.encode(text)  # as in tiktoken: special text in ordinary input is an error by default
    assert tok.encode(text, allowed_special={eot}) == tok.encode("a") + [tok.eos_token_id] + tok.encode("b")
    as_text = tok.encode(text, disallowed_special=())
    assert tok.eos_token_id not in as_text and tok.decode(as_text) == text


def test_tokenizer_save_load(tmp_path):
    tok = ByteLevelBPETokenizer().train(["the cat sat on the mat"] * 3, 270)
    tok.save(tmp_path / "tok.json")
    back = ByteLevelBPETokenizer.load(tmp_path / "tok.json")
    assert back.merges == tok.merges and back.encode("the mat") == tok.encode("the mat")
