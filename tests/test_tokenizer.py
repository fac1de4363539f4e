"""Package tests for intro2llm.tokenizer: tiktoken and Hugging Face parity on real text, special tokens against
tiktoken's rules, batching, decoding robustness, save/load (format checks, atomic writes), corpora and CLI.

Oracles: ``tiktoken`` (built from our ranks) and ``tokenizers`` (loading our exported tokenizer.json, and its own
BPE trainer). Training-engine equality lives in ``test_tokenizer_train.py``.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys

import pytest
import tiktoken
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intro2llm.data.corpora import decode_source, python_stdlib, stdlib_files
from intro2llm.tokenizer import BaseTokenizer, BPETokenizer, ByteLevelBPETokenizer
from intro2llm.tokenizer.byte_level_tokenizer import UNICODE_TO_BYTE, native_encoder_available

EOT = "<|endoftext|>"
PAD = "<|pad|>"


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], str]:
    """~300 KB of stdlib source to train on, and ~150 KB of later (held-out) files to test on."""
    texts = list(python_stdlib(450_000))
    train, held = texts[: len(texts) * 2 // 3], texts[len(texts) * 2 // 3 :]
    return train, "".join(held)


ENCODERS = ["python", "cpp"] if native_encoder_available() else ["python"]  # CI builds intro2llm._C


@pytest.fixture(scope="module", params=[(p, e) for p in ("gpt2", "cl100k") for e in ENCODERS], ids="-".join)
def tok(request, corpus) -> ByteLevelBPETokenizer:
    """A byte-level tokenizer trained on stdlib source, for each pattern x encoder (Python path, C++ path)."""
    train, _ = corpus
    pattern, encoder = request.param
    return ByteLevelBPETokenizer(pattern, encoder=encoder).train(
        train, 1200, special_tokens=[EOT, PAD], eos_token=EOT, pad_token=PAD
    )


# ---- tiktoken parity -----------------------------------------------------------------------------------------
def test_tiktoken_parity_on_held_out_source(tok, corpus):
    _, held = corpus
    enc = tok.to_tiktoken()
    ids = tok.encode(held)
    assert ids == enc.encode_ordinary(held)
    assert enc.n_vocab == tok.vocab_size
    assert tok.decode(ids) == held == enc.decode(ids)


def test_tiktoken_parity_on_mixed_scripts_and_long_words(tok):
    rng = random.Random(0)
    alphabet = "aé中🙂 \n\t0123'sxyz=_.ßΩ\u00a0\u2028"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(200)]
    texts += ["a" * 5000, " " * 3000 + "x", "=" * 999, "🙂" * 700, "def " * 200]  # long words: the heap path
    enc = tok.to_tiktoken()
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(text), text[:40]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(text=st.text(max_size=200))
def test_tiktoken_parity_and_round_trip_on_any_unicode(tok, text):
    ids = tok.encode(text, disallowed_special=())
    assert ids == _tiktoken_of(tok).encode(text, disallowed_special=())
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return  # lone surrogates are not UTF-8: replaced by U+FFFD (test_lone_surrogates_are_replaced_like_tiktoken)
    assert tok.decode(ids) == text


_TIKTOKEN_CACHE: dict[int, tiktoken.Encoding] = {}


def _tiktoken_of(tok: ByteLevelBPETokenizer) -> tiktoken.Encoding:
    if id(tok) not in _TIKTOKEN_CACHE:
        _TIKTOKEN_CACHE[id(tok)] = tok.to_tiktoken()
    return _TIKTOKEN_CACHE[id(tok)]


def test_lone_surrogates_are_replaced_like_tiktoken(tok):
    text = "ab\ud800cd"
    assert tok.encode(text) == _tiktoken_of(tok).encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == "ab\ufffdcd"


# ---- special tokens: tiktoken's rules ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "allowed, disallowed",
    [((), ()), ("all", "all"), ({EOT}, "all"), ({EOT}, ()), ((), {PAD}), ({PAD}, {EOT}), ((), "all")],
)
def test_special_tokens_follow_tiktoken(tok, allowed, disallowed):
    enc = _tiktoken_of(tok)
    tk_allowed = allowed if allowed == "all" else set(allowed)  # tiktoken wants sets
    tk_disallowed = disallowed if disallowed == "all" else set(disallowed)
    for text in [f"x = 1{EOT}y{PAD}{PAD}z", "no specials here", f"{EOT}", f"<|endof{EOT}text|>"]:
        try:
            expected = enc.encode(text, allowed_special=tk_allowed, disallowed_special=tk_disallowed)
        except ValueError:
            with pytest.raises(ValueError, match="special token"):
                tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
            continue
        assert tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected


def test_special_token_roles_and_unknown_special(tok):
    assert tok.eos_token_id == tok.special_tokens[EOT] and tok.pad_token_id == tok.special_tokens[PAD]
    assert tok.bos_token_id is None and tok.unk_token_id is None
    assert tok.encode(EOT, allowed_special={EOT}) == [tok.eos_token_id]
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="bos_token"):
        ByteLevelBPETokenizer().train(["some text"], 300, bos_token="<s>")


# ---- batching and decoding -----------------------------------------------------------------------------------
def test_encode_batch_padding_truncation_mask(tok):
    texts = ["def f(x):\n    return x\n", "a", ""]
    singles = [tok.encode(t) for t in texts]
    out = tok.encode_batch(texts, padding="longest")
    width = max(map(len, singles))
    pad = tok.pad_token_id
    for ids, mask, single in zip(out["input_ids"], out["attention_mask"], singles):
        assert len(ids) == width == len(mask)
        assert ids[: len(single)] == single and set(ids[len(single) :]) <= {pad}
        assert mask == [1] * len(single) + [0] * (width - len(single))
    left = tok.encode_batch(texts, padding="max_length", max_length=4, truncation=True, padding_side="left")
    for ids, mask, single in zip(left["input_ids"], left["attention_mask"], singles):
        kept = single[:4]
        assert ids == [pad] * (4 - len(kept)) + kept and mask == [0] * (4 - len(kept)) + [1] * len(kept)
    assert tok.encode_batch(texts)["input_ids"] == singles
    assert tok.decode_batch(singles) == texts
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(texts, truncation=True)
    with pytest.raises(TypeError):
        tok.encode_batch("a single string")
    nopad = ByteLevelBPETokenizer().train(texts, 260)
    with pytest.raises(ValueError, match="pad"):
        nopad.encode_batch(texts, padding=True)


def test_decode_never_raises_and_matches_tiktoken(tok):
    rng = random.Random(1)
    enc = _tiktoken_of(tok)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        assert tok.decode(ids) == enc.decode(ids)
    euro = "€".encode()  # three bytes: decoding only the first two must not raise
    assert tok.decode([euro[0], euro[1]]) == "\ufffd"
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([-1])


# ---- Hugging Face tokenizers interop ---------------------------------------------------------------------------
def test_export_hf_gives_our_ids_and_from_hf_reads_it_back(tok, corpus, tmp_path):
    _, held = corpus
    path = tok.export_hf(tmp_path / "hf")
    hf = tokenizers.Tokenizer.from_file(path)
    ids = tok.encode(held)
    assert hf.encode(held).ids == ids
    assert hf.decode(ids, skip_special_tokens=False) == held
    with_special = f"a{EOT}b"
    assert hf.encode(with_special).ids == tok.encode(with_special, allowed_special="all")
    back = ByteLevelBPETokenizer.from_hf(tmp_path / "hf")
    assert back.pattern == tok.pattern and back.special_tokens == tok.special_tokens
    assert back.encode(held) == ids


def test_from_hf_reads_a_tokenizers_trained_file(corpus, tmp_path):
    from tokenizers import Regex, models, pre_tokenizers, trainers

    train, held = corpus
    pattern = ByteLevelBPETokenizer("gpt2").pattern
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(train[:20], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = ByteLevelBPETokenizer.from_hf(tmp_path)
    assert ours.vocab_size == hf.get_vocab_size()
    for i in range(ours.vocab_size):  # same bytes for every id
        assert ours.id_to_token(i) == bytes(UNICODE_TO_BYTE[c] for c in hf.id_to_token(i))
    assert ours.decode(ours.encode(held[:20000])) == held[:20000]


def test_from_hf_rejects_foreign_files(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="tokenizer.json.*BPE"):
        ByteLevelBPETokenizer.from_hf(bad)


# ---- save / load -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tok, corpus, tmp_path):
    _, held = corpus
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "intro2llm.tokenizer" and data["version"] == 1 and data["type"] == "ByteLevelBPETokenizer"
    back = BaseTokenizer.load(path)
    assert type(back) is ByteLevelBPETokenizer
    assert back.encode(held[:30000]) == tok.encode(held[:30000])
    assert back.special_tokens == tok.special_tokens and back.roles == tok.roles
    char = BPETokenizer().train(held[:20000], 300)
    char.save(tmp_path / "char.json")
    char_back = BPETokenizer.load(tmp_path / "char.json")
    assert char_back.encode(held[:5000]) == char.encode(held[:5000])
    with pytest.raises(ValueError, match="not a ByteLevelBPETokenizer"):
        ByteLevelBPETokenizer.load(tmp_path / "char.json")


def test_save_is_atomic(tok, tmp_path, monkeypatch):
    path = tmp_path / "tok.json"
    tok.save(path)
    before = path.read_bytes()

    def full_disk(fd):  # the new file is written but cannot be made durable
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full"):
        tok.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["tok.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid UTF-8 JSON"),
        (json.dumps({"model": {"type": "BPE"}}), "not an intro2llm tokenizer"),
        (json.dumps({"format": "intro2llm.tokenizer", "version": 99}), "version 99"),
        (json.dumps({"format": "intro2llm.tokenizer", "version": 1, "type": "Evil"}), "type 'Evil'"),
        (
            json.dumps(
                {
                    "format": "intro2llm.tokenizer",
                    "version": 1,
                    "type": "ByteLevelBPETokenizer",
                    "pattern": "gpt2",
                    "alphabet": ["a"],
                    "merges": [],
                }
            ),
            "256 byte symbols",
        ),
        (
            json.dumps(
                {
                    "format": "intro2llm.tokenizer",
                    "version": 1,
                    "type": "BPETokenizer",
                    "pattern": "gpt2",
                    "alphabet": ["a", "b"],
                    "merges": [["a", "c"]],
                }
            ),
            "merge #0",
        ),
        (
            json.dumps(
                {
                    "format": "intro2llm.tokenizer",
                    "version": 1,
                    "type": "BPETokenizer",
                    "pattern": "(",
                    "alphabet": ["a"],
                    "merges": [],
                }
            ),
            "not a valid regex",
        ),
        (
            json.dumps(
                {
                    "format": "intro2llm.tokenizer",
                    "version": 1,
                    "type": "BPETokenizer",
                    "pattern": "gpt2",
                    "alphabet": ["a"],
                    "merges": [],
                    "special_tokens": {"<s>": 5},
                }
            ),
            "special-token ids",
        ),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        BaseTokenizer.load(path)
    assert "broken.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BaseTokenizer.load(tmp_path / "missing.json")


# ---- bad training input ---------------------------------------------------------------------------------------------
def test_training_rejects_bad_input():
    with pytest.raises(ValueError, match="256 byte tokens plus 1 special"):
        ByteLevelBPETokenizer().train(["abc"], 256, special_tokens=[EOT])
    with pytest.raises(ValueError, match="empty corpus"):
        ByteLevelBPETokenizer().train([], 300)
    with pytest.raises(ValueError, match="empty corpus"):
        ByteLevelBPETokenizer().train(["", ""], 300)
    with pytest.raises(ValueError, match="base symbols"):
        BPETokenizer().train(["abcdef"], 4)
    with pytest.raises(TypeError, match="str"):
        ByteLevelBPETokenizer().train([b"bytes"], 300)
    with pytest.raises(ValueError, match="pattern"):
        ByteLevelBPETokenizer("(unclosed")
    with pytest.raises(TypeError):
        ByteLevelBPETokenizer().encode(b"bytes")


def test_char_level_unknown_characters_become_unk():
    tok = BPETokenizer().train(["hello hello world"], 20)
    ids = tok.encode("hello 中")
    assert ids[-1] == tok.unk_token_id and tok.unk_token_id == tok.special_tokens["<unk>"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


# ---- corpora ---------------------------------------------------------------------------------------------------
def test_python_stdlib_corpus(tmp_path):
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f for f in files)
    texts = list(python_stdlib(100_000))
    assert texts == list(python_stdlib(100_000))  # deterministic
    assert sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= 100_000 + 3 * len(texts)
    assert all(isinstance(t, str) for t in texts)
    (tmp_path / "a.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    (tmp_path / "b.py").write_bytes(b"# -*- coding: no-such-codec -*-\nx = '\xff\xfe'\n")
    (tmp_path / "c.txt").write_text("not python")
    got = list(python_stdlib(root=str(tmp_path)))
    assert got[0].endswith("x = 'é'\n") and "\ufffd" in got[1] and len(got) == 2
    assert decode_source("ok ✓".encode()) == "ok ✓"


def test_stdlib_has_non_utf8_files_and_reading_them_does_not_crash():
    odd = [f for f in stdlib_files() if f.endswith(("module_iso_8859_1.py", "module_koi8_r.py"))]
    if not odd:
        pytest.skip(reason="this Python's stdlib ships without its test/encoded_modules files")
    for path in odd:
        with open(path, "rb") as f:
            text = decode_source(f.read())
        assert "\ufffd" not in text  # decoded with its declared codec, not replaced


# ---- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_train_and_encode(tmp_path, corpus, monkeypatch, capsys):
    from intro2llm.cli import main

    train, held = corpus
    src = tmp_path / "corpus.txt"
    src.write_text("".join(train[:10]), encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(out), "--quiet"]) == 0
    tok = BaseTokenizer.load(out)
    assert tok.vocab_size == 400 and tok.eos_token_id == 399
    text = held[:2000] + EOT
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(out)]) == 0
    printed = [int(x) for x in capsys.readouterr().out.split()]
    assert printed == tok.encode(text, disallowed_special=())
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "nope"),
                "--vocab-size",
                "300",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )


def test_pickle_and_deepcopy_keep_encoding(tok, corpus):
    import copy
    import pickle

    _, held = corpus
    expected = tok.encode(held[:5000])
    clone = pickle.loads(pickle.dumps(tok))
    deep = copy.deepcopy(tok)
    del deep  # freeing a copy must not break the original's C++ encoder
    assert clone.encode(held[:5000]) == expected == tok.encode(held[:5000])
