"""Perplexity: sliding windows cover every target once; perplexity = exp(mean CE) by definition, checked against
a plain loop (bigram stand-in), transformers' own loss (tiny random Llama) and our CausalLM's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from intro2llm.evaluation.perplexity import (
    evaluate_perplexity,
    evaluate_text_perplexity,
    model_logits,
    sliding_windows,
)


class Bigram(torch.nn.Module):
    """logits(x_t) depend on x_t only: every window size gives the same per-token loss."""

    def __init__(self, vocab: int = 37) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)  # (B, T, V)


class ByteTok:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("n", [2, 3, 17, 64, 101])
@pytest.mark.parametrize("max_length,stride", [(2, 1), (8, 1), (8, 4), (8, 7), (16, 5), (200, 100)])
def test_windows_score_every_target_once_with_context(n, max_length, stride):
    seen = []
    for begin, end, first in sliding_windows(n, max_length, stride):
        assert 0 <= begin < first < end <= n and end - begin <= max_length
        seen += range(first, end)
        if begin > 0:  # windows after the first: every scored token has >= max_length - stride context tokens
            assert first - begin >= max_length - stride
    assert seen == list(range(1, n))


def test_window_argument_errors():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 8)
    with pytest.raises(ValueError, match="max_length"):
        sliding_windows(10, 1, 1)
    with pytest.raises(ValueError, match="2 tokens"):
        evaluate_perplexity(Bigram(), [3], max_length=4)
    with pytest.raises(ValueError, match="1-D"):
        evaluate_perplexity(Bigram(), torch.zeros(2, 5, dtype=torch.long), max_length=4)
    with pytest.raises(ValueError, match="logits"):
        evaluate_perplexity(lambda x: x.float(), [1, 2, 3], max_length=4, stride=2)


@pytest.mark.parametrize("max_length,stride,batch_size", [(8, 3, 1), (8, 7, 4), (32, 16, 3), (500, 250, 8)])
def test_perplexity_is_exp_mean_ce_by_definition(max_length, stride, batch_size):
    model = Bigram()
    ids = torch.randint(0, 37, (151,), generator=torch.Generator().manual_seed(1))
    res = evaluate_perplexity(model, ids, max_length=max_length, stride=stride, batch_size=batch_size)
    with torch.no_grad():
        logp = torch.log_softmax(model.table.weight.double(), -1)  # (V, V)
    nll = [-float(logp[ids[t - 1], ids[t]]) for t in range(1, len(ids))]  # one token at a time
    assert res.n_tokens == len(ids) - 1
    assert res.mean_nll == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_matches_transformers_loss_single_window():
    model = _tiny_llama()
    ids = torch.randint(0, 61, (1, 50), generator=torch.Generator().manual_seed(2))
    res = evaluate_perplexity(model, ids[0], max_length=64, stride=32)
    with torch.no_grad():
        hf_loss = model(ids, labels=ids).loss  # mean CE over the 49 shifted targets
    assert res.n_tokens == 49
    assert res.perplexity == pytest.approx(math.exp(float(hf_loss)), rel=1e-5)


def test_matches_transformers_window_by_window():
    """Strided + batched + padded windows give the same NLL as transformers' loss on each window alone."""
    model = _tiny_llama()
    ids = torch.randint(0, 61, (131,), generator=torch.Generator().manual_seed(3))
    res = evaluate_perplexity(model, ids, max_length=32, stride=12, batch_size=3)
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), 32, 12):
        x = ids[begin:end][None]
        labels = x.clone()
        labels[0, : first - begin] = -100  # HF shifts labels inside: label at p is the target of p-1
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        total += float(loss) * (end - first)
        count += end - first
    assert res.n_tokens == count == len(ids) - 1
    assert res.nll_sum == pytest.approx(total, rel=1e-5)


def test_bits_per_byte_with_a_byte_tokenizer():
    model = Bigram(256)
    text = "perplexity = exp(mean cross-entropy); 每个字节 counts.\n" * 3
    res = evaluate_text_perplexity(model, ByteTok(), text, max_length=16, stride=8)
    assert res.n_bytes == len(text.encode()) - 1 == res.n_tokens  # one token per byte, the first unscored
    assert res.bits_per_byte == pytest.approx(res.mean_nll / math.log(2))
    assert res.as_dict()["perplexity"] == pytest.approx(2 ** res.bits_per_token)


def test_our_causal_lm():
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 53, (1, 40), generator=torch.Generator().manual_seed(4))
    res = evaluate_perplexity(model, ids[0], max_length=64, stride=32)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert res.perplexity == pytest.approx(math.exp(float(out.loss)), rel=1e-5)
    assert model_logits(model, ids).shape == (1, 40, 53)
    ref = F.cross_entropy(out.logits[0, :-1].double(), ids[0, 1:])
    assert res.mean_nll == pytest.approx(float(ref), rel=1e-5)
