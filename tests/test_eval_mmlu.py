"""MMLU: data loading, the original prompt format, oracle (= 1.0) and constant (= share of the letter) scorers,
shot dropping, generate-then-parse, log-likelihood scoring against a by-hand computation, bad input."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

import intro2llm
from intro2llm.evaluation import mmlu

LIMIT = 25  # questions per subject on the real data: keeps the test to a second or two


def _shared_mmlu() -> Path | None:
    env = os.environ.get("INTRO2LLM_MMLU_DIR")
    if env:
        return Path(env)
    candidate = Path(intro2llm.__file__).resolve().parents[1].parent / "shared" / "data" / "mmlu"
    return candidate if (candidate / "test").is_dir() else None


def _write_small(root: Path) -> Path:
    rows = {
        "toy_math": [("1+1?", "1", "2", "3", "4", "B"), ("2*3?", "5", "6", "7", "8", "B"),
                     ("10-7?", "3", "4", "5", "6", "A"), ("9/3?", "1", "2", "3", "4", "C"),
                     ("2**3?", "6", "7", "9", "8", "D")],
        "toy_words": [('Opposite of "hot", with a comma, inside?', "cold", "warm", "red", "tall", "A"),
                      ("Plural of mouse?", "mouses", "mice", "meese", "mouse", "B"),
                      ("Multi\nline question?", "x", "y", "z", "w", "C")],
    }
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True)
        for subject, data in rows.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(data)
    return root


@pytest.fixture(params=["shared", "small"])
def data_dir(request, tmp_path) -> tuple[Path, int | None]:
    if request.param == "shared":
        shared = _shared_mmlu()
        if shared is None:  # the small files below still cover everything; the real set is an extra
            return _write_small(tmp_path / "mmlu"), None
        return shared, LIMIT
    return _write_small(tmp_path / "mmlu"), None


def _answers(root: Path, subjects: list[str], limit: int | None) -> list[str]:
    """The answer column read straight from the CSVs (independently of the code under test)."""
    out = []
    for s in subjects:
        with open(root / "test" / f"{s}_test.csv", newline="", encoding="utf-8") as f:
            out += [row[5] for row in csv.reader(f)][: limit if limit is not None else None]
    return out


def test_prompt_format_is_the_original():
    q = mmlu.Question("What is 2+2?", ("3", "4", "5", "6"), "B", "elementary_mathematics")
    shot = mmlu.Question("1+1?", ("2", "3", "4", "5"), "A", "elementary_mathematics")
    expected = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert mmlu.build_prompt("elementary_mathematics", [shot], q) == expected


@pytest.mark.parametrize("k", [0, 5])
def test_oracle_scores_one_and_constant_scores_the_letter_share(data_dir, k):
    root, limit = data_dir
    subjects = mmlu.list_subjects(root)
    answers = _answers(root, subjects, limit)
    it = iter(answers)

    def oracle(prompt: str) -> list[float]:
        assert prompt.endswith("\nAnswer:")
        ans = next(it)
        return [float(letter == ans) for letter in mmlu.LETTERS]

    res = mmlu.evaluate_mmlu(root, oracle, k=k, limit=limit)
    assert res["micro"] == 1.0 and res["macro"] == 1.0 and res["n"] == len(answers)
    assert set(res["subjects"]) == set(subjects)
    for letter in "AC":
        res = mmlu.evaluate_mmlu(root, lambda p, letter=letter: [float(x == letter) for x in "ABCD"], k=k,
                                 limit=limit)
        assert res["micro"] == pytest.approx(answers.count(letter) / len(answers))
        for name, s in res["subjects"].items():
            with open(root / "dev" / f"{name}_dev.csv", newline="", encoding="utf-8") as f:
                assert s["k_used"] == min(k, len(list(csv.reader(f))))


def test_macro_and_micro_differ_as_defined(tmp_path):
    root = _write_small(tmp_path / "mmlu")
    res = mmlu.evaluate_mmlu(root, lambda p: [0, 1, 0, 0], k=0)  # always "B"
    assert res["subjects"]["toy_math"]["accuracy"] == pytest.approx(2 / 5)
    assert res["subjects"]["toy_words"]["accuracy"] == pytest.approx(1 / 3)
    assert res["micro"] == pytest.approx(3 / 8)
    assert res["macro"] == pytest.approx((2 / 5 + 1 / 3) / 2)


def test_shots_dropped_to_fit(tmp_path):
    root = _write_small(tmp_path / "mmlu")
    lengths = []

    def scorer(prompt):
        lengths.append(len(prompt))
        return [1, 0, 0, 0]

    full = mmlu.evaluate_mmlu(root, scorer, k=5, subjects=["toy_math"])
    longest = max(lengths)
    lengths.clear()
    budget = longest - 60  # too small for 5 shots, large enough for fewer
    res = mmlu.evaluate_mmlu(root, scorer, k=5, subjects=["toy_math"], count_tokens=len, max_length=budget)
    assert full["subjects"]["toy_math"]["k_used"] == 5
    assert 0 < res["subjects"]["toy_math"]["k_used"] < 5
    assert max(lengths) + 1 <= budget


def test_generate_then_parse(tmp_path):
    root = _write_small(tmp_path / "mmlu")
    assert [mmlu.parse_answer(t) for t in (" B", "(C) mice", "D. 8", " A\n", "Answer", " none", "")] == [
        "B", "C", "D", "A", None, None, None]
    answers = _answers(root, ["toy_math", "toy_words"], None)
    it = iter(answers)
    res = mmlu.evaluate_mmlu(root, generate=lambda p: f" {next(it)}. because", k=2)
    assert res["micro"] == 1.0
    res = mmlu.evaluate_mmlu(root, generate=lambda p: " I am not sure", k=2)
    assert res["micro"] == 0.0


class ByteTok:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_loglik_scorer_matches_a_by_hand_computation():
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512)).eval()
    q = mmlu.Question("1+1?", ("1", "2", "3", "4"), "B", "toy")
    prompt = mmlu.build_prompt("toy", [], q)
    scores = mmlu.loglik_scorer(model, ByteTok())(prompt)  # " A" is 2 byte tokens: the multi-token path
    ids = list(prompt.encode())
    for letter, score in zip("ABCD", scores):
        x = torch.tensor([ids + [32, ord(letter)]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
        expected = float(logp[len(ids) - 1, 32] + logp[len(ids), ord(letter)])
        assert score == pytest.approx(expected, abs=1e-4)


def test_bad_input(tmp_path):
    root = _write_small(tmp_path / "mmlu")
    bad = root / "test" / "toy_math_test.csv"
    bad.write_text('q,a,b,c,d,B\n"only",three,cols\n')
    with pytest.raises(ValueError, match=r"toy_math_test\.csv, row 2: expected 6 columns"):
        mmlu.evaluate_mmlu(root, lambda p: [1, 0, 0, 0], k=0)
    bad.write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"row 1: answer must be one of A-D"):
        mmlu.evaluate_mmlu(root, lambda p: [1, 0, 0, 0], k=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mmlu.evaluate_mmlu(tmp_path / "nowhere", lambda p: [1, 0, 0, 0])
    with pytest.raises(FileNotFoundError, match="toy_missing_dev.csv"):
        mmlu.evaluate_mmlu(root, lambda p: [1, 0, 0, 0], subjects=["toy_missing"])
    with pytest.raises(ValueError, match="exactly one"):
        mmlu.evaluate_mmlu(root)
    with pytest.raises(ValueError, match="k must be"):
        mmlu.evaluate_mmlu(root, lambda p: [1, 0, 0, 0], k=6)
