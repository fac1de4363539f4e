"""Generation: cached == uncached greedy (also left-padded batches), sampling filters against transformers'
logits processors, sampling distributions, eos handling, streaming, bad input."""

from __future__ import annotations

import pytest
import torch

from intro2llm.model import CausalLM, ModelConfig, sample_next_token, top_k_filter, top_p_filter
from intro2llm.model.causal_lm import apply_repetition_penalty
from intro2llm.model.fast_decode import DecodeWeights


def make_model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    base = dict(vocab_size=71, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=96, initializer_range=0.2)
    return CausalLM(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"use_rope": False, "use_rms_norm": False},
                                {"attention_bias": True, "tie_word_embeddings": True}])
def test_greedy_cache_equals_no_cache(kw):
    model = make_model(**kw)
    ids = torch.randint(0, 71, (2, 5))
    with_cache = model.generate(ids, 30)
    without = model.generate(ids, 30, use_cache=False)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :5], ids)


def test_left_padded_batch_equals_each_row_alone():
    model = make_model(1)
    rows = [torch.randint(1, 71, (n,)) for n in (3, 7, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batched = model.generate(ids, 20, attention_mask=mask)
    uncached = model.generate(ids, 20, attention_mask=mask, use_cache=False)
    assert torch.equal(batched, uncached)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], 20)
        assert torch.equal(batched[i, T:], alone[0, len(r):]), f"row {i}"


def test_stream_generate_yields_the_same_tokens():
    model = make_model(2)
    ids = torch.randint(0, 71, (2, 4))
    steps = list(model.stream_generate(ids, 12))
    assert len(steps) == 12 and steps[0].shape == (2,)
    assert torch.equal(torch.cat([ids, torch.stack(steps, 1)], 1), model.generate(ids, 12))


def test_eos_stops_and_pads_finished_rows():
    model = make_model(3)
    ids = torch.randint(0, 71, (2, 4))
    free = model.generate(ids, 15)
    eos = int(free[0, 6])  # a token row 0 produces at step 2
    out = model.generate(ids, 15, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == 0 for t in row0[first + 1:])
    if eos not in free[1, 4:].tolist():
        assert out.shape[1] == 19  # row 1 never finished: ran to max_new_tokens
    else:
        assert eos in out[1, 4:].tolist()


def test_temperature_to_zero_equals_greedy():
    model = make_model(4)
    ids = torch.randint(0, 71, (3, 4))
    greedy = model.generate(ids, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, 10, do_sample=True, temperature=0.0), greedy)
    assert torch.equal(model.generate(ids, 10, do_sample=True, temperature=1e-4, generator=g), greedy)


def test_sampling_is_reproducible_with_a_generator():
    model = make_model(5)
    ids = torch.randint(0, 71, (2, 3))
    a = model.generate(ids, 10, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = model.generate(ids, 10, do_sample=True, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    ids = torch.randint(0, 50, (6, 4))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_filter(logits, p).isinf(), TopPLogitsWarper(p)(ids, logits.clone()).isinf())
    assert torch.equal(top_k_filter(logits, 7).isinf(), TopKLogitsWarper(7)(ids, logits.clone()).isinf())
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_top_p_keeps_smallest_set_with_enough_mass_and_samples_its_renormalized_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    assert top_p_filter(logits, 0.8).isfinite().sum() == 2  # 0.5 + 0.3 reaches 0.8
    assert top_p_filter(logits, 0.81).isfinite().sum() == 3
    assert top_p_filter(logits, 0.3).isfinite().sum() == 1
    n = 40000
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(n, 4), do_sample=True, top_p=0.81, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    hot = sample_next_token(logits.expand(n, 4), do_sample=True, temperature=2.0, generator=g)
    expected_hot = torch.softmax(logits[0] / 2.0, -1)
    torch.testing.assert_close(torch.bincount(hot, minlength=4).float() / n, expected_hot, atol=0.01, rtol=0)


def test_repetition_penalty_changes_greedy_output():
    model = make_model(6)
    ids = torch.randint(0, 71, (1, 4))
    plain = model.generate(ids, 30)
    penalized = model.generate(ids, 30, repetition_penalty=5.0)
    assert len(set(penalized[0, 4:].tolist())) >= len(set(plain[0, 4:].tolist()))
    assert len(set(penalized[0, 4:].tolist())) == 30  # a strong penalty forbids repeats on this model


def test_generate_bad_input():
    model = make_model()
    ids = torch.randint(0, 71, (1, 4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[71]]), 3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, 93)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, 3, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 3, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, 3, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    assert torch.equal(model.generate(ids, 0), ids)


def test_generated_ids_can_feed_a_training_step():
    # RL trainers (PPO/GRPO) generate, then run a forward with autograd on the same ids: they must not be
    # inference tensors (which autograd refuses to save for backward).
    model = make_model(7)
    out = model.generate(torch.randint(0, 71, (2, 3)), 5)
    model.train()
    loss = model(out, labels=out).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_fast_decode_path_equals_module_path():
    # A swapped linear (as LoRA / 4-bit layers do) disables the fused decode step; both paths give the same tokens.
    model = make_model(8)
    ids = torch.randint(0, 71, (3, 4))
    assert DecodeWeights.from_model(model) is not None
    fast = model.generate(ids, 25)

    class PlainSubclass(torch.nn.Linear):
        pass

    old = model.layers[0].self_attn.q_proj
    new = PlainSubclass(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    model.layers[0].self_attn.q_proj = new
    assert DecodeWeights.from_model(model) is None
    assert torch.equal(model.generate(ids, 25), fast)


def test_bfloat16_generation_runs():
    model = make_model(9).to(torch.bfloat16)
    out = model.generate(torch.randint(0, 71, (2, 3)), 6, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert out.shape == (2, 9) and int(out.max()) < 71


def test_repetition_penalty_ignores_pad_ids_but_not_real_repeats():
    model = make_model(10)
    ids = torch.tensor([[0, 0, 5, 9, 0]])  # id 0 is both padding (first two) and a real token (last)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    padded = model.generate(ids, 8, attention_mask=mask, repetition_penalty=3.0)
    alone = model.generate(ids[:, 2:], 8, repetition_penalty=3.0)
    assert torch.equal(padded[0, 5:], alone[0, 3:])
