"""Tokenizer benchmarks: our byte-level BPE against Hugging Face ``tokenizers`` and tiktoken, side by side.

* ``tokenizer-train``: train an 8192-token byte-level BPE (GPT-2 pattern, min_frequency 2) on 20 MB of Python
  standard-library source — ours (parallel word counting + C++ merge loop) vs ``tokenizers``' BpeTrainer with the
  same pre-tokenizer. Peak memory of each, measured in a fresh process (VmHWM after clear_refs, minus VmRSS
  before), and compression (bytes per token) on held-out stdlib files go in ``extra_info``.
* ``tokenizer-encode``: encode 2 MB of held-out source — ours (C++ encoder; and the Python path with a warm word
  cache) vs tiktoken built from our ranks (same ids, checked) vs ``tokenizers`` (our exported tokenizer.json).

    pytest benchmarks/bench_tokenizer.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median
    python benchmarks/bench_tokenizer.py        # one side-by-side summary (best of 3) as JSON

``INTRO2LLM_BENCH_TRAIN_MB`` (default 20) and ``INTRO2LLM_BENCH_ENCODE_MB`` (default 2) resize the corpora. CPU
figures are ratios from one run on a shared machine; take the best of several rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from intro2llm.data.corpora import python_stdlib
from intro2llm.testing import best_seconds
from intro2llm.tokenizer import ByteLevelBPETokenizer

TRAIN_BYTES = int(float(os.environ.get("INTRO2LLM_BENCH_TRAIN_MB", "20")) * 1e6)
ENCODE_BYTES = int(float(os.environ.get("INTRO2LLM_BENCH_ENCODE_MB", "2")) * 1e6)
VOCAB = 8192
MIN_FREQUENCY = 2
_cache: dict = {}


def corpora() -> tuple[list[str], str]:
    """(training texts of TRAIN_BYTES, held-out text of ENCODE_BYTES from the files after them)."""
    if "corpora" not in _cache:
        files = list(python_stdlib(TRAIN_BYTES + ENCODE_BYTES + 2_000_000))
        train, total = [], 0
        for text in files:
            if total >= TRAIN_BYTES:
                break
            train.append(text)
            total += len(text.encode("utf-8"))
        held = "".join(files[len(train) :]).encode("utf-8")[:ENCODE_BYTES].decode("utf-8", errors="ignore")
        _cache["corpora"] = (train, held)
    return _cache["corpora"]


def train_ours(texts: list[str]) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer("gpt2").train(texts, VOCAB, min_frequency=MIN_FREQUENCY)


def train_hf(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(ByteLevelBPETokenizer("gpt2").pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=MIN_FREQUENCY,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def trained() -> tuple[ByteLevelBPETokenizer, object]:
    if "trained" not in _cache:
        train, _ = corpora()
        _cache["trained"] = (train_ours(train), train_hf(train))
    return _cache["trained"]


_MEMORY_SCRIPT = r"""
import sys
sys.path.insert(0, {bench_dir!r})
import bench_tokenizer as b

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

train, _ = b.corpora()
if {which!r} == "ours":
    import torch, intro2llm._C  # loaded before the baseline: library code is not training memory
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
(b.train_ours if {which!r} == "ours" else b.train_hf)(train)
print(status("VmHWM:") - before)
"""


def peak_training_memory(which: str) -> int | None:
    """Bytes of peak RSS growth while training, in a fresh process (None where /proc does not allow it)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = _MEMORY_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def bytes_per_token(held: str) -> dict[str, float]:
    ours, hf = trained()
    n = len(held.encode("utf-8"))
    return {"ours": n / len(ours.encode(held)), "hf": n / len(hf.encode(held).ids)}


