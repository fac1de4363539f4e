"""Tests for intro2llm.data.synthetic: format, determinism, answers, DPO triples, reward."""

import random
import re

import pytest

from intro2llm.data import synthetic as syn

PROMPT_RE = re.compile(r"^Q: (.+)=\?\nA:$")
ALL = syn.SyntheticConfig(tasks=syn.TASKS)


def _oracle(question: str) -> str:
    # independent of the module: Python evaluates the arithmetic, slicing/sorted the string tasks
    if question.startswith("reverse "):
        return question.split(" ", 1)[1][::-1]
    if question.startswith("sort "):
        return "".join(sorted(question.split(" ", 1)[1]))
    assert re.fullmatch(r"\d+[+\-*]\d+", question), question
    return str(eval(question))  # noqa: S307 - digits and one operator only, checked above


def test_format_and_answers_all_tasks():
    problems = syn.generate_problems(600, seed=3, config=ALL)
    assert {p.task for p in problems} == set(syn.TASKS)
    for p in problems:
        m = PROMPT_RE.match(p.prompt)
        assert m, p.prompt
        assert m.group(1) == p.question
        assert p.response == f" {p.answer}\n"
        assert p.answer == _oracle(p.question)
        assert p.text == p.prompt + p.response


def test_known_format_example():
    assert syn.format_prompt("12+35") == "Q: 12+35=?\nA:"
    assert syn.format_response("47") == " 47\n"
    assert syn.solve("Q: 12+35=?\nA:") == "47"
    assert syn.solve("Q: 7-9=?\nA:") == "-2"
    assert syn.solve("Q: reverse abcd=?\nA:") == "dcba"
    assert syn.solve("Q: sort dbca=?\nA:") == "abcd"


def test_deterministic_and_seed_dependent():
    a = list(syn.pretrain_documents(50, seed=7, config=ALL))
    b = list(syn.pretrain_documents(50, seed=7, config=ALL))
    c = list(syn.pretrain_documents(50, seed=8, config=ALL))
    assert a == b
    assert a != c


def test_sizes_and_ops_configurable():
    cfg = syn.SyntheticConfig(ops=("+",), min_digits=3, max_digits=3)
    for p in syn.generate_problems(200, seed=0, config=cfg):
        a, b = p.question.split("+")
        assert len(a) == 3 and len(b) == 3
    ops = {re.search(r"[+\-*]", p.question).group() for p in syn.generate_problems(300, seed=1)}
    assert ops == {"+", "-", "*"}
    # default: 1-2 digit operands (small numbers are learnable by a tiny model)
    for p in syn.generate_problems(300, seed=2):
        assert all(len(x) <= 2 for x in re.split(r"[+\-*]", p.question))


def test_pretrain_stream_is_infinite_and_matches_problems():
    it = syn.pretrain_documents(seed=5)
    docs = [next(it) for _ in range(1000)]
    assert docs == [p.text for p in syn.generate_problems(1000, seed=5)]
    # a small character vocabulary: the task is learnable by a tiny model
    assert len(set("".join(docs))) <= 20


def test_sft_and_dpo():
    sft = syn.sft_pairs(100, seed=4, config=ALL)
    dpo = syn.dpo_triples(100, seed=4, config=ALL)
    assert [(p, c) for p, c, _ in dpo] == sft
    for prompt, chosen, rejected in dpo:
        assert rejected != chosen
        assert rejected.startswith(" ") and rejected.endswith("\n") and rejected.count("\n") == 1
        assert syn.reward(prompt, chosen) == 1.0
        assert syn.reward(prompt, rejected) == syn.FORMAT_REWARD
    # plausible: arithmetic rejections are close to the right value
    for _prompt, chosen, rejected in syn.dpo_triples(200, seed=9):
        assert abs(int(rejected) - int(chosen)) <= 90


@pytest.mark.parametrize(
    "completion,expected",
    [
        (" 47\n", 1.0),
        (" 47", 1.0),  # stopped at EOS without a newline
        (" 47\nQ: 1+1=?\nA: 2\n", 1.0),  # text after the first line is ignored
        (" 48\n", syn.FORMAT_REWARD),
        (" -3\n", syn.FORMAT_REWARD),
        ("47\n", 0.0),  # no leading space
        (" 47 \n", 0.0),
        (" forty-seven\n", 0.0),
        ("", 0.0),
        (" \n", 0.0),
    ],
)
def test_reward_arithmetic(completion, expected):
    assert syn.reward("Q: 12+35=?\nA:", completion) == expected


def test_reward_string_tasks():
    p = "Q: reverse abc=?\nA:"
    assert syn.reward(p, " cba\n") == 1.0
    assert syn.reward(p, " abc\n") == syn.FORMAT_REWARD
    assert syn.reward(p, " 123\n") == 0.0
    assert syn.accuracy([p, p], [" cba\n", " abc\n"]) == 0.5


def test_bad_input():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        syn.SyntheticConfig(tasks=("division",))
    with pytest.raises(ValueError, match="unsupported operation"):
        syn.SyntheticConfig(ops=("/",))
    with pytest.raises(ValueError, match="min_digits"):
        syn.SyntheticConfig(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="format"):
        syn.reward("12+35=", " 47\n")
    with pytest.raises(ValueError, match="prompts"):
        syn.accuracy(["Q: 1+1=?\nA:"], [])


def test_wrong_answer_never_right():
    rng = random.Random(0)
    for p in syn.generate_problems(2000, seed=11, config=ALL):
        assert syn.wrong_answer(p, rng) != p.answer
    # degenerate string: all letters equal
    p = syn.Problem("reverse", "reverse aaa", "aaa")
    assert syn.wrong_answer(p, rng) != "aaa"
