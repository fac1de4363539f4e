"""SFT data: chat-templated conversations -> ``input_ids`` + ``labels`` (-100 outside the assistant answers).

Supervised fine-tuning trains the same next-token loss as pretraining, but only on the tokens the model should
*produce*: the assistant contents and their end-of-turn token (``intro2llm.data.chat``). Every other label is
-100 (ignored), so no gradient is spent on learning to predict the user's questions, and the loss is a mean over
supervised tokens only. Labels are aligned with ``input_ids`` (Hugging Face convention): the model shifts them
inside, token t predicting label t + 1.

Truncation (``max_length``; ``truncation=``):

- ``"right"`` (default, TRL's ``keep_start``): keep the first ``max_length`` tokens;
- ``"left"``: keep the last ``max_length`` tokens (keeps the latest answer of a long multi-turn chat);
- ``"drop"``: drop every row longer than ``max_length``.

A row that truncation would leave without a supervised *target* (label t >= 1 != -100) is **dropped and
counted** (``dataset.stats["dropped_no_supervision"]``, the CLI prints the counts); a dataset left with no row at
all is a ``ValueError``. So no batch row ever contributes 0/0 to the loss (no silent NaN). Invalid rows (no
assistant turn, an empty response, special-token text in a message, an unknown template) raise ``ValueError``
naming the row.

Packing (``packing=True``): rows are filled first-fit-decreasing with whole samples up to ``max_length`` tokens.
Each packed row carries ``position_ids`` that restart at 0 for every sample and ``segment_ids`` (1, 2, … per
sample, 0 on padding); ``CausalLM`` turns the segment ids into a block-diagonal causal mask, so a token attends
only to earlier tokens *of its own sample*, and the first label of each sample is -100, so no sample is trained to
predict across a boundary. Packed logits equal the unpacked ones (tested).

Not handled: multi-modal rows, loss weights per turn, streaming datasets larger than memory.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from intro2llm.course import lesson_task
from intro2llm.data import chat

IGNORE_INDEX = -100
TRUNCATION_MODES = ("right", "left", "drop")
T = TypeVar("T")


def rows_from_pairs(pairs: Iterable[tuple[str, str]], system: str | None = None) -> list[list[dict[str, str]]]:
    """``(prompt, response)`` pairs (e.g. ``synthetic.sft_pairs``) -> conversations."""
    return [chat.pair_to_messages(p, r, system) for p, r in pairs]


def row_to_messages(row: Any, where: str = "row") -> list[dict[str, str]]:
    """A JSONL row -> messages: ``{"messages": [...]}`` or ``{"prompt": ..., "response"|"completion": ...}``
    (optionally ``"system"``), or a ready list of messages."""
    if isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
        return list(row)
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with 'messages' or 'prompt'/'response', got {row!r:.80}")
    if "messages" in row:
        return list(row["messages"])
    if "prompt" in row:
        response = row.get("response", row.get("completion"))
        if response is None:
            raise ValueError(f"{where}: a 'prompt' row needs a 'response' (or 'completion') field")
        return chat.pair_to_messages(row["prompt"], response, row.get("system"))
    raise ValueError(f"{where}: expected a 'messages' or 'prompt'/'response' field, got keys {sorted(row)}")


def read_jsonl_rows(path: str | os.PathLike, kind: str, convert: Callable[[Any, str], T]) -> list[T]:
    """``convert(row, "FILE:LINE")`` of every row of a JSONL file (blank lines skipped).

    A missing file is a ``FileNotFoundError``; a line that is not JSON, or a file without rows, a ``ValueError``
    (``kind``, e.g. ``"SFT"``, names the data in the messages).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} data file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
            out.append(convert(row, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{kind} data file {path!r} holds no rows")
    return out


def read_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file (one row per line; see ``row_to_messages``)."""
    return read_jsonl_rows(path, "SFT", row_to_messages)


def _has_target(labels: Sequence[int]) -> bool:
    return any(lab != IGNORE_INDEX for lab in labels[1:])  # label 0 is never a target (nothing precedes it)


@lesson_task(10)
class SFTDataset:
    """Tokenized, masked, truncated (and optionally packed) SFT rows; ``ds[i]`` -> dict of 1-D LongTensors."""

    def __init__(
        self,
        conversations: Iterable[Sequence[Mapping[str, str]]],
        tokenizer: Any,
        template: str | chat.ChatTemplate = "plain",
        max_length: int | None = None,
        truncation: str = "right",
        packing: bool = False,
    ) -> None:
        self.template = chat.get_template(template)
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (one context token and one target), got {max_length!r}")
        if packing and max_length is None:
            raise ValueError("packing=True needs max_length (the packed row length)")
        self.tokenizer, self.max_length, self.truncation, self.packing = tokenizer, max_length, truncation, packing
        self.stats = {"rows": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_supervision": 0}
        self.samples: list[tuple[list[int], list[int]]] = []  # (ids, labels) per kept conversation
        for i, msgs in enumerate(conversations):
            self.stats["rows"] += 1
            try:
                ids, mask = chat.encode_conversation(tokenizer, self.template, msgs)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"SFT row {i}: {exc}") from None
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            if max_length is not None and len(ids) > max_length:
                if truncation == "drop":
                    self.stats["dropped_too_long"] += 1
                    continue
                self.stats["truncated"] += 1
                sl = slice(0, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
                ids, labels = ids[sl], labels[sl]
            if not _has_target(labels):
                self.stats["dropped_no_supervision"] += 1
                continue
            self.samples.append((ids, labels))
        if not self.samples:
            raise ValueError(f"no SFT row left after truncation to max_length={max_length} "
                             f"(truncation={truncation!r}): {self.stats}")
        self.stats["samples"] = len(self.samples)
        self.rows = self._pack() if packing else [[i] for i in range(len(self.samples))]
        self.stats["rows_out"] = len(self.rows)

    def _pack(self) -> list[list[int]]:
        """First-fit decreasing: sample indices per packed row, each row's total length <= max_length."""
        order = sorted(range(len(self.samples)), key=lambda i: -len(self.samples[i][0]))
        bins: list[list[int]] = []
        free: list[int] = []
        for i in order:
            n = len(self.samples[i][0])
            for b, room in enumerate(free):
                if n <= room:
                    bins[b].append(i)
                    free[b] -= n
                    break
            else:
                bins.append([i])
                free.append(self.max_length - n)
        return bins

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        parts = self.rows[idx]
        if not self.packing:
            ids, labels = self.samples[parts[0]]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        ids, labels, pos, seg = [], [], [], []
        for s, i in enumerate(parts, 1):
            sid, slab = self.samples[i]
            ids += sid
            labels += [IGNORE_INDEX] + slab[1:]  # never predict a sample's first token from the previous sample
            pos += range(len(sid))
            seg += [s] * len(sid)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(pos), "segment_ids": torch.tensor(seg)}

    def num_supervised(self) -> int:
        """Supervised target tokens over the dataset."""
        return sum(sum(lab != IGNORE_INDEX for lab in labels[1:]) for _, labels in self.samples)


def collate(rows: Sequence[Mapping[str, torch.Tensor]], pad_id: int, width: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (or ``width``): ``input_ids`` with ``pad_id``, ``labels`` with -100,
    ``position_ids`` with 0 and ``segment_ids`` with 0 (padding), ``attention_mask`` 1/0. With right padding
    and causal attention no real token ever attends to a pad, so the loss does not need the mask."""
    n = max(len(r["input_ids"]) for r in rows) if width is None else width
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0}
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        out[key] = torch.full((len(rows), n), fill[key], dtype=torch.long)
        for i, r in enumerate(rows):
            out[key][i, : len(r[key])] = r[key]
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, : len(r["input_ids"])] = 1
    out["attention_mask"] = mask
    return out


class SFTBatches:
    """Endless, seeded, resumable batches for ``Trainer``: epoch e visits the rows in the order of
    ``random.Random(seed * 1_000_003 + e)``; global batch s holds rows s*G .. s*G+G-1 of that stream and rank r
    takes its G/W rows. The only state is the global batch index (``state_dict``)."""

    collate_fn = staticmethod(collate)  # rows -> batch (``DPOBatches``: DPO's collate)

    def __init__(self, dataset: SFTDataset, global_batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by the world size {world_size}")
        self.dataset, self.global_batch_size, self.pad_id, self.seed = dataset, global_batch_size, pad_id, seed
        self.rank, self.world_size, self.step = rank, world_size, 0
        self._orders: dict[int, list[int]] = {}

    def _row(self, k: int) -> int:
        n = len(self.dataset)
        epoch, pos = divmod(k, n)
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch][pos]

    def next_batch(self) -> dict[str, torch.Tensor]:
        G, W = self.global_batch_size, self.world_size
        start = self.step * G + self.rank * (G // W)
        rows = [self.dataset[self._row(k)] for k in range(start, start + G // W)]
        self.step += 1
        return self.collate_fn(rows, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "global_batch_size": self.global_batch_size, "seed": self.seed,
                "rows": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("global_batch_size", "seed", "rows"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"SFT data state mismatch: checkpoint has {key}={state[key]}, this run has "
                                 f"{mine[key]}; resuming would not continue the same batches")
        self.step = int(state["step"])


def render_mask(tokenizer: Any, row: Mapping[str, Any], *, color: bool = False) -> str:
    """The tokens of a row separated by ``|``, runs of supervised ones in ``[[...]]`` (green with ``color=True``).

    ``row`` is a dataset item (``input_ids`` + ``labels``) or a ``{"input_ids", "mask"}`` dict."""
    ids = [int(i) for i in row["input_ids"]]
    if "labels" in row:
        sup = [int(lab) != IGNORE_INDEX for lab in row["labels"]]
    else:
        sup = [bool(m) for m in row["mask"]]
    if len(sup) != len(ids):
        raise ValueError(f"render_mask: {len(ids)} input_ids but {len(sup)} labels/mask entries")
    out, run = [], []
    for t, s in zip(ids, sup):
        piece = tokenizer.decode([t]).replace("\n", "\\n")
        if s:
            run.append(piece)
            continue
        if run:
            out.append(_mark("|".join(run), color))
            run = []
        out.append(piece)
    if run:
        out.append(_mark("|".join(run), color))
    return "|".join(out)


def _mark(text: str, color: bool) -> str:
    return f"\x1b[1;32m{text}\x1b[0m" if color else f"[[{text}]]"
