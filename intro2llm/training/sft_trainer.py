"""``SFTTrainer``: supervised fine-tuning of a ``CausalLM`` on chat-templated conversations.

The loop is ``Trainer``'s; SFT changes what a step's loss is. The data (``intro2llm.data.sft_dataset``) labels
only the assistant answers (and their end-of-turn token); every other label is -100. The loss of a micro-batch is

    L = (1 / N_sup) * sum_{t : label_{t+1} != -100}  -log p(label_{t+1} | tokens_<=t)

computed by ``ops.fused_linear_cross_entropy`` from the final hidden states and the LM head weight chunk by chunk,
so the (B, T, V) logits are never materialised; ``count_tokens`` returns N_sup, so ``Trainer`` weights each
micro-batch by its share of the global number of *supervised* tokens (token-weighted, not row-weighted: a batch
of 8 rows equals 2 micro-batches of 4). Packed rows (``segment_ids`` + ``position_ids``) go to the model as is:
attention stays inside each sample.

At the end rank 0 writes a Hugging Face-format directory (``config.json`` + ``model.safetensors``), our
``tokenizer.json`` (with the template's special tokens) and ``tokenizer_config.json`` with the Jinja
``chat_template`` (``intro2llm.data.chat.write_chat_template``).

Also here: ``resize_token_embeddings`` (a template that adds special tokens grows the vocabulary) and
``chat_accuracy`` (greedy exact match on synthetic problems rendered with a template).
Not handled: NEFTune noise, per-turn loss weights, sequence-parallel packing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from intro2llm import ops
from intro2llm.course import lesson_task
from intro2llm.data import chat
from intro2llm.data.sft_dataset import IGNORE_INDEX, SFTBatches, SFTDataset, collate
from intro2llm.training.distributed import DistInfo, init_distributed
from intro2llm.training.trainer import Trainer, TrainerConfig


def check_max_positions(model: nn.Module, longest: int, kind: str) -> None:
    """``ValueError`` when ``kind`` (``"SFT"``, ``"DPO"``) rows of ``longest`` tokens exceed the model's positions."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and longest > max_pos:
        raise ValueError(f"{kind} rows have up to {longest} tokens but the model's max_position_embeddings is "
                         f"{max_pos}; pass max_length <= {max_pos}")


def sharded_eval_data(
    eval_dataset: Any | None, collate_fn: Callable[[list, int], dict[str, torch.Tensor]], pad: int, batch_size: int,
    info: DistInfo,
) -> Callable[[], Iterator[dict[str, torch.Tensor]]] | None:
    """``Trainer``'s ``eval_data``: the whole held-out set, this rank's share of rows (None without a dataset)."""
    if eval_dataset is None:
        return None

    def eval_fn() -> Iterator[dict[str, torch.Tensor]]:
        rows = list(range(info.rank, len(eval_dataset), info.world_size))
        step = max(1, batch_size // info.world_size)
        for i in range(0, len(rows), step):
            yield collate_fn([eval_dataset[j] for j in rows[i:i + step]], pad)

    return eval_fn


class SFTTrainer(Trainer):
    """``Trainer`` over an ``SFTDataset`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        dataset: SFTDataset,
        eval_dataset: SFTDataset | None = None,
        tokenizer: Any | None = None,
        seed: int = 0,
        dist_info: DistInfo | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
    ) -> None:
        info = dist_info or init_distributed(config.device)
        tokenizer = tokenizer if tokenizer is not None else dataset.tokenizer
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {vocab}; "
                             "call resize_token_embeddings(model, tokenizer.vocab_size) after adding special tokens")
        longest = max(len(ids) for ids, _ in dataset.samples) if not dataset.packing else dataset.max_length
        check_max_positions(model, longest, "SFT")
        self.dataset, self.tokenizer, self.template = dataset, tokenizer, dataset.template
        pad = chat.stop_token_id(tokenizer, dataset.template)
        data = SFTBatches(dataset, config.batch_size, pad, seed=seed, rank=info.rank, world_size=info.world_size)
        eval_fn = sharded_eval_data(eval_dataset, collate, pad, config.batch_size, info)
        super().__init__(model, config, data, eval_data=eval_fn, optimizer=optimizer, scheduler=scheduler,
                         dist_info=info)

    @lesson_task(10)
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the supervised targets of the micro-batch (fused: no (B, T, V) logits)."""
        labels = batch["labels"]  # (B, T), -100 outside the answers
        out = self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                         segment_ids=batch.get("segment_ids"), return_logits=False)
        h = out.hidden_states  # (B, T, C)
        targets = labels[:, 1:]  # token t predicts label t + 1
        n = int((targets != IGNORE_INDEX).sum())
        weight = self.raw_model.lm_head.weight  # (V, C)
        if n == 0:  # cannot happen with SFTDataset rows; keep the graph, never return 0/0 = NaN
            return h.sum() * 0.0
        total = ops.fused_linear_cross_entropy(h[:, :-1], weight, targets, ignore_index=IGNORE_INDEX,
                                               reduction="sum")
        return total / n

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())

    def on_train_end(self) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        export_sft_model(self.raw_model, self.out_dir, self.tokenizer, self.template)


