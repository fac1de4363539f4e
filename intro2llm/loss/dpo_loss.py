"""``DPOLoss``: Direct Preference Optimization (Rafailov et al., 2023) and its IPO / hinge / robust variants.

A pure function of four (B,) sequence log-prob tensors — the policy's and the frozen reference's, for the chosen and
the rejected response of each pair. With the implicit rewards ``r = β (log π(y|x) - log π_ref(y|x))`` and the
log-ratio margin ``δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``:

    sigmoid  -log σ(βδ)                                       (DPO; with label smoothing ε: cDPO,
             -(1-ε) log σ(βδ) - ε log σ(-βδ)                   Mitchell 2023, labels flipped with probability ε)
    robust   (-(1-ε) log σ(βδ) + ε log σ(-βδ)) / (1 - 2ε)     (rDPO, Chowdhury et al. 2024: unbiased under flips)
    hinge    max(0, 1 - βδ)                                    (SLiC, Zhao et al. 2023)
    ipo      (δ̄ - 1/(2β))²                                     (IPO, Azar et al. 2023; δ̄ from per-token averages)

The formulas and metric names follow TRL's ``DPOTrainer`` (tested against it in fp64): IPO divides each log-ratio by
its response length (``chosen_lengths``/``rejected_lengths``, as TRL does with its completion mask); ``reference_free``
takes the reference log-probs as 0 (DPO against a uniform reference). The loss is the mean over pairs.
Not handled: the other TRL variants (exo_pair, nca_pair, bco_pair, apo, aot, discopop, f-divergences, WPO weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from intro2llm.course import lesson_task

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@lesson_task(11)
class DPOLoss(nn.Module):
    """``loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` (each (B,)) → ``(loss, metrics)``."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference_free: bool = False) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOLoss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
            raise ValueError(f"DPOLoss: beta must be a finite number > 0, got {beta!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type in ("hinge", "ipo"):
            raise ValueError(f"DPOLoss: label_smoothing applies to 'sigmoid' (cDPO) and 'robust', not {loss_type!r}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.reference_free = reference_free

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the B pairs and TRL's metrics (``rewards/chosen|rejected|margins|accuracies``, ``logps/*``).

        ``chosen_lengths``/``rejected_lengths`` (B,): response token counts, used by IPO only (log-ratios averaged
        per token); without them IPO takes the log-probs as given. Reference log-probs may be None only when
        ``reference_free``.
        """
        pc, pr = policy_chosen_logps, policy_rejected_logps
        if self.reference_free:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        else:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("DPOLoss: ref_chosen_logps and ref_rejected_logps are required unless "
                                 "reference_free=True")
            rc, rr = ref_chosen_logps.to(pc.dtype), ref_rejected_logps.to(pc.dtype)
        _check(pc=pc, pr=pr, rc=rc, rr=rr)
        chosen_logratios = pc - rc  # (B,)
        rejected_logratios = pr - rr
        beta, eps = self.beta, self.label_smoothing
        if self.loss_type == "ipo":
            if chosen_lengths is not None and rejected_lengths is not None:
                chosen_logratios = chosen_logratios / chosen_lengths.to(pc.dtype).clamp(min=1.0)
                rejected_logratios = rejected_logratios / rejected_lengths.to(pc.dtype).clamp(min=1.0)
            losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
            chosen_logratios, rejected_logratios = pc - rc, pr - rr  # rewards use the summed log-ratios (as TRL)
        else:
            z = beta * (chosen_logratios - rejected_logratios)  # (B,)
            if self.loss_type == "sigmoid":
                losses = -F.logsigmoid(z) if eps == 0.0 else -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            elif self.loss_type == "robust":
                losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
            else:  # hinge
                losses = torch.relu(1 - z)
        loss = losses.mean()
        with torch.no_grad():
            chosen_rewards = beta * chosen_logratios.detach()
            rejected_rewards = beta * rejected_logratios.detach()
            metrics = {
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                "logps/chosen": pc.detach().mean().item(),
                "logps/rejected": pr.detach().mean().item(),
            }
        return loss, metrics


def _check(**tensors: torch.Tensor) -> None:
    """Same (B,) shape, float dtype, finite values: a NaN/inf log-prob would silently poison the loss."""
    names = {"pc": "policy_chosen_logps", "pr": "policy_rejected_logps", "rc": "ref_chosen_logps",
             "rr": "ref_rejected_logps"}
    shape = tensors["pc"].shape
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"DPOLoss: {names[key]} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(f"DPOLoss: the four log-prob tensors must share one (B,) shape; {names[key]} has shape "
                             f"{tuple(t.shape)}, policy_chosen_logps {tuple(shape)}")
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"DPOLoss: {names[key]} has a non-finite value {t[i].item()} at pair {i} (a log-prob "
                             "of -inf means the response holds a token the model gives probability 0)")
    if shape[0] == 0:
        raise ValueError("DPOLoss: empty batch (B = 0): the mean loss would be NaN")
