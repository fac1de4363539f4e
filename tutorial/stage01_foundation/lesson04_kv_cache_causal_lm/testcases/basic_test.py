"""Lesson 05 basic tests: the whole model — parameter formula, loss at initialization, label shifting, causal
leakage, greedy decoding with and without the KV cache, sampling filters, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from intro2llm.configs import get_config
from intro2llm.model import CausalLM, ModelConfig, top_p_filter
from intro2llm.model.analysis import count_parameters


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_tiny_preset_is_about_ten_million_parameters_and_follows_the_formula():
    c = get_config("tiny")
    V, C, L, F_, Hd, Hkvd = c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.q_size, c.kv_size
    block = 2 * C * Hd + 2 * C * Hkvd + 3 * C * F_ + 2 * C
    formula = V * C + L * block + C + (0 if c.tie_word_embeddings else V * C)
    assert count_parameters(c)["total"] == formula
    assert 9e6 < formula < 11e6


def test_model_parameter_count_equals_analysis():
    for c in (config(), config(tie_word_embeddings=True)):
        assert sum(p.numel() for p in CausalLM(c).parameters()) == count_parameters(c)["total"]


def test_loss_at_initialization_is_log_vocab():
    torch.manual_seed(0)
    model = CausalLM(config(initializer_range=0.002))
    ids = torch.randint(0, 53, (4, 16))
    assert model(ids, labels=ids).loss.item() == pytest.approx(math.log(53), abs=0.05)


def test_labels_are_shifted_inside():
    torch.manual_seed(0)
    model = CausalLM(config())
    ids = torch.randint(0, 53, (2, 9))
    out = model(ids, labels=ids)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 53), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_changing_a_future_token_never_changes_past_logits():
    torch.manual_seed(0)
    model = CausalLM(config()).eval()
    ids = torch.randint(0, 53, (1, 10))
    for t in range(1, 10):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 53
        torch.testing.assert_close(model(ids).logits[:, :t], model(changed).logits[:, :t], atol=0, rtol=0)


def test_greedy_with_cache_equals_without():
    torch.manual_seed(0)
    model = CausalLM(config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (2, 4))
    assert torch.equal(model.generate(ids, 30), model.generate(ids, 30, use_cache=False))


def test_top_p_and_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]  # 0.644, 0.237, 0.087, 0.032; cumulative 0.644, 0.881, 0.968, 1
    assert probs[0] < 0.85 <= probs[:2].sum() < 0.9 <= probs[:3].sum()
    assert top_p_filter(logits, 0.85).isfinite()[0].tolist() == [True, True, False, False]
    assert top_p_filter(logits, 0.9).isfinite()[0].tolist() == [True, True, True, False]
    assert top_p_filter(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]
    torch.manual_seed(0)
    model = CausalLM(config(initializer_range=0.2)).eval()
    ids = torch.randint(0, 53, (1, 3))
    assert torch.equal(model.generate(ids, 8, do_sample=True, temperature=0.0), model.generate(ids, 8))


def test_bad_input():
    model = CausalLM(config())
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[0, 53]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)
