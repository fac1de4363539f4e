"""Decode throughput of ``CausalLM.generate``: with vs without the KV cache, and against ``transformers``'
``generate()`` on the same weights (same greedy tokens checked), tiny preset, CPU.

Run: ``pytest benchmarks/bench_generate.py --benchmark-only -q`` or ``python benchmarks/bench_generate.py``
(prints the side-by-side table). Contenders alternate round by round in one process and the best round of each
counts, so the ratios hold on a noisy shared machine; absolute tokens/s mean little on CPU. Both run
single-threaded (``torch.set_num_threads(1)``): on the shared 2-core CI box a second intra-op thread is
often descheduled and stalls every OpenMP region, which would measure the neighbours, not the code.
"""

from __future__ import annotations

import sys
import tempfile

import pytest
import torch

from intro2llm.configs import get_config
from intro2llm.model import CausalLM
from intro2llm.testing import seconds_alternating

PROMPT = 16


def _tiny_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(get_config("tiny")).eval()


def _best_times(fns: dict, rounds: int) -> dict[str, float]:
    """The fastest call of each function after a warm-up call, the functions alternating round by round."""
    return {name: min(ts) for name, ts in seconds_alternating(fns, rounds).items()}


def cache_vs_nocache(new_tokens: int = 256, rounds: int = 1) -> dict[str, float]:
    """Greedy decoding of ``new_tokens`` tokens, batch 1: seconds with and without the cache, and the ratio."""
    model = _tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    cached = model.generate(ids, new_tokens)
    uncached = model.generate(ids, new_tokens, use_cache=False)
    if not torch.equal(cached, uncached):
        raise AssertionError("cached and uncached greedy decoding disagree")
    t = _best_times({"cache": lambda: model.generate(ids, new_tokens),
                     "no_cache": lambda: model.generate(ids, new_tokens, use_cache=False)}, rounds)
    return {**t, "speedup": t["no_cache"] / t["cache"], "tokens_per_s_cache": new_tokens / t["cache"]}


def versus_transformers(batch: int, new_tokens: int = 128, rounds: int = 3) -> dict[str, float]:
    """Decode tokens/s of ours and of transformers' generate() on the same weights, and the ratio."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = _tiny_model()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT))
    hf_gen = lambda: hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    ours_gen = lambda: model.generate(ids, new_tokens)
    same = torch.equal(ours_gen(), hf_gen())
    t = _best_times({"ours": ours_gen, "transformers": hf_gen}, rounds)
    tok = batch * new_tokens
    return {"ours_tokens_per_s": tok / t["ours"], "transformers_tokens_per_s": tok / t["transformers"],
            "speedup": t["transformers"] / t["ours"], "same_tokens": float(same)}


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_generate_cache_vs_no_cache(benchmark):
    benchmark.group = "generate-cache"
    result = benchmark.pedantic(cache_vs_nocache, kwargs=dict(new_tokens=256), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["speedup"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_generate_vs_transformers(benchmark, batch):
    benchmark.group = "generate-vs-transformers"
    result = benchmark.pedantic(versus_transformers, kwargs=dict(batch=batch), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["same_tokens"] == 1.0


if __name__ == "__main__":
    torch.set_num_threads(1)
    new = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    r = cache_vs_nocache(new)
    print(f"tiny, batch 1, {new} new tokens: cache {r['cache']:.2f}s, no cache {r['no_cache']:.2f}s, "
          f"speedup {r['speedup']:.1f}x ({r['tokens_per_s_cache']:.0f} tok/s with cache)")
    for b in (1, 8):
        r = versus_transformers(b)
        print(f"tiny, batch {b}, 128 new tokens: ours {r['ours_tokens_per_s']:.0f} tok/s, transformers "
              f"{r['transformers_tokens_per_s']:.0f} tok/s, ratio {r['speedup']:.2f}x, same tokens: "
              f"{bool(r['same_tokens'])}")
