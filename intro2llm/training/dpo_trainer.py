"""``DPOTrainer``: preference optimization of a ``CausalLM`` against a frozen reference (DPO / IPO / hinge / robust).

The loop is ``Trainer``'s; DPO changes what a step's loss is. For a micro-batch of B pairs:

1. chosen and rejected rows are concatenated into one (2B, T) batch and run through the policy in **one** forward
   (one set of GEMMs instead of two; TRL's ``concatenated_forward``), returning the final hidden states only;
2. ``ops.fused_linear_logprobs`` turns them into per-token log-probs of the labels chunk by chunk, so no
   (2B, T, V) logits exist, and the sum over each row's supervised response tokens gives ``log π(y|x)`` (2B,);
3. the reference log-probs come from a frozen copy of the initial policy (``requires_grad=False``, eval mode, run
   under ``no_grad``; never updated), or were precomputed once over the dataset (``precompute_ref=True``: the
   reference model is dropped after one pass), or are 0 (``reference_free``);
4. ``intro2llm.loss.DPOLoss`` gives the mean loss over pairs and TRL's metrics (``rewards/*``, ``logps/*``),
   averaged over the micro-batches of a step and logged with the loss (metrics.jsonl, TensorBoard).

``count_tokens`` returns the number of pairs, so ``Trainer`` weights micro-batches by their share of the global
batch's pairs (the loss is a mean over pairs, whatever the split). At the end rank 0 writes the Hugging Face-format
model, the tokenizer and the chat template (as the SFT trainer does).

Under torchrun the policy is wrapped as ``Trainer`` does (``strategy`` ddp or fsdp). The reference is copied before
that and made a ``frozen_replica``: a local replica under DDP, sharded like the policy under FSDP (its no-grad
forwards all-gather block by block, as the policy's do), so every strategy computes the same log-probs as one
process.
Not handled: a reference that is synced during training (TR-DPO), LoRA references via disabled adapters (pass a
``ref_model`` or ``precompute_ref=True``), packing.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.data import chat
from intro2llm.data.dpo_dataset import DPOBatches, DPODataset, collate
from intro2llm.data.sft_dataset import IGNORE_INDEX
from intro2llm.loss.dpo_loss import DPOLoss
from intro2llm.training.distributed import DistInfo, frozen_replica, init_distributed
from intro2llm.training.sft_trainer import check_max_positions, sharded_eval_data
from intro2llm.training.trainer import Trainer, TrainerConfig


@lesson_task(11)
def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over supervised tokens of ``log p(label_{t+1} | tokens_<=t)`` per row: input_ids/labels (R, T) ->
    (log-probs (R,) fp32, supervised token counts (R,)). The LM head runs fused (no (R, T, V) logits)."""
    out = model(input_ids, return_logits=False)
    h = out.hidden_states  # (R, T, C)
    targets = labels[:, 1:]  # token t predicts label t + 1
    head = weight if weight is not None else _unwrap(model).lm_head.weight  # (V, C)
    per_token = ops.fused_linear_logprobs(h[:, :-1], head, targets, ignore_index=IGNORE_INDEX)  # (R, T-1)
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class DPOTrainer(Trainer):
    """``Trainer`` over a ``DPODataset`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        dataset: DPODataset,
        ref_model: nn.Module | None = None,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        precompute_ref: bool = False,
        eval_dataset: DPODataset | None = None,
        tokenizer: Any | None = None,
        seed: int = 0,
        dist_info: DistInfo | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
    ) -> None:
        info = dist_info or init_distributed(config.device)
        self.loss_fn = DPOLoss(beta, loss_type, label_smoothing, reference_free)
        self.dataset, self.template = dataset, dataset.template
        self.tokenizer = tokenizer if tokenizer is not None else dataset.tokenizer
        check_max_positions(model, dataset.max_row_length(), "DPO")
        self.pad_id = chat.stop_token_id(self.tokenizer, dataset.template)
        data = DPOBatches(dataset, config.batch_size, self.pad_id, seed=seed, rank=info.rank,
                          world_size=info.world_size)
        eval_fn = sharded_eval_data(eval_dataset, collate, self.pad_id, config.batch_size, info)
        self.ref_model: nn.Module | None = None
        self.ref_logps: dict[str, dict[str, torch.Tensor]] = {}
        self._step_metrics: dict[str, list[float]] = defaultdict(list)
        # The reference is the policy as it is now, unless one is given: copied here, before Trainer wraps the
        # policy (FSDP shards it in place; a deep copy of a sharded module would share its process group state).
        ref = None if reference_free else ref_model if ref_model is not None else copy.deepcopy(model)
        super().__init__(model, config, data, eval_data=eval_fn, optimizer=optimizer, scheduler=scheduler,
                         dist_info=info)
        if ref is not None:
            # frozen; under FSDP sharded like the policy (its forwards run in step on every rank), else a replica
            ref = frozen_replica(ref, self.info, config.strategy, bf16=self.precision == "bf16")
            if precompute_ref:
                self.ref_logps["train"] = self.precompute_reference(ref, dataset)
                if eval_dataset is not None:
                    self.ref_logps["eval"] = self.precompute_reference(ref, eval_dataset)
                del ref  # one pass, then the memory of a second model is free again
            else:
                self.ref_model = ref

    # ------------------------------------------------------------------------------------------ reference
    @torch.no_grad()
    def precompute_reference(self, ref: nn.Module, dataset: DPODataset) -> dict[str, torch.Tensor]:
        """The reference's sequence log-probs of every pair, once: {"chosen": (N,), "rejected": (N,)}."""
        chosen = torch.empty(len(dataset), dtype=torch.float32)
        rejected = torch.empty(len(dataset), dtype=torch.float32)
        step = max(1, self.micro_batch_size)
        for i in range(0, len(dataset), step):
            batch = self._to_device(collate([dataset[j] for j in range(i, min(i + step, len(dataset)))],
                                            self.pad_id))
            with self._autocast():
                c, r = self._logps(ref, batch)
            chosen[batch["index"].cpu()] = c.float().cpu()
            rejected[batch["index"].cpu()] = r.float().cpu()
        return {"chosen": chosen, "rejected": rejected}

    # ------------------------------------------------------------------------------------------ the loss
    @staticmethod
    def _concat(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
        return ids, labels

    def _logps(self, model: nn.Module, batch: dict[str, torch.Tensor], with_lengths: bool = False):
        """(chosen (B,), rejected (B,)[, chosen lengths, rejected lengths]) from one concatenated forward."""
        ids, labels = self._concat(batch)
        # the head weight is read after the forward (by sequence_logps): under FSDP it is a DTensor shard before
        # the forward and the gathered full tensor after it
        logps, lengths = sequence_logps(model, ids, labels)
        c, r = logps.chunk(2)
        return (c, r, *lengths.chunk(2)) if with_lengths else (c, r)

    @lesson_task(11)
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean DPO loss over the micro-batch's pairs; its metrics are kept for the step's log line."""
        pc, pr, len_c, len_r = self._logps(self.model, batch, with_lengths=True)
        rc = rr = None
        if not self.loss_fn.reference_free:
            if self.ref_model is not None:
                with torch.no_grad():
                    rc, rr = self._logps(self.ref_model, batch)
            else:
                table = self.ref_logps["train" if self.model.training else "eval"]
                idx = batch["index"].cpu()
                rc, rr = table["chosen"][idx].to(pc.device), table["rejected"][idx].to(pc.device)
        loss, metrics = self.loss_fn(pc.float(), pr.float(), None if rc is None else rc.float(),
                                     None if rr is None else rr.float(), chosen_lengths=len_c,
                                     rejected_lengths=len_r)
        if self.model.training:
            for k, v in metrics.items():
                self._step_metrics[k].append(v)
        return loss

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the micro-batch: the loss is a mean over pairs."""
        return int(batch["chosen_input_ids"].shape[0])

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        self._step_metrics.clear()
        out = super().train_step(batch)
        for k, values in self._step_metrics.items():  # micro-batches hold equal numbers of pairs
            out[k] = sum(values) / len(values)
        return out

    @torch.no_grad()
    def preference_metrics(self, dataset: DPODataset, split: str = "eval") -> dict[str, float]:
        """Loss and ``rewards/*`` metrics of the current policy over a whole dataset (e.g. held-out pairs), with the
        live reference, the reference log-probs precomputed for ``split``, or none (``reference_free``)."""
        was_training = self.model.training
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        table = self.ref_logps.get(split)
        if not self.loss_fn.reference_free and self.ref_model is None and table is None:
            raise ValueError(f"no reference for {split!r}: the reference log-probs were precomputed for "
                             f"{sorted(self.ref_logps)} only")
        step = max(1, self.micro_batch_size)
        for i in range(0, len(dataset), step):
            batch = self._to_device(collate([dataset[j] for j in range(i, min(i + step, len(dataset)))],
                                            self.pad_id))
            with self._autocast():
                pc, pr, lc, lr = self._logps(self.model, batch, with_lengths=True)
                if self.ref_model is not None and not self.loss_fn.reference_free:
                    rc, rr = self._logps(self.ref_model, batch)
                elif table is not None:
                    idx = batch["index"].cpu()
                    rc, rr = table["chosen"][idx], table["rejected"][idx]
                else:
                    rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
            for k, v in (("pc", pc), ("pr", pr), ("rc", rc), ("rr", rr), ("lc", lc), ("lr", lr)):
                parts[k].append(v.detach().float().cpu())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        loss, metrics = self.loss_fn(cat["pc"], cat["pr"], cat["rc"], cat["rr"], chosen_lengths=cat["lc"],
                                     rejected_lengths=cat["lr"])
        self.model.train(was_training)
        return {"loss": loss.item(), **metrics}

    def on_train_end(self) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        from intro2llm.training.sft_trainer import export_sft_model

        export_sft_model(self.raw_model, self.out_dir, self.tokenizer, self.template)
