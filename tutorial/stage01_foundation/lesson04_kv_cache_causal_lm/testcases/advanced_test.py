"""Lesson 04 advanced tests: token-by-token decoding with a KV cache equals the whole sequence (attention, block),
learning (overfit one batch), left-padded batched generation equals each row alone, streaming, sampling
frequencies, fused loss, and logits equal to transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from intro2llm.model import (
    CausalLM,
    DynamicKVCache,
    GroupedQueryAttention,
    ModelConfig,
    RotaryEmbedding,
    StaticKVCache,
    TransformerBlock,
    sample_next_token,
)
from intro2llm.model.attention import causal_mask
from intro2llm.testing import tiny_config

MODEL = ("CausalLM.__init__", "CausalLM.forward")
GENERATE = ("CausalLM.generate", "CausalLM.stream_generate", "sample_next_token")


def attn_config(**kw) -> ModelConfig:
    return tiny_config(**{"vocab_size": 50, "num_hidden_layers": 1, **kw})


def block_config(**kw) -> ModelConfig:
    return tiny_config(**{"vocab_size": 50, "intermediate_size": 80, "num_hidden_layers": 1, **kw})


# ---- the KV cache inside attention and the block
@pytest.mark.task("StaticKVCache.update")
def test_decoding_with_cache_equals_full_attention():
    torch.manual_seed(0)
    cfg = attn_config()
    attn = GroupedQueryAttention(cfg)
    x = torch.randn(2, 8, 32)
    full = attn(x)
    cache = StaticKVCache.from_config(cfg, batch_size=2, max_seq_len=8)
    outs = [attn(x[:, :5], kv_cache=cache)]
    cache.advance(5)
    for t in range(5, 8):  # one token at a time: Tq = 1, Tk = t + 1
        outs.append(attn(x[:, t : t + 1], kv_cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert causal_mask(1, 8).all()


@pytest.mark.task("DynamicKVCache.update")
def test_block_with_rope_and_cache_token_by_token_equals_full_sequence():
    torch.manual_seed(0)
    c = block_config()
    blk = TransformerBlock(c)
    rope = RotaryEmbedding(c.head_dim, c.max_position_embeddings)
    x = torch.randn(2, 7, 32)
    full = blk(x, rope(torch.arange(7)))
    cache = DynamicKVCache()
    steps = []
    for t in range(7):
        steps.append(blk(x[:, t : t + 1], rope(torch.tensor([t])), cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# ---- the model
@pytest.mark.task(*MODEL)
def test_overfits_one_batch():
    torch.manual_seed(0)
    model = CausalLM(tiny_config())
    ids = torch.randint(0, 53, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = model(ids, labels=ids, return_logits=False).loss  # fused linear + cross-entropy
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.3


@pytest.mark.task(*GENERATE, "CausalLM._decode_cached")
def test_left_padded_generation_equals_each_row_alone():
    torch.manual_seed(1)
    model = CausalLM(tiny_config(initializer_range=0.2)).eval()
    a, b = torch.randint(1, 53, (2,)), torch.randint(1, 53, (5,))
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[0, 3:], ids[1] = a, b
    mask = (torch.arange(5) >= torch.tensor([[3], [0]])).long()
    out = model.generate(ids, 10, attention_mask=mask)
    assert torch.equal(out[0, 5:], model.generate(a[None], 10)[0, 2:])
    assert torch.equal(out[1, 5:], model.generate(b[None], 10)[0, 5:])


@pytest.mark.task("CausalLM.stream_generate", "CausalLM.generate")
def test_streaming_yields_one_token_per_step():
    torch.manual_seed(2)
    model = CausalLM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (1, 3))
    tokens = [int(t) for t in model.stream_generate(ids, 6)]
    assert tokens == model.generate(ids, 6)[0, 3:].tolist()


@pytest.mark.task("sample_next_token", "top_k_filter")
def test_sampling_frequencies_follow_softmax_with_temperature_and_top_k():
    logits = torch.tensor([1.0, 0.5, 0.0, -3.0])
    n = 30000
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(n, 4), do_sample=True, temperature=0.7, top_k=3, generator=g)
    expected = torch.softmax(torch.tensor([1.0, 0.5, 0.0]) / 0.7, -1)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq[:3], expected, atol=0.01, rtol=0)
    assert freq[3] == 0  # outside the top 3


@pytest.mark.task(*MODEL)
def test_logits_equal_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = CausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 53, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
