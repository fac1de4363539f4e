"""Seeded synthetic tasks: a pretraining stream, SFT pairs, DPO triples and a reward function.

Every training stage of the course (pretraining, SFT, DPO, PPO, GRPO) needs data on which a ~10M
parameter model shows a measurable gain on a CPU in minutes. Real corpora cannot give that, so this
module generates small, exactly checkable tasks from a seed (no files, no network).

Tasks
-----
- ``"arithmetic"``: ``a <op> b`` with ``op`` in ``ops`` (default ``+ - *``), operands with
  ``min_digits..max_digits`` digits (default 1-2). Subtraction may give a negative answer.
- ``"reverse"``: reverse a string of ``min_len..max_len`` letters from ``alphabet``.
- ``"sort"``: sort the letters of such a string.

Exact text format (every later stage relies on it)
--------------------------------------------------
prompt   = ``"Q: " + question + "=?\\nA:"``
response = ``" " + answer + "\\n"``
document = prompt + response  (one problem per pretraining document; the tokenized stream joins
           documents with EOS, see ``pretrain_dataset.py``)

==============  ==========================  ============
task            prompt                      response
==============  ==========================  ============
arithmetic      ``"Q: 12+35=?\\nA:"``        ``" 47\\n"``
arithmetic      ``"Q: 7-9=?\\nA:"``          ``" -2\\n"``
arithmetic      ``"Q: 6*13=?\\nA:"``         ``" 78\\n"``
reverse         ``"Q: reverse abcd=?\\nA:"`` ``" dcba\\n"``
sort            ``"Q: sort dbca=?\\nA:"``    ``" abcd\\n"``
==============  ==========================  ============

Reward (``reward(prompt, completion)``): the completion is read up to its first ``"\\n"`` (text after
it is ignored, so a model that keeps generating is not punished for that). The part before must be
``" " + value`` — one leading space, no other spaces. 1.0 if ``value`` equals the answer exactly;
``FORMAT_REWARD`` (0.1) if it is well formed for the task (an integer for arithmetic, letters from the
alphabet for string tasks) but wrong; 0.0 otherwise. The answer is recomputed from the prompt by
``solve``, so no side table is needed.

DPO ``rejected`` responses are plausible wrong answers in the same format (arithmetic: the answer
off by a small amount or with two digits swapped; strings: unreversed/unsorted or two letters
swapped), never equal to the chosen one.

Not handled: division, multi-step problems, natural-language word problems.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

TASKS = ("arithmetic", "reverse", "sort")
FORMAT_REWARD = 0.1

_PROMPT_RE = re.compile(r"^Q: (.*)=\?\nA:$", re.S)
_ARITH_RE = re.compile(r"^(-?\d+)([+\-*])(-?\d+)$")
_INT_RE = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class SyntheticConfig:
    """Which tasks to draw (uniformly) and their sizes."""

    tasks: tuple[str, ...] = ("arithmetic",)
    ops: tuple[str, ...] = ("+", "-", "*")
    min_digits: int = 1
    max_digits: int = 2
    min_len: int = 3
    max_len: int = 6
    alphabet: str = "abcdefghij"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("SyntheticConfig.tasks is empty; choose from " + ", ".join(TASKS))
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown synthetic task {t!r}; choose from {TASKS}")
        for op in self.ops:
            if op not in ("+", "-", "*"):
                raise ValueError(f"unsupported operation {op!r}; supported: '+', '-', '*'")
        if "arithmetic" in self.tasks and not self.ops:
            raise ValueError("SyntheticConfig.ops is empty but the 'arithmetic' task is enabled")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if len(set(self.alphabet)) < 2 or not all(c.isalpha() and c.islower() for c in self.alphabet):
            raise ValueError(f"alphabet must hold >= 2 distinct lower-case letters, got {self.alphabet!r}")


@dataclass(frozen=True)
class Problem:
    """One task instance. ``prompt + response`` is the training text."""

    task: str
    question: str
    answer: str
    prompt: str = field(init=False)
    response: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", format_prompt(self.question))
        object.__setattr__(self, "response", format_response(self.answer))

    @property
    def text(self) -> str:
        return self.prompt + self.response


def format_prompt(question: str) -> str:
    """``"12+35"`` -> ``"Q: 12+35=?\\nA:"``."""
    return f"Q: {question}=?\nA:"


def format_response(answer: str) -> str:
    """``"47"`` -> ``" 47\\n"``."""
    return f" {answer}\n"


def _operand(rng: random.Random, cfg: SyntheticConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def _letters(rng: random.Random, cfg: SyntheticConfig) -> str:
    n = rng.randint(cfg.min_len, cfg.max_len)
    return "".join(rng.choice(cfg.alphabet) for _ in range(n))


def sample_problem(rng: random.Random, config: SyntheticConfig | None = None) -> Problem:
    """Draw one problem with ``rng`` (a ``random.Random``)."""
    cfg = config or SyntheticConfig()
    task = cfg.tasks[rng.randrange(len(cfg.tasks))]
    if task == "arithmetic":
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        op = cfg.ops[rng.randrange(len(cfg.ops))]
        question = f"{a}{op}{b}"
    elif task == "reverse":
        question = "reverse " + _letters(rng, cfg)
    else:
        question = "sort " + _letters(rng, cfg)
    return Problem(task, question, solve_question(question))


def solve_question(question: str) -> str:
    """The exact answer of a question (the part between ``"Q: "`` and ``"=?"``)."""
    m = _ARITH_RE.match(question)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    if question.startswith("reverse "):
        return question[len("reverse ") :][::-1]
    if question.startswith("sort "):
        return "".join(sorted(question[len("sort ") :]))
    raise ValueError(f"not a synthetic question: {question!r}")


def parse_prompt(prompt: str) -> str:
    """Return the question of a prompt in the module's format; ``ValueError`` otherwise."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"prompt is not in the 'Q: <question>=?\\nA:' format: {prompt!r}")
    return m.group(1)


