"""Lesson 11 advanced tests: fused per-token log-probs equal log_softmax + gather (values and gradients) without
the logits; one concatenated forward equals two; DPO steps raise the margin while the frozen reference stays
bitwise unchanged; precomputing the reference gives the same step."""

import pytest
import torch

from intro2llm import ops
from intro2llm.data import synthetic
from intro2llm.data.dpo_dataset import DPODataset, collate, synthetic_triples
from intro2llm.data.prepare import synthetic_tokenizer
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.training.dpo_trainer import DPOTrainer, sequence_logps
from intro2llm.training.trainer import TrainerConfig


@pytest.fixture(scope="module")
def tok():
    return synthetic_tokenizer(list(synthetic.pretrain_documents(200, seed=0)))


def small_model(tok):
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_fused_logprobs_equal_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (5, 7), generator=g)
    y[:, :3] = -100  # the prompt
    fused = ops.fused_linear_logprobs(h, w, y, temperature=0.8)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    full = torch.log_softmax(h2 @ w2.T / 0.8, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    torch.testing.assert_close(fused, full, atol=1e-5, rtol=1e-5)
    fused.sum(-1).mean().backward()
    full.sum(-1).mean().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.task("sequence_logps")
def test_sequence_logps_sum_the_supervised_tokens_log_probs(tok):
    """By hand from the full logits: token t predicts label t + 1; ignored labels add nothing."""
    model = small_model(tok)
    ids = torch.randint(0, tok.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[1, 6] = -100  # padding
    logps, counts = sequence_logps(model, ids, labels)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)  # (2, 7, V)
    want = [sum(logp[r, t - 1, ids[r, t]].item() for t in range(1, 7) if labels[r, t] != -100) for r in range(2)]
    assert counts.tolist() == [4, 3]
    torch.testing.assert_close(logps.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-5)

@pytest.mark.task("sequence_logps", "DPODataset")
def test_one_concatenated_forward_equals_two(tok):
    model = small_model(tok)
    ds = DPODataset(synthetic_triples(4, seed=1), tok)
    b = collate([ds[i] for i in range(4)], pad_id=0)
    both, _ = sequence_logps(model, torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]),
                             torch.cat([b["chosen_labels"], b["rejected_labels"]]))
    c, _ = sequence_logps(model, b["chosen_input_ids"], b["chosen_labels"])
    r, _ = sequence_logps(model, b["rejected_input_ids"], b["rejected_labels"])
    torch.testing.assert_close(both, torch.cat([c, r]), atol=1e-5, rtol=1e-5)


def _trainer(tok, tmp_path, **kw):
    cfg = TrainerConfig(steps=8, batch_size=8, lr=3e-3, schedule="constant", weight_decay=0.0, progress=False,
                        tensorboard=False, wandb=False, device="cpu", out_dir=str(tmp_path))
    return DPOTrainer(small_model(tok), cfg, DPODataset(synthetic_triples(32, seed=2), tok), beta=0.5, **kw)


@pytest.mark.task("DPOTrainer.compute_loss", "sequence_logps", "DPOLoss", "DPODataset")
def test_dpo_raises_the_margin_reference_frozen(tok, tmp_path):
    tr = _trainer(tok, tmp_path / "a")
    before = [p.detach().clone() for p in tr.ref_model.parameters()]
    hist = tr.train()
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert hist[-1]["rewards/margins"] > 0.1 and hist[-1]["rewards/accuracies"] >= 0.75
    assert all(torch.equal(a, b) for a, b in zip(before, tr.ref_model.parameters()))
    assert not tr.ref_model.training and not any(p.requires_grad for p in tr.ref_model.parameters())


@pytest.mark.task("DPOTrainer.compute_loss", "DPODataset")
def test_precomputed_reference_gives_the_same_step(tok, tmp_path):
    a = _trainer(tok, tmp_path / "b").train_step(next(iter(_trainer(tok, tmp_path / "x").train_data)))
    pre = _trainer(tok, tmp_path / "c", precompute_ref=True)
    assert pre.ref_model is None
    b = pre.train_step(next(iter(pre.train_data)))
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
