"""Lesson 05 advanced tests: learning (overfit one batch), left-padded batched generation equals each row alone,
streaming, sampling frequencies, fused loss, and logits equal to transformers' LlamaForCausalLM."""

from __future__ import annotations

import torch

from intro2llm.model import CausalLM, ModelConfig, sample_next_token


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = CausalLM(config())
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


def test_left_padded_generation_equals_each_row_alone():
    torch.manual_seed(1)
    model = CausalLM(config(initializer_range=0.2)).eval()
    a, b = torch.randint(1, 53, (2,)), torch.randint(1, 53, (5,))
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[0, 3:], ids[1] = a, b
    mask = (torch.arange(5) >= torch.tensor([[3], [0]])).long()
    out = model.generate(ids, 10, attention_mask=mask)
    assert torch.equal(out[0, 5:], model.generate(a[None], 10)[0, 2:])
    assert torch.equal(out[1, 5:], model.generate(b[None], 10)[0, 5:])


def test_streaming_yields_one_token_per_step():
    torch.manual_seed(2)
    model = CausalLM(config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (1, 3))
    tokens = [int(t) for t in model.stream_generate(ids, 6)]
    assert tokens == model.generate(ids, 6)[0, 3:].tolist()


def test_sampling_frequencies_follow_softmax_with_temperature_and_top_k():
    logits = torch.tensor([1.0, 0.5, 0.0, -3.0])
    n = 30000
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(n, 4), do_sample=True, temperature=0.7, top_k=3, generator=g)
    expected = torch.softmax(torch.tensor([1.0, 0.5, 0.0]) / 0.7, -1)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq[:3], expected, atol=0.01, rtol=0)
    assert freq[3] == 0  # outside the top 3


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
