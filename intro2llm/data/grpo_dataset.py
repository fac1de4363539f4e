"""``GRPODataset``: prompts with their reference answers, for group-sampled RL (lesson 13).

GRPO samples G responses per prompt and compares them within the group, so a step needs prompts (and whatever a
reward function checks them against), not responses. The dataset hands out prompts in shuffled epochs (seeded;
the position is the only state a checkpoint needs) and ``repeat`` lays out each prompt G times, consecutively:
row ``i`` of a batch belongs to group ``i // G`` (the layout ``generate_responses`` and ``group_advantages`` use).

An item may also carry ready-made ``responses`` with ``rewards`` (an offline group, e.g. the outline's "several
responses per prompt" scored beforehand); ``groups()`` returns those for the softmax-weighted loss without sampling.

Not handled: multi-turn prompts, images, streaming datasets.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from intro2llm.course import lesson_task


@dataclass
class GRPOItem:
    """One prompt; ``answer`` is what a reward function may compare with; optional offline ``responses``."""

    prompt: str
    answer: str | None = None
    responses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


@lesson_task(13)
class GRPODataset:
    """A list of ``GRPOItem`` served in seeded shuffled epochs; ``num_generations`` responses per prompt."""

    def __init__(self, items: Sequence[GRPOItem | tuple[str, str] | str], num_generations: int = 8,
                 seed: int = 0) -> None:
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ValueError(f"GRPODataset: num_generations must be an int >= 2 (a group needs at least two responses"
                             f" to compare), got {num_generations!r}")
        self.items: list[GRPOItem] = []
        for i, it in enumerate(items):
            if isinstance(it, str):
                it = GRPOItem(it)
            elif isinstance(it, tuple):
                it = GRPOItem(*it)
            if not isinstance(it, GRPOItem) or not isinstance(it.prompt, str) or not it.prompt:
                raise ValueError(f"GRPODataset: item {i} must be a non-empty prompt, (prompt, answer) or GRPOItem")
            if len(it.responses) != len(it.rewards):
                raise ValueError(f"GRPODataset: item {i} has {len(it.responses)} responses but {len(it.rewards)} "
                                 "rewards")
            if it.responses and len(it.responses) < 2:
                raise ValueError(f"GRPODataset: item {i} has {len(it.responses)} offline response(s); "
                                 "a group needs >= 2")
            self.items.append(it)
        if not self.items:
            raise ValueError("GRPODataset: no prompts")
        self.num_generations = num_generations
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle(0)

    @classmethod
    def from_synthetic(cls, n: int, *, seed: int = 0, num_generations: int = 8, config: Any = None) -> GRPODataset:
        """``n`` synthetic problems (``intro2llm.data.synthetic``) as (prompt, answer) items."""
        from intro2llm.data import synthetic

        return cls(synthetic.prompts_and_answers(n, seed=seed, config=config), num_generations, seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> GRPOItem:
        return self.items[i]

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_prompts(self, k: int) -> list[GRPOItem]:
        """The next ``k`` distinct-position items of the shuffled stream (a new epoch reshuffles)."""
        out = []
        for _ in range(k):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle(self.epoch)
            out.append(self.items[self._order[self.position]])
            self.position += 1
        return out

    def repeat(self, items: Sequence[GRPOItem]) -> list[GRPOItem]:
        """Each item ``num_generations`` times in a row (row i belongs to group i // G)."""
        return [it for it in items for _ in range(self.num_generations)]

    def groups(self) -> Iterator[tuple[str, list[str], list[float]]]:
        """(prompt, responses, rewards) of the items that carry offline responses."""
        for it in self.items:
            if it.responses:
                yield it.prompt, list(it.responses), list(it.rewards)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._shuffle(self.epoch)
