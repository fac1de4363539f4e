"""Lesson 09 advanced tests: the sandbox's OS walls (read-only filesystem, no network, process clean-up) hold
even for code that goes around Python, perplexity with a stride matches transformers, and MMLU's oracle /
constant scorers on small files written here."""

from __future__ import annotations

import csv
import math
import os
import sys
import tempfile

import pytest
import torch

from intro2llm.evaluation.mmlu import evaluate_mmlu
from intro2llm.evaluation.perplexity import evaluate_perplexity
from intro2llm.evaluation.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's OS layers are Linux-only")


@linux_only
def test_ctypes_cannot_escape_the_sandbox():
    try:
        box = Sandbox(SandboxLimits(timeout=2.0))
    except SandboxUnavailableError as exc:
        pytest.skip(f"no OS isolation on this machine: {exc}")
    target = tempfile.mkdtemp(prefix="intro2llm-lesson09-")
    os.chmod(target, 0o777)  # world-writable: only the sandbox's read-only view (or its uid) stands in the way
    try:
        with box:
            # Python guards are bypassed on purpose: libc's system() and a raw socket().
            r = box.run(f"import ctypes\nlibc = ctypes.CDLL(None)\nlibc.system(b'touch {target}/pwned')\n"
                        "assert libc.socket(2, 1, 0) < 0, 'got an internet socket'\n"
                        "print(open('mine.txt', 'w').write('the temp dir is writable'))")
            assert r.passed, r.stderr  # the attempts failed quietly; the program's own temp dir works
            if box.isolation["namespaces"]:
                assert os.listdir(target) == []
            r = box.run("import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass")
            assert r.status == "timed out"
    finally:
        for name in os.listdir(target):
            os.unlink(os.path.join(target, name))
        os.rmdir(target)


@pytest.mark.task("evaluate_perplexity")
def test_strided_perplexity_equals_transformers_on_one_window():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = math.exp(float(model(ids, labels=ids).loss))
    assert evaluate_perplexity(model, ids[0], max_length=32, stride=8).perplexity == pytest.approx(expected, rel=1e-5)
    # Shorter windows lose context, so the model is (in general) more surprised: a different number.
    short = evaluate_perplexity(model, ids[0], max_length=4, stride=3, batch_size=2)
    assert short.n_tokens == 29 and short.perplexity != pytest.approx(expected, rel=1e-6)


@pytest.mark.task("evaluate_mmlu", "build_prompt")
def test_mmlu_oracle_and_constant_on_small_files(tmp_path):
    rows = [("2+2?", "3", "4", "5", "6", "B"), ("3+3?", "6", "7", "8", "9", "A"), ("1+0?", "0", "2", "1", "3", "C"),
            ("5-5?", "1", "2", "3", "0", "D")]
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        with open(tmp_path / split / f"arithmetic_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    answers = iter(r[5] for r in rows)

    def oracle(prompt: str) -> list[float]:  # knows the answer of each question, in file order
        answer = next(answers)
        return [float(letter == answer) for letter in "ABCD"]

    res = evaluate_mmlu(tmp_path, oracle, k=3)
    assert res["micro"] == 1.0 and res["subjects"]["arithmetic"]["k_used"] == 3
    res = evaluate_mmlu(tmp_path, lambda p: [0.0, 0.0, 0.0, 1.0], k=0)  # always "D": 1 of 4 answers is D
    assert res["micro"] == pytest.approx(0.25)
