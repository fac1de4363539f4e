"""``PretrainTrainer``: next-token pretraining of a ``CausalLM`` on packed token shards.

The data side is ``intro2llm.data.pretrain_dataset``: ``PretrainDataset`` (random windows of ``block_size + 1``
tokens over memory-mapped shards) and ``PretrainLoader`` (global step s = samples s*G .. s*G+G-1, rank r takes
its G/W rows; its position is the only data state a checkpoint needs). Each window of T+1 tokens is fed whole as
``input_ids`` with ``labels = input_ids``: the model shifts the labels inside, so all T next-token targets of the
window are trained (feeding T tokens would drop the last target), and ``return_logits=False`` makes it use the
fused linear + cross-entropy op, so the (B, T, V) logits are never materialised.

At the end rank 0 writes an evaluation-ready directory (``interop.hf.export_model``: ``save_pretrained`` files
plus the tokenizer files when a tokenizer is given: ``interop.hf.export_tokenizer``), so
``CausalLM.from_pretrained(out_dir)`` and ``transformers``' ``AutoModelForCausalLM``/``AutoTokenizer`` work. Data
preparation for the ``train`` command lives in ``intro2llm.data.prepare``, accuracy on the synthetic task in
``intro2llm.evaluation.accuracy``.
Not handled: document-masked attention, data mixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from intro2llm.interop.hf import export_model
from intro2llm.training.distributed import DistInfo, init_distributed
from intro2llm.training.trainer import Trainer, TrainerConfig


class PretrainBatches:
    """Adapts a ``PretrainLoader`` ((x, y) pairs) to Trainer batches ``{"input_ids": w, "labels": w}``, w = (B, T+1)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            x, y = self.loader.next_batch()  # (B, T) each, y = x shifted by one
            w = torch.cat([x, y[:, -1:]], dim=1)  # (B, T + 1): the full window
            yield {"input_ids": w, "labels": w}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def eval_batches_fn(dataset: Any, num_batches: int, global_batch: int, rank: int, world: int):  # noqa: ANN201
    """A callable giving the same ``num_batches`` held-out batches at every evaluation (this rank's rows)."""
    from intro2llm.data.pretrain_dataset import PretrainLoader

    def batches():
        loader = PretrainLoader(dataset, global_batch, rank=rank, world_size=world)
        it = iter(PretrainBatches(loader))
        for _ in range(num_batches):
            yield next(it)

    return batches


class PretrainTrainer(Trainer):
    """``Trainer`` wired to ``PretrainDataset``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        dataset: Any,
        eval_dataset: Any | None = None,
        eval_batches: int = 4,
        tokenizer: Any | None = None,
        dist_info: DistInfo | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
    ) -> None:
        from intro2llm.data.pretrain_dataset import PretrainLoader

        info = dist_info or init_distributed(config.device)
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_pos is not None and dataset.block_size + 1 > max_pos:
            raise ValueError(
                f"block_size {dataset.block_size} + 1 (the window fed to the model) exceeds the model's "
                f"max_position_embeddings {max_pos}"
            )
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and dataset.data_vocab_size > vocab:
            # ids were checked against dataset.vocab_size at load; make sure that is the model's
            if dataset.vocab_size > vocab:
                raise ValueError(f"the data's vocab_size {dataset.vocab_size} exceeds the model's {vocab}")
        loader = PretrainLoader(dataset, config.batch_size, rank=info.rank, world_size=info.world_size)
        eval_fn = None
        if eval_dataset is not None and eval_batches > 0:
            eval_fn = eval_batches_fn(eval_dataset, eval_batches, config.batch_size, info.rank, info.world_size)
        self.tokenizer = tokenizer
        super().__init__(model, config, PretrainBatches(loader), eval_data=eval_fn, optimizer=optimizer,
                         scheduler=scheduler, dist_info=info)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        # fused linear + cross-entropy: the (B, T, V) logits never exist; under bf16 autocast its GEMMs run in
        # bf16 and the loss comes back in fp32
        return self.model(ids, labels=labels, return_logits=False).loss

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"]
        return labels.shape[0] * (labels.shape[1] - 1)  # packed pretraining data has no ignored targets

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"]
        return labels.shape[0] * (labels.shape[1] - 1)  # trained tokens (T per window of T + 1)

    def on_train_end(self) -> None:
        if self.out_dir is None:
            return
        export_model(self.raw_model, self.out_dir, self.tokenizer)  # FSDP: the consolidated model (Trainer.train)
