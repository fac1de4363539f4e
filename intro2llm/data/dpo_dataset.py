"""DPO data: (prompt, chosen, rejected) triples -> one shared prompt and two labelled responses.

Each pair is chat-templated with ``intro2llm.data.chat`` exactly as SFT renders a conversation (``[system?, user,
assistant]``), so DPO trains on the same text the SFT model learned and is prompted with. The prompt is tokenized
**once** and shared: ``chat.encode_conversation`` encodes segment by segment, so the ids of
``prompt + chosen`` and ``prompt + rejected`` both start with the same prompt ids (checked), and a row stores

    input_ids  = prompt_ids + response_ids              (one row for chosen, one for rejected)
    labels     = -100 on the prompt, response ids where SFT supervises (content + end-of-turn token), else -100

Labels are aligned with ``input_ids`` like SFT's (the model shifts: token t predicts label t + 1); the DPO
trainer sums the log-probs of the supervised response tokens (``sum_t log p(label_{t+1} | ...)``).

Truncation (TRL's rules): ``max_prompt_length`` keeps the *last* prompt tokens (the question sits next to the
answer); then ``max_length`` (prompt + response) cuts each response on the *right* (``max_completion_length``
style). A pair whose chosen or rejected response keeps no supervised token is **dropped and counted**
(``stats["dropped_no_response"]``); a dataset left empty is a ``ValueError``.
Bad input raises ``ValueError`` naming the row: chosen identical to rejected (the DPO gradient would be 0 and
its "preference" meaningless), an empty prompt or response, a missing field, special-token text in a message.

Also: ``read_jsonl`` (rows ``{"prompt", "chosen", "rejected"[, "system"]}``), ``synthetic_triples`` and
``collate``/``DPOBatches`` (seeded, resumable batches for ``Trainer``; each batch also carries the row ``index``
so reference log-probs can be precomputed once per row).
Not handled: multi-turn prompts (give the history as messages in a JSONL ``"prompt"`` list), images, unpaired data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from intro2llm.course import lesson_task
from intro2llm.data import chat
from intro2llm.data.sft_dataset import IGNORE_INDEX, SFTBatches, read_jsonl_rows

FIELDS = ("prompt", "chosen", "rejected")


def synthetic_triples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` preference rows from ``intro2llm.data.synthetic.dpo_triples`` (rejected: a plausible wrong answer)."""
    from intro2llm.data import synthetic

    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in synthetic.dpo_triples(n, seed=seed)]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows ``{"prompt", "chosen", "rejected"[, "system"]}`` from a JSONL file."""
    return read_jsonl_rows(path, "DPO", _object_row)


def _object_row(row: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with {FIELDS}, got {row!r:.80}")
    return row


def _as_row(row: Any) -> Mapping[str, Any]:
    if isinstance(row, Mapping):
        return row
    if isinstance(row, Sequence) and not isinstance(row, (str, bytes)) and len(row) == 3:
        return dict(zip(FIELDS, row))
    raise ValueError(f"expected a (prompt, chosen, rejected) triple or a mapping with {FIELDS}, got {row!r:.80}")


@lesson_task(11)
class DPODataset:
    """Tokenized preference pairs; ``ds[i]`` -> dict of 1-D LongTensors (``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels``) and ``index`` (the row's position in this dataset)."""

    def __init__(
        self,
        rows: Iterable[Any],
        tokenizer: Any,
        template: str | chat.ChatTemplate = "plain",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        system: str | None = None,
    ) -> None:
        self.template = chat.get_template(template)
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}): "
                             "the responses need room")
        self.tokenizer, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.stats = {"rows": 0, "prompt_truncated": 0, "response_truncated": 0, "dropped_no_response": 0}
        self.samples: list[tuple[list[int], list[int], list[int], list[int]]] = []  # prompt, c ids, c labels, r ...
        for i, raw in enumerate(rows):
            self.stats["rows"] += 1
            try:
                sample = self._encode(_as_row(raw), system)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"DPO row {i}: {exc}") from None
            if sample is not None:
                self.samples.append(sample)
        if not self.samples:
            raise ValueError(f"no DPO pair left after truncation (max_length={max_length}, max_prompt_length="
                             f"{max_prompt_length}): {self.stats}")
        self.stats["pairs"] = len(self.samples)

    def _encode(self, row: Mapping[str, Any], system: str | None):
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}; a row needs {FIELDS}")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(v, str):
                raise TypeError(f"{k} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise ValueError(f"empty {k} response")
        if chosen == rejected:
            raise ValueError(f"chosen equals rejected ({chosen!r:.60}): no preference to learn")
        history = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        if isinstance(prompt, str) and not prompt.strip():
            raise ValueError("empty prompt")
        sys_prompt = row.get("system", system)
        if sys_prompt:
            history = [{"role": "system", "content": sys_prompt}] + history
        encoded = []
        for response in (chosen, rejected):
            ids, mask = chat.encode_conversation(self.tokenizer, self.template,
                                                 history + [{"role": "assistant", "content": response}])
            encoded.append((ids, mask))
        # the prompt = everything before the first supervised token of the chosen conversation
        n_prompt = encoded[0][1].index(True)
        prompt_ids = encoded[0][0][:n_prompt]
        if encoded[1][0][:n_prompt] != prompt_ids or encoded[1][1][:n_prompt] != [False] * n_prompt:
            raise ValueError("the chosen and rejected conversations do not share the prompt's token ids "
                             f"(template {self.template.name!r})")
        if self.max_prompt_length is not None and n_prompt > self.max_prompt_length:
            prompt_ids = prompt_ids[n_prompt - self.max_prompt_length:]  # keep the end, next to the answer
            self.stats["prompt_truncated"] += 1
        out = [prompt_ids]
        for ids, mask in encoded:
            resp = ids[n_prompt:]
            labels = [t if m else IGNORE_INDEX for t, m in zip(resp, mask[n_prompt:])]
            if self.max_length is not None and len(prompt_ids) + len(resp) > self.max_length:
                keep = max(0, self.max_length - len(prompt_ids))
                resp, labels = resp[:keep], labels[:keep]
                self.stats["response_truncated"] += 1
            if all(lab == IGNORE_INDEX for lab in labels):
                self.stats["dropped_no_response"] += 1
                return None
            out += [resp, labels]
        return tuple(out)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        prompt, c_ids, c_lab, r_ids, r_lab = self.samples[idx]
        skip = [IGNORE_INDEX] * len(prompt)
        return {"chosen_input_ids": torch.tensor(prompt + c_ids), "chosen_labels": torch.tensor(skip + c_lab),
                "rejected_input_ids": torch.tensor(prompt + r_ids), "rejected_labels": torch.tensor(skip + r_lab),
                "index": torch.tensor(idx)}

    def max_row_length(self) -> int:
        return max(len(p) + max(len(c), len(r)) for p, c, _, r, _ in self.samples)


def collate(rows: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected rows to one common width T: ``chosen_input_ids``/``rejected_input_ids``
    (B, T) with ``pad_id``, ``*_labels`` (B, T) with -100, ``*_attention_mask`` (B, T), ``index`` (B,)."""
    width = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r[f"{side}_input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r[f"{side}_input_ids"], r[f"{side}_labels"], 1
        out[f"{side}_input_ids"], out[f"{side}_labels"], out[f"{side}_attention_mask"] = ids, labels, mask
    out["index"] = torch.stack([r["index"] for r in rows])
    return out


class DPOBatches(SFTBatches):
    """Endless, seeded, resumable DPO batches (``SFTBatches``' order and state, DPO's ``collate``)."""

    collate_fn = staticmethod(collate)
