"""Lesson 05 advanced tests: the estimates against measurements on the real model — FLOPs against
``torch.utils.flop_counter.FlopCounterMode`` (forward and forward + backward), training memory against the tensors
autograd saves and the peak of a training step measured by the PyTorch profiler."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from intro2llm import ops
from intro2llm.model import CausalLM, ModelConfig
from intro2llm.model.analysis import estimate_flops, estimate_memory
from intro2llm.ops._dispatch import extension_error


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128)
    return ModelConfig(**{**base, **kw})


@pytest.mark.task("estimate_flops")
@pytest.mark.parametrize("kw", [{}, dict(ffn_type="relu", num_key_value_heads=6), dict(tie_word_embeddings=True)])
def test_estimate_flops_matches_flop_counter(kw):
    c = config(**kw)
    torch.manual_seed(0)
    model = CausalLM(c)
    B, T = 2, 64
    ids = torch.randint(0, c.vocab_size, (B, T))
    est = estimate_flops(c, T)
    # the reference attention is plain matmuls, which FlopCounterMode counts (a fused kernel would be invisible)
    with ops.use_backend("reference"), FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(ids)
    assert forward.get_total_flops() == pytest.approx(B * est["forward_per_sequence"], rel=0.05)
    with ops.use_backend("reference"), FlopCounterMode(display=False) as training:
        model(ids, labels=ids).loss.backward()
    assert training.get_total_flops() == pytest.approx(B * est["training_per_sequence"], rel=0.05)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _profiled_peak(fn) -> int:
    """Peak of (allocated - freed) bytes on the CPU while ``fn`` runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.task("estimate_memory")
def test_estimate_memory_matches_a_measured_training_step():
    err = extension_error()
    if err is not None:
        pytest.skip(f"needs the compiled flash attention (intro2llm._C): the estimate assumes O(T) saved state per "
                    f"query row, the reference kernel keeps the T x T probabilities ({err})")
    c = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    B, T = 4, 64
    torch.manual_seed(0)
    model = CausalLM(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, c.vocab_size, (B, T))
    est = estimate_memory(c, B, T, "float32", "adamw")

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()

    with ops.use_backend("cpp"):
        step()  # the first step creates AdamW's state
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in gradient accumulation
        # weights, gradients and optimizer state: exact
        assert _nbytes(model.parameters()) == est["weights"]
        assert _nbytes(p.grad for p in model.parameters()) == est["gradients"]
        state = [s for st in opt.state.values() for s in st.values() if torch.is_tensor(s) and s.dim() > 0]
        assert _nbytes(state) == est["optimizer"]
        # activations: the tensors autograd keeps for the backward pass (parameters excluded)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        del loss
        assert sum(saved.values()) == pytest.approx(est["activations"], rel=0.25)
        # the whole step: what was resident before it plus the profiler's peak during it
        resident = _nbytes(model.parameters()) + _nbytes(p.grad for p in model.parameters()) + _nbytes(state)
        measured = resident + _profiled_peak(step)
    assert measured == pytest.approx(est["training_total"], rel=0.25)
