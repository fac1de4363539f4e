"""Perplexity and bits per byte of a causal language model over a corpus, with a sliding window.

    mean NLL = -(1/N) * sum_t log p(x_t | x_<t)      perplexity = exp(mean NLL)
    bits per byte = sum_t -log2 p(x_t | x_<t) / (UTF-8 bytes of the scored text)

A corpus longer than the model's context is cut into windows of ``max_length`` tokens (Hugging Face's
"perplexity of fixed-length models" recipe, without its off-by-one): the first window scores its tokens
1..max_length-1, each later window slides by ``stride`` and scores only its last ``stride`` tokens, so every
token from the second on is scored exactly once and (after the first window) with at least
``max_length - stride`` tokens of context. ``stride = max_length - 1`` is nearly disjoint windows (fast,
little context); smaller strides cost more and give lower, more honest perplexities. Windows are batched.
Bits per byte do not depend on the tokenizer, so models with different vocabularies compare.

Not handled: document boundaries inside a corpus (join documents with an end-of-text token yourself), the
first token (it has no context: it is not scored, unless a BOS token is prepended to the ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from intro2llm.course import lesson_task


def model_logits(model: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``(B, T, V)`` from a model that returns a tensor, a tuple or an object with ``.logits``."""
    out = model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != input_ids.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must map ids {tuple(input_ids.shape)} to logits (B, T, V), got {shape}")
    return out


@dataclass
class PerplexityResult:
    nll_sum: float  # nats, summed over scored tokens
    n_tokens: int  # scored tokens
    n_bytes: int | None  # UTF-8 bytes of the scored text, when known

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.n_bytes else self.nll_sum / math.log(2) / self.n_bytes

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "bits_per_token": self.bits_per_token,
                "bits_per_byte": self.bits_per_byte, "n_tokens": self.n_tokens, "n_bytes": self.n_bytes}


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_target)`` over ``n`` tokens: the model reads ids[begin:end] and the targets
    ids[first_target:end] are scored; over all windows every target 1..n-1 is scored exactly once."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token + one target), got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    end = min(max_length, n)
    windows = [(0, end, 1)]  # the first window scores all its tokens (token 0 has no context)
    while end < n:
        # each later window scores `stride` new tokens, each with >= max_length - stride tokens of context
        new_end = min(end + stride, n)
        windows.append((new_end - max_length, new_end, end))
        end = new_end
    return windows


@torch.no_grad()
@lesson_task(9)
def evaluate_perplexity(model: Callable, ids: Sequence[int] | torch.Tensor, *, max_length: int = 1024,
                        stride: int | None = None, batch_size: int = 8, n_bytes: int | None = None,
                        device: str | torch.device | None = None) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on the token ids of one corpus (1-D)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten() if not isinstance(ids, torch.Tensor) else ids
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one concatenated corpus), got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {ids.numel()}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_bytes is not None and (isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 1):
        raise ValueError(f"n_bytes must be a positive int (the UTF-8 bytes of the scored text) or None, "
                         f"got {n_bytes!r}")
    stride = max(1, max_length // 2) if stride is None else stride
    if device is None:
        params = getattr(model, "parameters", None)
        param0 = next(iter(params()), None) if callable(params) else None
        device = param0.device if param0 is not None else torch.device("cpu")
    windows = sliding_windows(ids.numel(), max_length, stride)
    nll_sum, n_tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T), right padded
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T): target of position t is t+1
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (begin, end, first) in enumerate(batch):
            x[row, : end - begin] = ids[begin:end]
            mask[row, : end - begin] = 1
            # position p predicts token begin+p+1; score targets first..end-1
            labels[row, first - begin - 1: end - begin - 1] = ids[first:end]
        x, labels = x.to(device), labels.to(device)
        # Right padding never leaks into earlier positions under a causal mask, so no attention_mask is passed
        # (some stand-in models do not take one).
        logits = model_logits(model, x).float()  # (B, T, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="sum")
        nll_sum += float(nll.double())
        n_tokens += int((labels != -100).sum())
    return PerplexityResult(nll_sum, n_tokens, n_bytes)


def scored_bytes(tokenizer, text: str, ids: Sequence[int]) -> int | None:
    """UTF-8 bytes of ``text`` the scored tokens (all but the first) stand for, or None when that is not defined:
    when the tokens do not decode back to ``text`` exactly (a lossy or normalizing tokenizer, unknown
    characters, specials that decode to other text), a byte count from the decoded tokens would not be the
    text's, and one from the text would not be the tokens': bits per byte are then not reported."""
    raw = text.encode("utf-8")
    to_bytes = getattr(tokenizer, "decode_bytes", None)
    if to_bytes is not None:
        whole, first = to_bytes(ids), to_bytes(ids[:1])
    else:
        whole, first = tokenizer.decode(ids).encode("utf-8"), tokenizer.decode(ids[:1]).encode("utf-8")
    if whole != raw or not raw.startswith(first) or len(raw) <= len(first):
        return None
    return len(raw) - len(first)


def evaluate_text_perplexity(model: Callable, tokenizer, text: str, **kwargs) -> PerplexityResult:
    """Perplexity and bits per byte of ``text``; the byte count excludes the (unscored) first token, and is
    None (no bits per byte) when the tokenizer does not reproduce the text (see ``scored_bytes``)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    ids = list(tokenizer.encode(text))
    return evaluate_perplexity(model, ids, n_bytes=scored_bytes(tokenizer, text, ids), **kwargs)
