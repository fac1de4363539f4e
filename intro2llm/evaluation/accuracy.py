"""Exact-match accuracy of greedy answers on the synthetic arithmetic task (``intro2llm.data.synthetic``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def synthetic_accuracy(model: nn.Module, tokenizer: Any, n: int = 200, seed: int = 12345,
                       batch_size: int = 50) -> float:
    """Exact-match accuracy of greedy answers on ``n`` fresh synthetic problems (``synthetic.accuracy``)."""
    from intro2llm.data import synthetic

    pairs = synthetic.prompts_and_answers(n, seed=seed)
    prompts = [p for p, _ in pairs]
    pad = tokenizer.eos_token_id
    completions: list[str] = []
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        chunk = [tokenizer.encode(p) for p in prompts[i:i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        out = model.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=pad)
        completions += [tokenizer.decode(row[width:].tolist()) for row in out]
    return synthetic.accuracy(prompts, completions)
