"""The C++ byte-level encoder (``csrc/cpu/bpe_encode.cpp``: hand-written GPT-2 / cl100k scanner + tiktoken merge)
against the Python path (``regex`` pre-tokenization + per-word BPE) and tiktoken, on real source and on
arbitrary Unicode, plus its fallback and argument checks.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intro2llm.data.corpora import python_stdlib
from intro2llm.tokenizer import ByteLevelBPETokenizer
from intro2llm.tokenizer.byte_level_tokenizer import native_encoder_available

pytestmark = pytest.mark.skipif(not native_encoder_available(), reason="intro2llm._C is not built (CI builds it)")


@pytest.fixture(scope="module", params=["gpt2", "cl100k"])
def pair(request):
    """The same vocabulary twice: one tokenizer on the Python path, one on the C++ path."""
    texts = list(python_stdlib(200_000))
    py = ByteLevelBPETokenizer(request.param, encoder="python").train(texts, 700)
    cpp = ByteLevelBPETokenizer(request.param, encoder="cpp")
    cpp._set_vocab(py.alphabet, py.merges)
    return py, cpp, py.to_tiktoken()


def test_cpp_encoder_matches_python_and_tiktoken_on_source(pair):
    py, cpp, enc = pair
    text = "".join(list(python_stdlib(400_000))[-40:])
    ids = cpp.encode(text)
    assert ids == py.encode(text) == enc.encode_ordinary(text)


def test_cpp_encoder_on_tricky_characters(pair):
    py, cpp, enc = pair
    rng = random.Random(0)
    # contractions in both cases, long s (folds to 's' under cl100k's (?i)), CR/LF runs, Unicode spaces, digits
    alphabet = "aZé中🙂 \n\r\t0123٣'sStTlLvVeEdDmMrRſ=_.ß\u00a0\u2028\u3000\x1c\x85"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert cpp.encode(text) == py.encode(text) == enc.encode_ordinary(text), repr(text)
    for text in ["a" * 3000, " " * 2000 + "x", "\r\n" * 500, "9" * 1001, "", " ", "\n", "'"]:
        assert cpp.encode(text) == py.encode(text) == enc.encode_ordinary(text), repr(text[:20])


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(text=st.text(max_size=100))
def test_cpp_encoder_on_any_unicode(pair, text):
    py, cpp, _ = pair
    assert cpp.encode(text, disallowed_special=()) == py.encode(text, disallowed_special=())


def test_custom_pattern_falls_back_to_python():
    tok = ByteLevelBPETokenizer(r"\w+|\W+").train(["hello world, hello"], 270)
    assert tok._native() is None  # the C++ scanner implements gpt2 and cl100k only
    assert tok.decode(tok.encode("hello world")) == "hello world"
    strict = ByteLevelBPETokenizer(r"\w+|\W+", encoder="cpp")
    with pytest.raises(RuntimeError, match="gpt2"):
        strict.encode("x")
    with pytest.raises(ValueError, match="encoder"):
        ByteLevelBPETokenizer(encoder="rust")


def test_cpp_encoder_checks_its_arguments():
    import torch

    from intro2llm.tokenizer.byte_level_tokenizer import _char_classes

    data = torch.arange(255, dtype=torch.uint8)  # byte 255 missing
    offsets = torch.arange(256, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="byte 255"):
        torch.ops.intro2llm.bpe_encoder_new(data, offsets, _char_classes(), 0)
    with pytest.raises(RuntimeError, match="pattern"):
        torch.ops.intro2llm.bpe_encoder_new(data, offsets, _char_classes(), 7)
    with pytest.raises(RuntimeError, match="unknown encoder handle"):
        torch.ops.intro2llm.bpe_encode(10**9, torch.zeros(3, dtype=torch.uint8))
