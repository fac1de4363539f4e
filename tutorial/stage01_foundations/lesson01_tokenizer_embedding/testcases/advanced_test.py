"""Lesson 01 advanced tests: properties and interop — round trip on arbitrary Unicode (hypothesis), same ids as
tiktoken and Hugging Face tokenizers, the fast trainer equal to the lesson's loop, batching, compression."""

from __future__ import annotations

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intro2llm.data.corpora import python_stdlib
from intro2llm.tokenizer import ByteLevelBPETokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def source_tok() -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer().train(list(python_stdlib(200_000)), 800, special_tokens=[EOT], pad_token=EOT)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_tokenizer_round_trip_on_any_unicode(source_tok, text):
    assert source_tok.decode(source_tok.encode(text, disallowed_special=())) == text


def test_tokenizer_same_ids_as_tiktoken(source_tok):
    text = "".join(list(python_stdlib(300_000))[-10:])
    assert source_tok.encode(text) == source_tok.to_tiktoken().encode_ordinary(text)


def test_tokenizer_same_ids_as_hf_tokenizers(source_tok, tmp_path):
    text = "".join(list(python_stdlib(300_000))[-10:])
    hf = tokenizers.Tokenizer.from_file(source_tok.export_hf(tmp_path))
    assert hf.encode(text).ids == source_tok.encode(text)


def test_bpe_fast_trainer_equals_lesson_loop():
    texts = list(python_stdlib(30_000))
    slow = ByteLevelBPETokenizer().train(texts, 256 + 60, engine="reference")
    fast = ByteLevelBPETokenizer().train(texts, 256 + 60)  # C++ when built, else incremental Python
    assert fast.merges == slow.merges


def test_tokenizer_encode_batch(source_tok):
    out = source_tok.encode_batch(["import os", "x"], padding=True)
    a, b = out["input_ids"]
    assert len(a) == len(b) and out["attention_mask"][1] == [1] + [0] * (len(a) - 1)
    assert b[1:] == [source_tok.pad_token_id] * (len(a) - 1)


def test_bpe_more_merges_compress_more():
    files = list(python_stdlib(300_000))
    texts, held = files[:-4], "".join(files[-4:])
    sizes = [len(ByteLevelBPETokenizer().train(texts, v).encode(held)) for v in (256, 400, 800)]
    assert sizes[0] == len(held.encode("utf-8"))  # no merges: one token per byte
    assert sizes[0] > sizes[1] > sizes[2]
