"""Lesson 11 basic tests: the DPO loss by hand (Bradley-Terry, β, the gradient's sigmoid weight), label smoothing
(cDPO), IPO's squared target, TRL's reward metrics, the dataset's shared prompt and masks, bad input."""

import math

import pytest
import torch

from intro2llm.data.dpo_dataset import DPODataset
from intro2llm.data.prepare import synthetic_tokenizer
from intro2llm.loss import DPOLoss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.mark.task("DPOLoss")
def test_dpo_loss_is_bradley_terry_on_implicit_rewards():
    # r = β (log π - log π_ref): chosen 0.2 (−1 − −3 = 2, β = 0.1), rejected −0.1; P(chosen ≻ rejected) = σ(0.3)
    loss, m = DPOLoss(beta=0.1)(t(-1.0), t(-4.0), t(-3.0), t(-3.0))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))
    assert m["rewards/chosen"] == pytest.approx(0.2) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.3) and m["rewards/accuracies"] == 1.0


@pytest.mark.task("DPOLoss")
def test_gradient_is_weighted_by_how_wrong_the_model_is():
    # dL/d log π(y_w) = −β σ(−βδ): a pair already ranked right (δ large) gets almost no gradient
    grads = []
    for delta in (-5.0, 0.0, 5.0):
        pc = t(delta).requires_grad_()
        DPOLoss(beta=1.0)(pc, t(0.0), t(0.0), t(0.0))[0].backward()
        grads.append(pc.grad.item())
        assert pc.grad.item() == pytest.approx(-1 / (1 + math.exp(delta)))
    assert abs(grads[0]) > abs(grads[1]) > abs(grads[2])


@pytest.mark.task("DPOLoss")
def test_policy_equal_to_reference_gives_log2():
    loss, m = DPOLoss(beta=0.3)(t(-2.0, -7.0), t(-5.0, -1.0), t(-2.0, -7.0), t(-5.0, -1.0))
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"] == 0.0 and m["rewards/accuracies"] == 0.0  # ties are not "correct", as in TRL


@pytest.mark.task("DPOLoss")
def test_label_smoothing_is_cdpo():
    eps, z = 0.1, 0.5  # z = βδ
    loss, _ = DPOLoss(beta=0.5, label_smoothing=eps)(t(1.0), t(0.0), t(0.0), t(0.0))
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx(-(1 - eps) * logsig(z) - eps * logsig(-z))


@pytest.mark.task("DPOLoss")
def test_ipo_targets_a_finite_margin():
    # IPO: (δ̄ − 1/(2β))², zero exactly at δ̄ = 1/(2β) = 5 for β = 0.1, and it grows again past it (no run-away)
    zero, _ = DPOLoss(beta=0.1, loss_type="ipo")(t(5.0), t(0.0), t(0.0), t(0.0))
    past, _ = DPOLoss(beta=0.1, loss_type="ipo")(t(9.0), t(0.0), t(0.0), t(0.0))
    assert zero.item() == pytest.approx(0.0) and past.item() == pytest.approx(16.0)
    per_token, _ = DPOLoss(beta=0.1, loss_type="ipo")(t(10.0), t(0.0), t(0.0), t(0.0), chosen_lengths=t(2.0),
                                                        rejected_lengths=t(1.0))
    assert per_token.item() == pytest.approx(0.0)  # 10 over 2 tokens = 5 per token


@pytest.mark.task("DPODataset")
def test_dataset_masks_the_prompt_and_shares_it():
    tok = synthetic_tokenizer(["Q: 12+35=?\nA: 47\n"])
    ds = DPODataset([{"prompt": "Q: 12+35=?\nA:", "chosen": " 47\n", "rejected": " 57\n"}], tok)
    row = ds[0]
    n = len(tok.encode("Q: 12+35=?\nA:"))
    assert torch.equal(row["chosen_input_ids"][:n], row["rejected_input_ids"][:n])
    assert (row["chosen_labels"][:n] == -100).all() and (row["chosen_labels"][n:] != -100).all()


@pytest.mark.task("DPODataset", "DPOLoss")
def test_bad_input_is_an_error():
    tok = synthetic_tokenizer(["Q: 1+1=?\nA: 2\n"])
    with pytest.raises(ValueError, match="chosen equals rejected"):
        DPODataset([("Q: 1+1=?\nA:", " 2\n", " 2\n")], tok)
    with pytest.raises(ValueError, match="non-finite"):
        DPOLoss()(t(float("nan")), t(0.0), t(0.0), t(0.0))