# ---- pytest-benchmark --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ours", "hf"])
def test_train(benchmark, impl):
    train, held = corpora()
    fn = train_ours if impl == "ours" else train_hf
    benchmark.group = f"tokenizer-train-{TRAIN_BYTES / 1e6:g}MB-{VOCAB}"
    result = benchmark.pedantic(fn, args=(train,), rounds=3, iterations=1)
    benchmark.extra_info["train_bytes"] = sum(len(t.encode("utf-8")) for t in train)
    benchmark.extra_info["peak_memory_MB"] = round((peak_training_memory(impl) or 0) / 2**20, 1)
    n = len(held.encode("utf-8"))
    ids = result.encode(held) if impl == "ours" else result.encode(held).ids
    benchmark.extra_info["held_out_bytes_per_token"] = round(n / len(ids), 4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ours-cpp", "ours-python", "tiktoken", "hf", "hf-batch"])
def test_encode(benchmark, impl, tmp_path):
    _, held = corpora()
    ours, _ = trained()
    reference = ours.to_tiktoken().encode_ordinary(held)
    fn = _encoder(impl, ours, held, tmp_path)
    benchmark.group = f"tokenizer-encode-{ENCODE_BYTES / 1e6:g}MB"
    ids = benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    assert impl == "hf-batch" or ids == reference, f"{impl} gave different ids"
    benchmark.extra_info["MB/s"] = round(len(held.encode("utf-8")) / benchmark.stats.stats.min / 1e6, 2)


def _encoder(impl: str, ours: ByteLevelBPETokenizer, held: str, tmp_dir):
    if impl == "ours-cpp":
        tok = ByteLevelBPETokenizer.from_hf(ours.export_hf(os.path.join(tmp_dir, "cpp")))
        tok.encoder = "cpp"
        return lambda: tok.encode(held)
    if impl == "ours-python":
        tok = ByteLevelBPETokenizer.from_hf(ours.export_hf(os.path.join(tmp_dir, "py")))
        tok.encoder = "python"
        return lambda: tok.encode(held)
    if impl == "tiktoken":
        enc = ours.to_tiktoken()
        return lambda: enc.encode_ordinary(held)
    import tokenizers

    hf = tokenizers.Tokenizer.from_file(ours.export_hf(os.path.join(tmp_dir, "hf")))
    if impl == "hf":
        return lambda: hf.encode(held).ids
    # hf-batch: its parallel batch API over lines (ids differ slightly where a whitespace run spans two lines)
    lines = held.splitlines(keepends=True)
    return lambda: [i for e in hf.encode_batch_fast(lines) for i in e.ids]


# ---- one side-by-side summary --------------------------------------------------------------------------------------
def summary(rounds: int = 3) -> dict:
    """Best-of-``rounds`` times for both trainers and all encoders, in one process, plus memory and compression."""
    import tempfile

    train, held = corpora()
    out: dict = {"train_MB": round(sum(len(t.encode()) for t in train) / 1e6, 2), "vocab": VOCAB}
    out["train_s"] = {"ours": best_seconds(lambda: train_ours(train), rounds),
                      "hf": best_seconds(lambda: train_hf(train), rounds)}
    out["train_ratio_ours_over_hf"] = round(out["train_s"]["ours"] / out["train_s"]["hf"], 3)
    out["peak_train_memory_MB"] = {k: round((peak_training_memory(k) or 0) / 2**20, 1) for k in ("ours", "hf")}
    out["held_out_bytes_per_token"] = {k: round(v, 4) for k, v in bytes_per_token(held).items()}
    ours, _ = trained()
    reference = ours.to_tiktoken().encode_ordinary(held)
    n = len(held.encode("utf-8"))
    out["encode_MB"] = round(n / 1e6, 2)
    out["encode_MB_per_s"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("ours-cpp", "ours-python", "tiktoken", "hf", "hf-batch"):
            fn = _encoder(impl, ours, held, tmp)
            ids = fn()  # also warms the Python word cache
            assert impl == "hf-batch" or ids == reference, impl
            out["encode_MB_per_s"][impl] = round(n / best_seconds(fn, rounds + 2) / 1e6, 2)
    speed = out["encode_MB_per_s"]
    out["encode_ratio_ours_over_tiktoken"] = round(speed["ours-cpp"] / speed["tiktoken"], 3)
    out["encode_ratio_ours_over_hf"] = round(speed["ours-cpp"] / speed["hf"], 3)
    return out


if __name__ == "__main__":
    print(json.dumps(summary(), indent=1))
