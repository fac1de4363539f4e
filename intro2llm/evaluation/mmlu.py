"""MMLU (Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding"): k-shot multiple choice.

Data layout (the original release, as in ``../shared/data/mmlu``): ``DIR/{dev,val,test}/<subject>_<split>.csv``,
no header, columns ``question, A, B, C, D, answer``. Prompts follow the original ``evaluate.py``::

    The following are multiple choice questions (with answers) about <subject words>.

    <dev question 1>
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    ... (k dev examples) ...
    <test question>
    A. ...
    Answer:

Scoring (default, "loglik"): the answer is the letter whose continuation ``" A"``/``" B"``/... has the highest
log-likelihood after ``Answer:``. "generate" mode lets the model write a few tokens and parses the first
letter A-D (none → wrong). Shots are dropped (k, k-1, ...) until the prompt fits the context. Reported:
per-subject accuracy, macro (mean over subjects) and micro (over all questions) accuracy.

Not handled: chain-of-thought prompting, MMLU-Pro / other variants, calibration metrics.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from intro2llm.course import lesson_task

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    subject: str


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(q: Question, include_answer: bool = True) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    return text + (f" {q.answer}\n\n" if include_answer else "")


@lesson_task(9)
def build_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    """The original MMLU k-shot prompt (k = len(shots)) ending in ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_example(s) for s in shots) + format_example(q, include_answer=False)


def list_subjects(data_dir: str | os.PathLike, split: str = "test") -> list[str]:
    folder = os.path.join(os.fspath(data_dir), split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"MMLU split folder not found: {folder} (expected DIR/{{dev,val,test}}/)")
    suffix = f"_{split}.csv"
    subjects = sorted(f[: -len(suffix)] for f in os.listdir(folder) if f.endswith(suffix))
    if not subjects:
        raise FileNotFoundError(f"no '*{suffix}' files in {folder}")
    return subjects


def load_split(data_dir: str | os.PathLike, subject: str, split: str) -> list[Question]:
    """Questions of one subject and split; a malformed row raises ``ValueError`` naming the file and row."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = os.path.join(os.fspath(data_dir), split, f"{subject}_{split}.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MMLU file not found: {path}")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_no, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                raise ValueError(f"{path}, row {row_no}: expected 6 columns (question, A, B, C, D, answer), "
                                 f"got {len(row)}")
            answer = row[5].strip()
            if answer not in LETTERS:
                raise ValueError(f"{path}, row {row_no}: answer must be one of A-D, got {row[5]!r}")
            out.append(Question(row[0], (row[1], row[2], row[3], row[4]), answer, subject))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def loglik_scorer(model: Callable, tokenizer, max_length: int | None = None) -> Callable[[str], list[float]]:
    """A scorer from a causal LM: prompt → log-likelihood of each of " A", " B", " C", " D" after it."""
    import torch

    from intro2llm.evaluation.perplexity import model_logits

    conts = [list(tokenizer.encode(" " + letter)) for letter in LETTERS]
    single = all(len(c) == 1 for c in conts)

    @torch.no_grad()
    def score(prompt: str) -> list[float]:
        ids = list(tokenizer.encode(prompt))
        if max_length is not None:
            ids = ids[-(max_length - max(len(c) for c in conts)):]  # left-truncate only if shots could not fit
        if single:  # one forward pass: the next-token distribution after "Answer:"
            logp = torch.log_softmax(model_logits(model, torch.tensor([ids]))[0, -1].float(), -1)  # (V,)
            return [float(logp[c[0]]) for c in conts]
        scores = []
        for c in conts:
            x = torch.tensor([ids + c])
            logp = torch.log_softmax(model_logits(model, x)[0].float(), -1)  # (T, V)
            scores.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(c)))
        return scores

    return score


_LETTER_RE = re.compile(r"^\s*\(?([ABCD])(?![A-Za-z])")


def parse_answer(text: str) -> str | None:
    """The letter a generated answer starts with (``" B"``, ``"(C)"``, ``"D. ..."``), else None."""
    m = _LETTER_RE.match(text)
    return m.group(1) if m else None


@lesson_task(9)
def evaluate_mmlu(data_dir: str | os.PathLike, scorer: Callable[[str], Sequence[float]] | None = None, *,
                  generate: Callable[[str], str] | None = None, k: int = 5, split: str = "test",
                  subjects: Sequence[str] | None = None, limit: int | None = None,
                  count_tokens: Callable[[str], int] | None = None, max_length: int | None = None) -> dict:
    """Accuracy of ``scorer`` (prompt → 4 scores, highest wins) or ``generate`` (prompt → text, parsed).

    ``count_tokens`` + ``max_length`` drop shots until the prompt (plus one answer token) fits. ``limit``
    caps the questions per subject. Returns ``{"subjects": {name: {"accuracy", "correct", "n", "k_used"}},
    "macro": ..., "micro": ..., "n": ...}``.
    """
    if (scorer is None) == (generate is None):
        raise ValueError("pass exactly one of scorer= (log-likelihood mode) or generate= (generate-then-parse)")
    if not 0 <= k <= 5:
        raise ValueError(f"k must be in 0..5 (the dev split has 5 examples per subject), got {k}")
    if (count_tokens is None) != (max_length is None):
        raise ValueError("count_tokens and max_length go together")
    subjects = list(subjects) if subjects is not None else list_subjects(data_dir, split)
    per_subject = {}
    total_correct = total_n = 0
    for subject in subjects:
        shots_all = load_split(data_dir, subject, "dev")[:k] if k else []
        questions = load_split(data_dir, subject, split)[: limit if limit is not None else None]
        correct, k_used = 0, []
        for q in questions:
            shots = list(shots_all)
            prompt = build_prompt(subject, shots, q)
            while count_tokens is not None and shots and count_tokens(prompt) + 1 > max_length:
                shots.pop()  # drop the last shot, as the original script lowers k
                prompt = build_prompt(subject, shots, q)
            k_used.append(len(shots))
            if scorer is not None:
                scores = list(scorer(prompt))
                if len(scores) != 4:
                    raise ValueError(f"scorer must return 4 scores (A-D), got {len(scores)}")
                pred = LETTERS[max(range(4), key=lambda i: scores[i])]
            else:
                pred = parse_answer(generate(prompt))
            correct += pred == q.answer
        n = len(questions)
        per_subject[subject] = {"accuracy": correct / n, "correct": correct, "n": n,
                                "k_used": min(k_used) if k_used else k}
        total_correct += correct
        total_n += n
    macro = sum(s["accuracy"] for s in per_subject.values()) / len(per_subject) if per_subject else 0.0
    return {"subjects": per_subject, "macro": macro, "micro": total_correct / total_n if total_n else 0.0,
            "n": total_n, "k": k, "split": split}


def greedy_generator(model: Callable, tokenizer, max_new_tokens: int = 4,
                     max_length: int | None = None) -> Callable[[str], str]:
    """prompt → a few greedy tokens, for ``evaluate_mmlu(generate=...)``; the model sees at most the last
    ``max_length`` tokens."""
    import torch

    from intro2llm.evaluation.perplexity import model_logits

    @torch.no_grad()
    def gen(prompt: str) -> str:
        ids = list(tokenizer.encode(prompt))
        start = len(ids)
        for _ in range(max_new_tokens):
            window = ids if max_length is None else ids[-max_length:]
            ids.append(int(model_logits(model, torch.tensor([window]))[0, -1].argmax()))
        return tokenizer.decode(ids[start:])

    return gen
