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
@pytest.mark.task("BPETokenizer.train", "ByteLevelBPETokenizer._to_symbols", "BaseTokenizer.decode")
def test_tokenizer_round_trip_on_any_unicode(source_tok, text):
    assert source_tok.decode(source_tok.encode(text, disallowed_special=())) == text


def test_tokenizer_same_ids_as_tiktoken(source_tok):
    text = "".join(list(python_stdlib(300_000))[-10:])
    assert source_tok.encode(text) == source_tok.to_tiktoken().encode_ordinary(text)


def test_tokenizer_same_ids_as_hf_tokenizers(source_tok, tmp_path):
    text = "".join(list(python_stdlib(300_000))[-10:])
    hf = tokenizers.Tokenizer.from_file(source_tok.export_hf(tmp_path))
    assert hf.encode(text).ids == source_tok.encode(text)


@pytest.mark.task("BPETokenizer.train")
def test_bpe_fast_trainer_equals_lesson_loop():
    texts = list(python_stdlib(30_000))
    slow = ByteLevelBPETokenizer().train(texts, 256 + 60, engine="reference")
    fast = ByteLevelBPETokenizer().train(texts, 256 + 60)  # C++ when built, else incremental Python
    assert fast.merges == slow.merges


@pytest.mark.task("BaseTokenizer.encode_batch")
def test_tokenizer_encode_batch(source_tok):
    out = source_tok.encode_batch(["import os", "x"], padding=True)
    a, b = out["input_ids"]
    assert len(a) == len(b) and out["attention_mask"][1] == [1] + [0] * (len(a) - 1)
    assert b[1:] == [source_tok.pad_token_id] * (len(a) - 1)


@pytest.mark.task("BPETokenizer.train")
def test_bpe_more_merges_compress_more():
    files = list(python_stdlib(300_000))
    texts, held = files[:-4], "".join(files[-4:])
    sizes = [len(ByteLevelBPETokenizer().train(texts, v).encode(held)) for v in (256, 400, 800)]
    assert sizes[0] == len(held.encode("utf-8"))  # no merges: one token per byte
    assert sizes[0] > sizes[1] > sizes[2]


# ------------------------------------------------------------------------------------------------------------------
# Part 2: embeddings and positions (appended by the model lessons; own imports, names prefixed test_embedding_/rope_)
# ------------------------------------------------------------------------------------------------------------------
import torch  # noqa: E402

from intro2llm.model import CausalLM, ModelConfig  # noqa: E402
from intro2llm.model.embedding import RotaryEmbedding, rope_inv_freq  # noqa: E402


def _rope_score(rot: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, m: int, n: int) -> float:
    cm, sm = rot(torch.tensor([m]))
    cn, sn = rot(torch.tensor([n]))
    qm, _ = RotaryEmbedding.rotate(q, q, cm, sm)
    kn, _ = RotaryEmbedding.rotate(k, k, cn, sn)
    return (qm * kn).sum().item()


@pytest.mark.task("RotaryEmbedding.rotate", "rope_inv_freq")
def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rot = RotaryEmbedding(16, 256)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    for delta in (0, 3, 17):
        scores = [_rope_score(rot, q, k, m + delta, m) for m in (0, 5, 100, 200)]
        assert max(scores) - min(scores) < 1e-4


@pytest.mark.task("RotaryEmbedding.rotate", "rope_inv_freq")
def test_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=1024,
                      rope_parameters={**scaling, "rope_theta": 500000.0})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(32, 500000.0, scaling), expected.float())
    rot = RotaryEmbedding(32, 1024, 500000.0, scaling)
    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 2, 6, 32)
    cos, sin = rot(torch.arange(300, 306).expand(2, 6))
    ours = RotaryEmbedding.rotate(q, k, cos, sin)
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])


@pytest.mark.task("rope_inv_freq")
def test_rope_linear_scaling_is_position_interpolation():
    plain = RotaryEmbedding(16, 512)
    scaled = RotaryEmbedding(16, 512, scaling={"rope_type": "linear", "factor": 8.0})
    c1, s1 = scaled(torch.tensor([8, 80, 400]))
    c0, s0 = plain(torch.tensor([1, 10, 50]))
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=0)


@pytest.mark.task("SinusoidalPositionalEncoding.forward")
def test_embedding_model_without_rope_is_order_sensitive_only_through_positions():
    # With no position information at all, attention would not see token order; the sinusoidal table fixes it.
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, use_rope=False)).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    swapped = torch.tensor([[2, 1, 3, 4]])
    assert not torch.allclose(model(ids).logits[0, -1], model(swapped).logits[0, -1])


# ---- course mode, --include-kernels: the Triton forward kernel (on CPU it runs in Triton's interpreter), fp32
@pytest.mark.skipif("triton" not in __import__("intro2llm.ops", fromlist=["x"]).available_backends(),
                    reason="triton: not installed (pip install triton)")
@pytest.mark.task("_rope_kernel")
def test_triton_rope_kernel_matches_reference():
    import intro2llm.ops as ops

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    ang = torch.randn(8, 8)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    for got, want in zip(ops.apply_rope(q, k, cos, sin, backend="triton"), ops.apply_rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