def export_sft_model(model: nn.Module, out_dir: Any, tokenizer: Any, template: str | chat.ChatTemplate) -> None:
    """``save_pretrained`` files (or LoRA adapters) + the tokenizer files (``intro2llm_tokenizer.json``, Hugging
    Face ``tokenizer.json``, ``tokenizer_config.json`` with the ``chat_template``, ``generation_config.json``)."""
    from intro2llm.training.peft_args import export_model

    export_model(model, out_dir, tokenizer, template=template)  # LoRA: adapters in PEFT's layout, base pointer


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, vocab_size: int) -> int:
    """Grow the embedding table and LM head of a ``CausalLM`` to ``vocab_size`` rows (new rows = the mean of the
    old ones, the usual initialisation for added special tokens); keeps tying. Returns the number of rows added."""
    emb = model.embed_tokens
    old, C = emb.weight.shape
    if vocab_size < old:
        raise ValueError(f"resize_token_embeddings only grows the vocabulary: {old} -> {vocab_size}")
    if vocab_size == old:
        return 0
    tied = model.lm_head.weight is emb.weight
    new_emb = torch.cat([emb.weight, emb.weight.mean(0, keepdim=True).expand(vocab_size - old, C)])
    emb.weight = nn.Parameter(new_emb)
    emb.vocab_size = vocab_size
    if tied:
        model.lm_head.weight = emb.weight
    else:
        w = model.lm_head.weight
        model.lm_head.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, C)]))
    model.lm_head.out_features = vocab_size
    model.config = model.config.replace(vocab_size=vocab_size)
    return vocab_size - old


@torch.no_grad()
def chat_answers(model: nn.Module, tokenizer: Any, template: str | chat.ChatTemplate, prompts: Sequence[str],
                 max_new_tokens: int = 8, batch_size: int = 50) -> list[str]:
    """Greedy completions of user ``prompts`` rendered with ``template`` (text up to the stop token)."""
    template = chat.get_template(template)
    stop = chat.stop_token_id(tokenizer, template)
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [chat.encode_prompt(tokenizer, template, [{"role": "user", "content": p}])
                 for p in prompts[i:i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[stop] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask, eos_token_id=stop)
        for row in gen[:, width:].tolist():
            row = row[: row.index(stop)] if stop in row else row
            out.append(tokenizer.decode(row))
    return out


def chat_accuracy(model: nn.Module, tokenizer: Any, template: str | chat.ChatTemplate,
                  pairs: Sequence[tuple[str, str]], batch_size: int = 50) -> float:
    """Exact-match accuracy (``synthetic.reward == 1``) of greedy answers to synthetic ``(prompt, answer)`` pairs."""
    from intro2llm.data import synthetic

    prompts = [p for p, _ in pairs]
    return synthetic.accuracy(prompts, chat_answers(model, tokenizer, template, prompts, batch_size=batch_size))