def solve(prompt: str) -> str:
    """The exact answer for a prompt, e.g. ``solve("Q: 12+35=?\\nA:") == "47"``."""
    return solve_question(parse_prompt(prompt))


def task_of(question: str) -> str:
    if question.startswith("reverse "):
        return "reverse"
    if question.startswith("sort "):
        return "sort"
    return "arithmetic"


def extract_answer(completion: str) -> str | None:
    """The value of a completion in the ``" <value>\\n"`` format, else ``None``."""
    line = completion.split("\n", 1)[0]
    if not line.startswith(" ") or len(line) < 2 or " " in line[1:] or "\t" in line:
        return None
    return line[1:]


def reward(prompt: str, completion: str) -> float:
    """1.0 exact answer, ``FORMAT_REWARD`` well-formed but wrong, 0.0 otherwise (see module docstring)."""
    question = parse_prompt(prompt)
    value = extract_answer(completion)
    if value is None:
        return 0.0
    if value == solve_question(question):
        return 1.0
    if task_of(question) == "arithmetic":
        well_formed = bool(_INT_RE.match(value))
    else:
        well_formed = value.isascii() and value.isalpha() and value.islower()
    return FORMAT_REWARD if well_formed else 0.0


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer (same kind of value, never the right one)."""
    ans = problem.answer
    if problem.task == "arithmetic":
        choices = []
        digits = ans.lstrip("-")
        if len(digits) >= 2 and digits[-1] != digits[-2]:
            swapped = digits[:-2] + digits[-1] + digits[-2]
            choices.append(("-" if ans.startswith("-") else "") + str(int(swapped)))
        delta = rng.choice([1, 2, 3, 5, 10]) * rng.choice([-1, 1])
        choices.append(str(int(ans) + delta))
        wrong = rng.choice(choices)
    else:
        src = problem.question.split(" ", 1)[1]
        candidates = [src] if src != ans else []
        if len(set(ans)) > 1:
            # swap two different letters of the right answer: close to it, but wrong
            while True:
                i, j = sorted(rng.sample(range(len(ans)), 2))
                if ans[i] != ans[j]:
                    chars = list(ans)
                    chars[i], chars[j] = chars[j], chars[i]
                    candidates.append("".join(chars))
                    break
        if not candidates:  # a single repeated letter: change one letter
            other = "a" if ans[0] != "a" else "b"
            candidates.append(other + ans[1:])
        wrong = rng.choice(candidates)
    assert wrong != ans
    return wrong


def generate_problems(n: int, *, seed: int = 0, config: SyntheticConfig | None = None) -> list[Problem]:
    """``n`` problems drawn from ``random.Random(seed)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [sample_problem(rng, config) for _ in range(n)]


def pretrain_documents(n: int | None = None, *, seed: int = 0, config: SyntheticConfig | None = None) -> Iterator[str]:
    """Documents ``prompt + response`` (infinite when ``n`` is None)."""
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        yield sample_problem(rng, config).text
        i += 1


def sft_pairs(n: int, *, seed: int = 0, config: SyntheticConfig | None = None) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs."""
    return [(p.prompt, p.response) for p in generate_problems(n, seed=seed, config=config)]


def dpo_triples(n: int, *, seed: int = 0, config: SyntheticConfig | None = None) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) triples; rejected is a plausible wrong answer."""
    problems = generate_problems(n, seed=seed, config=config)
    rng = random.Random(seed + 1_000_003)  # separate stream so the problems equal sft_pairs(n, seed)
    return [(p.prompt, p.response, format_response(wrong_answer(p, rng))) for p in problems]


def prompts_and_answers(n: int, *, seed: int = 0, config: SyntheticConfig | None = None) -> list[tuple[str, str]]:
    """``n`` (prompt, answer-without-format) pairs, for evaluation and RL."""
    return [(p.prompt, p.answer) for p in generate_problems(n, seed=seed, config=config)]


def accuracy(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of completions with reward 1.0."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return 0.0
    return sum(reward(p, c) == 1.0 for p, c in zip(prompts, completions)) / len(prompts)
