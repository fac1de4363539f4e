"""Tokenizer (issue 19): special tokens split the training corpus, ``encode_iterable`` streams exactly, a pattern
that does not cover the text is refused, and bad tokenizer files give one clear error."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from intro2llm.tokenizer import BaseTokenizer, BPETokenizer, ByteLevelBPETokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>"]
DOC = ("def f(x):\n    return x + 1  # héllo 世界\n\n\n" "class A:\n    pass\n" "print(f(2), 'done')\n")
CORPUS = "<|endoftext|>".join(DOC.replace("f", c) for c in "fghijklmnop") * 4


def _pieces_with(tok, token: str) -> list[bytes]:
    vocab = [tok.id_to_token(i) for i in range(tok.num_ordinary_tokens)]
    enc = token.encode()
    return [v for v in vocab if len(v) > 1 and (v in enc or enc in v or any(
        v.startswith(enc[i:]) or v.endswith(enc[:i]) for i in range(1, len(enc))))]


def test_special_tokens_split_the_training_corpus():
    control = ByteLevelBPETokenizer().train(CORPUS, 400)  # specials unknown: they are ordinary text
    assert _pieces_with(control, "<|endoftext|>"), "control: merges learn pieces of the special token"
    tok = ByteLevelBPETokenizer().train(CORPUS, 400, special_tokens=SPECIALS)
    learned = [tok.id_to_token(i) for i in range(tok.num_ordinary_tokens)]
    assert not [v for v in learned if b"<|" in v or b"|>" in v or b"endoftext" in v]
    # no merge crosses a special token: every word of the corpus lies within one piece between specials
    n_special = tok.encode(CORPUS, allowed_special="all").count(tok.special_tokens["<|endoftext|>"])
    assert n_special == CORPUS.count("<|endoftext|>") > 0
    char = BPETokenizer().train(CORPUS, 120, special_tokens=SPECIALS)
    assert not [t for t in (char.id_to_token(i) for i in range(char.num_ordinary_tokens)) if b"<|" in t]


@pytest.mark.parametrize("cls", [ByteLevelBPETokenizer, BPETokenizer])
def test_encode_iterable_equals_encode(cls):
    tok = cls().train(CORPUS, 300 if cls is ByteLevelBPETokenizer else 120, special_tokens=SPECIALS)
    text = CORPUS[:3000] + "  \n\n   tail<|im_start|>x<|endoftext|>"
    for allowed in ("all", frozenset()):
        kwargs = dict(allowed_special=allowed, disallowed_special=() if not allowed else "all")
        ref = tok.encode(text, **kwargs)
        rng = random.Random(0)
        for _ in range(20):  # random cuts: inside words, whitespace runs and special tokens
            cuts = sorted(rng.sample(range(1, len(text)), 60))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            assert list(tok.encode_iterable(pieces, **kwargs)) == ref
        assert list(tok.encode_iterable(text.splitlines(keepends=True), **kwargs)) == ref
        assert list(tok.encode_iterable(iter(text), **kwargs)) == ref  # one character at a time
    with pytest.raises(ValueError, match="special token"):
        list(tok.encode_iterable(["a<|endof", "text|>b"]))
    with pytest.raises(TypeError, match="str pieces"):
        list(tok.encode_iterable([b"x"]))


def test_encode_iterable_memory_is_bounded():
    tok = ByteLevelBPETokenizer().train(CORPUS, 300, special_tokens=SPECIALS)
    line = DOC.replace("\n", " ") + "\n"

    def lines(n):
        for _ in range(n):
            yield line

    def peak(n):
        tracemalloc.start()
        count = sum(1 for _ in tok.encode_iterable(lines(n)))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return count, top

    n_small, peak_small = peak(200)
    n_big, peak_big = peak(4000)  # 20x the input (~0.4 MB of text)
    assert n_small == len(tok.encode(line * 200)) and n_big == 20 * n_small
    assert peak_big < 2 * peak_small + 64_000, (peak_small, peak_big)


def test_pattern_that_does_not_cover_the_text_is_refused():
    with pytest.raises(ValueError, match=r"does not cover the text: ' ' at character 5"):
        BPETokenizer(pattern=r"\w+").train("hello world, hello world", 40)
    tok = BPETokenizer(pattern=r"\w+|\s+").train("hello world hello world", 30)
    with pytest.raises(ValueError, match=r"',' at character 5 would be dropped"):
        tok.encode("hello, world")
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_bad_tokenizer_files_give_one_clear_error(tmp_path):
    tok = ByteLevelBPETokenizer().train(CORPUS, 280)
    good = tmp_path / "tok.json"
    tok.save(good)
    with pytest.raises(ValueError, match="is a directory"):
        BaseTokenizer.load(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        BaseTokenizer.load(deep)
    state = json.loads(good.read_text())
    state["type"] = "BaseTokenizer"
    abstract = tmp_path / "abstract.json"
    abstract.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="abstract tokenizer type 'BaseTokenizer'"):
        BaseTokenizer.load(abstract)
