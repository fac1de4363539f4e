"""DPOLoss against TRL's DPOTrainer loss code (the oracle) on random fp64 log-probs: every variant, cDPO label
smoothing, IPO on length-normalized log-ratios, reference-free, TRL's metrics; known answers; bad input.

TRL (1.x) computes its loss inside ``DPOTrainer._compute_loss(model, inputs)``; the test runs that very method on
a stand-in ``self`` and a stand-in model whose per-token log-probs sum to the chosen/rejected values we pick, with
the reference log-probs passed in the batch (``precompute_ref_log_probs``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from intro2llm.loss import DPOLoss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="trl is the oracle (pip install '.[test]')")


def _trl(loss_type, beta, eps, pc, pr, rc, rr, len_c, len_r):
    """TRL's loss and metrics for one batch of B pairs (fp64)."""
    B, T = pc.shape[0], int(max(len_c.max(), len_r.max())) + 1
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(torch.cat([len_c, len_r]).tolist()):
        mask[i, 1 : 1 + n] = 1  # completion tokens after a one-token prompt
    per_token = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    per_token[:, 0] = torch.cat([pc, pr])  # the sequence log-prob on one position, zeros elsewhere

    def model(**kwargs):
        z = torch.zeros(2 * B, T - 1, dtype=torch.float64)
        return SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    model.training = True
    metrics = defaultdict(list)
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake_self = SimpleNamespace(
        model=model, accelerator=acc, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        aux_loss_enabled=False, _metrics={"train": metrics}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trl_dpo.DPOTrainer._compute_loss(fake_self, model, inputs, False)
    return loss, {k: v[-1] for k, v in metrics.items()}


def _random(B, seed):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]
    lengths = [torch.randint(1, 30, (B,), generator=g) for _ in range(2)]
    return logps, lengths


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0),
                                           ("robust", 0.2)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl(loss_type, eps, beta):
    (pc, pr, rc, rr), (lc, lr) = _random(16, seed=int(beta * 10) + len(loss_type))
    want, want_metrics = _trl(loss_type, beta, eps, pc, pr, rc, rr, lc, lr)
    got, metrics = DPOLoss(beta, loss_type, eps)(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert math.isclose(metrics[name], want_metrics[name], abs_tol=1e-6), name


def test_ipo_uses_lengths():
    (pc, pr, rc, rr), (lc, lr) = _random(8, seed=3)
    normalized, _ = DPOLoss(0.1, "ipo")(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    raw, _ = DPOLoss(0.1, "ipo")(pc, pr, rc, rr)
    assert not torch.allclose(normalized, raw), "IPO must divide the log-ratios by the response lengths"
    by_hand, _ = DPOLoss(0.1, "ipo")(pc / lc, pr / lr, rc / lc, rr / lr)
    torch.testing.assert_close(normalized, by_hand)


def test_cdpo_label_smoothing_matches_trl_per_pair():
    # TRL 1.x kept the cDPO form -(1-ε) log σ(βδ) - ε log σ(-βδ) in its "aot" loss, which sorts the batch's
    # log-ratios first; with one pair per call the sort is the identity, so aot(B=1) == cDPO, pair by pair.
    (pc, pr, rc, rr), (lc, lr) = _random(6, seed=5)
    got, _ = DPOLoss(0.2, "sigmoid", label_smoothing=0.15)(pc, pr, rc, rr)
    want = torch.stack([_trl("aot", 0.2, 0.15, pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], lc[i:i + 1],
                             lr[i:i + 1])[0] for i in range(6)]).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    plain, _ = DPOLoss(0.2, "sigmoid")(pc, pr, rc, rr)
    assert not torch.allclose(got, plain), "label smoothing must change the sigmoid loss"


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust"])
def test_reference_free_is_zero_reference(loss_type):
    (pc, pr, _, _), (lc, lr) = _random(8, seed=7)
    zero = torch.zeros_like(pc)
    got, metrics = DPOLoss(0.1, loss_type, reference_free=True)(pc, pr)
    want, want_metrics = _trl(loss_type, 0.1, 0.0, pc, pr, zero, zero, lc, lr)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert math.isclose(metrics["rewards/margins"], want_metrics["rewards/margins"], abs_tol=1e-6)


def test_known_answer_and_gradient():
    # δ = (−1 − −2) − (−3 − −2) = 2, β = 0.5: loss = −log σ(1) = log(1 + e^−1); dL/dπ_w = −β σ(−1)
    pc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0], dtype=torch.float64)
    loss, m = DPOLoss(beta=0.5)(pc, pr, ref, ref)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-1)), dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.tensor([-0.5 / (1 + math.e)], dtype=torch.float64))
    torch.testing.assert_close(pr.grad, -pc.grad)
    assert m["rewards/chosen"] == 0.5 and m["rewards/rejected"] == -0.5 and m["rewards/accuracies"] == 1.0
    assert m["rewards/margins"] == 1.0


def test_bad_input():
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="non-finite value -inf at pair 1"):
        DPOLoss()(x, torch.tensor([-1.0, float("-inf")]), x, x)
    with pytest.raises(ValueError, match="non-finite value nan"):
        DPOLoss()(x, x, torch.tensor([float("nan"), 0.0]), x)
    with pytest.raises(ValueError, match="share one"):
        DPOLoss()(x, x[:1], x, x)
    with pytest.raises(ValueError, match="required unless reference_free"):
        DPOLoss()(x, x)
    with pytest.raises(ValueError, match="empty batch"):
        DPOLoss()(x[:0], x[:0], x[:0], x[:0])
    with pytest.raises(TypeError, match="floating-point"):
        DPOLoss()(x.long(), x, x, x)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(label_smoothing=0.5)
    with pytest.raises(ValueError, match="not 'hinge'"):
        DPOLoss(loss_type="hinge", label_smoothing=0.1)
