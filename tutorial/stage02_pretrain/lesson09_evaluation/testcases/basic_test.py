"""Lesson 09 basic tests: the definitions worked by hand — perplexity = exp(mean cross-entropy), bits per byte,
the unbiased pass@k estimator, the MMLU prompt, and one program passing / failing / timing out in the sandbox."""

from __future__ import annotations

import math
import sys
from math import comb

import pytest
import torch

from intro2llm.evaluation.humaneval import estimate_pass_at_k, evaluate_samples
from intro2llm.evaluation.mmlu import Question, build_prompt, parse_answer
from intro2llm.evaluation.perplexity import evaluate_perplexity, sliding_windows
from intro2llm.evaluation.sandbox import Sandbox, SandboxLimits, SandboxUnavailableError


class Uniform(torch.nn.Module):
    """A model that knows nothing: equal logits over V tokens, so every token costs log V nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


@pytest.mark.task("evaluate_perplexity")
def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    res = evaluate_perplexity(Uniform(50), list(range(40)), max_length=8, stride=4)
    assert res.n_tokens == 39
    assert res.mean_nll == pytest.approx(math.log(50))
    assert res.perplexity == pytest.approx(50.0)
    assert res.bits_per_token == pytest.approx(math.log2(50))


@pytest.mark.task("evaluate_perplexity")
def test_perplexity_by_hand_on_a_two_token_model():
    # p(next = 1) = 0.8 everywhere: scoring 1, 1, 0 costs -ln .8 - ln .8 - ln .2 nats.
    logit = math.log(0.8 / 0.2)

    def model(ids):
        out = torch.zeros(*ids.shape, 2)
        out[..., 1] = logit
        return out

    res = evaluate_perplexity(model, [0, 1, 1, 0], max_length=4, stride=2, n_bytes=3)
    nll = -(2 * math.log(0.8) + math.log(0.2))
    assert res.nll_sum == pytest.approx(nll)
    assert res.perplexity == pytest.approx(math.exp(nll / 3))
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / 3)


def test_sliding_window_example_from_the_lesson():
    # 10 tokens, windows of 4, stride 2: the first window scores 1..3, then 2 new tokens per window.
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


@pytest.mark.task("estimate_pass_at_k")
def test_pass_at_k_by_hand():
    # n = 5 samples, c = 2 correct: pass@1 = c/n, pass@2 = 1 - C(3,2)/C(5,2) = 0.7, pass@4 = 1 (n - c < k).
    assert estimate_pass_at_k(5, [2], 1)[0] == pytest.approx(0.4)
    assert estimate_pass_at_k(5, [2], 2)[0] == pytest.approx(1 - comb(3, 2) / comb(5, 2)) == pytest.approx(0.7)
    assert estimate_pass_at_k(5, [2], 4)[0] == 1.0
    assert estimate_pass_at_k(5, [0], 5)[0] == 0.0


@pytest.mark.task("build_prompt")
def test_mmlu_prompt_and_answer_parsing():
    q = Question("Which planet is largest?", ("Mars", "Jupiter", "Venus", "Earth"), "B", "astronomy")
    prompt = build_prompt("astronomy", [], q)
    assert prompt == ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                      "Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:")
    assert parse_answer(" B") == "B" and parse_answer("(D)") == "D" and parse_answer(" Jupiter") is None
    # few-shot: each shot is a solved example (question, choices, "Answer: X"), then the open question
    shot = Question("Which planet is red?", ("Mars", "Jupiter", "Venus", "Earth"), "A", "astronomy")
    two = build_prompt("high_school_astronomy", [shot, shot], q)
    assert two.startswith("The following are multiple choice questions (with answers) about high school astronomy.")
    assert two.count("Answer: A\n\n") == 2 and two.endswith("D. Earth\nAnswer:")
    assert two.index("Which planet is red?") < two.index("Which planet is largest?")


def _sandbox_or_skip() -> Sandbox:
    try:
        return Sandbox(SandboxLimits(timeout=1.5))
    except SandboxUnavailableError as exc:  # macOS/Windows/locked-down containers: the lesson explains why
        pytest.skip(f"no OS isolation on this machine: {exc}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's OS layers are Linux-only")
def test_sandbox_pass_fail_timeout():
    with _sandbox_or_skip() as box:
        ok = box.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')")
        assert ok.passed and ok.stdout == "fine\n"
        bad = box.run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5")
        assert bad.status == "failed" and "AssertionError" in bad.stderr
        assert box.run("import sys\nsys.exit(0)").status == "failed"  # exiting early is not passing
        assert box.run("while True:\n    pass").status == "timed out"


@pytest.mark.task("evaluate_samples", "estimate_pass_at_k")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's OS layers are Linux-only")
def test_evaluate_samples_runs_the_tests_and_reports_pass_at_k():
    problems = {
        "t/0": {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
                "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
        "t/1": {"task_id": "t/1", "prompt": "def double(x):\n", "entry_point": "double",
                "test": "def check(f):\n    assert f(4) == 8\n"},
    }
    samples = [{"task_id": "t/0", "completion": "    return a + b\n"},  # right
               {"task_id": "t/0", "completion": "    return a - b\n"},  # wrong
               {"task_id": "t/1", "completion": "    return x * 2\n"},  # right
               {"task_id": "t/1", "completion": "    while True:\n        pass\n"}]  # times out
    with _sandbox_or_skip() as box:
        res = evaluate_samples(samples, k=(1, 2), problems=problems, sandbox=box, n_workers=1)
    assert [r["passed"] for r in res["results"]] == [True, False, True, False]
    # n = 2 samples, c = 1 correct for each problem: pass@1 = 1/2, pass@2 = 1
    assert res["pass@k"] == pytest.approx({"pass@1": 0.5, "pass@2": 1.0})
