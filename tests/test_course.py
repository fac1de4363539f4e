"""Course mode (``intro2llm course``) and the course's own CI check.

- blanking keeps signatures, decorators, docstrings and every unmarked byte; the blanked body raises the lesson's
  message;
- the CLI: lesson lists, refusals (non-empty directory, unknown lesson, not a workspace) as one line and exit 2;
- a workspace imports its own package copy and the compiled ``_C``; ``course test`` grades tasks, ``status`` counts;
- THE CHECK: for every lesson 1-15, a fresh workspace with only that lesson blanked fails at least one test of every
  task the lesson marks (only ``@pytest.mark.task`` tests run there); the reference passes them in the normal suite;
- ``python -m pytest`` from the repository root imports the installed package, and the PyPI ``kernels`` package
  that ``transformers`` imports is not shadowed by the top-level ``kernels/`` folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from intro2llm.cli import main
from intro2llm.course import LESSONS, lesson_task
from intro2llm.course import workspace as ws

ROOT = Path(__file__).resolve().parents[1]
HAS_TUTORIAL = (ROOT / "tutorial").is_dir()
needs_checkout = pytest.mark.skipif(not HAS_TUTORIAL, reason="needs the repository checkout's tutorial/ folder")


def test_parse_and_format_lessons():
    assert ws.parse_lessons(None) == list(LESSONS)
    assert ws.parse_lessons("1-15") == list(range(1, 16))
    assert ws.parse_lessons("3, 5,7") == [3, 5, 7]
    assert ws.parse_lessons("2-4,9,3") == [2, 3, 4, 9]
    assert ws.format_lessons([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    for bad in ("0", "16", "1-20", "x", "3-1", "1,,2"):
        with pytest.raises(ws.CourseError, match="lesson"):
            ws.parse_lessons(bad)
    with pytest.raises(ws.CourseError, match="valid lessons are 1-15"):
        ws.parse_lessons("16")


def test_lesson_task_is_an_identity_decorator_that_records_the_task():
    def f(x):
        return x + 1

    assert lesson_task(3)(f) is f
    assert lesson_task(3, "custom")(f)(1) == 2
    with pytest.raises(ValueError, match="1..15"):
        lesson_task(16)


SOURCE = '''\
"""Module docstring."""
from intro2llm.course import lesson_task
import intro2llm.course as course


@lesson_task(5)
def estimate(a: int, *, b: int = 2) -> int:
    """Docstring kept."""
    # a comment inside the body
    c = a * b
    return c  # tail


def helper(x):
    return "héllo" + x  # non-ASCII before a blanked body: offsets are UTF-8 bytes


class Model:
    scale = 3

    @staticmethod
    @lesson_task(5, "Model.forward")
    def forward(x):
        def inner(y):
            return y
        return inner(x) * Model.scale

    @course.lesson_task(6)
    def other(self):
        """Only a docstring."""

    def untouched(self):
        return "ref"


@lesson_task(5)
class Whole:
    def __init__(self):
        self.v = 1

    def get(self):
        return self.v


def one_liner(x): return x
'''


def test_blank_source_keeps_signature_docstring_and_the_rest():
    msg = lambda n, name: f"lesson {n:02d}: implement {name} — see README"  # noqa: E731
    out, blanked = ws.blank_source(SOURCE, {5}, msg)
    assert sorted(blanked) == [(5, "Model.forward"), (5, "Whole"), (5, "estimate")]
    assert "def estimate(a: int, *, b: int = 2) -> int:" in out and '"""Docstring kept."""' in out
    assert "c = a * b" not in out and "a comment inside the body" not in out
    assert 'return "héllo" + x' in out and "def untouched(self):\n        return \"ref\"" in out
    assert "@staticmethod\n    @lesson_task(5, \"Model.forward\")" in out  # decorators stay
    ns: dict = {}
    exec(compile(out, "<blanked>", "exec"), ns)
    with pytest.raises(NotImplementedError, match="lesson 05: implement estimate — see README"):
        ns["estimate"](1)
    with pytest.raises(NotImplementedError, match="implement Model.forward"):
        ns["Model"].forward(2)
    with pytest.raises(NotImplementedError, match="implement Whole"):
        ns["Whole"]()
    assert ns["helper"]("!") == "héllo!" and ns["Model"]().untouched() == "ref" and ns["one_liner"](4) == 4
    assert ns["Model"]().other() is None  # lesson 6 not chosen: the reference
    out6, blanked6 = ws.blank_source(SOURCE, {6}, msg)
    assert blanked6 == [(6, "Model.other")]
    ns6: dict = {}
    exec(compile(out6, "<blanked>", "exec"), ns6)
    with pytest.raises(NotImplementedError, match="lesson 06: implement Model.other"):
        ns6["Model"]().other()
    assert ns6["estimate"](3) == 6
    assert ws.blank_source(SOURCE, {7}, msg) == (SOURCE, [])


def _cli(capsys, *argv):
    code = main(["course", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@needs_checkout
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    code, _, err = _cli(capsys, "init", tmp_path / "full", "--lessons", "14")
    assert code == 2 and "not empty" in err and "--force" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "init", tmp_path / "new", "--lessons", "3,99")
    assert code == 2 and "valid lessons are 1-15" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    for argv in (("test", "3", "--dir", tmp_path / "full"), ("status", "--dir", tmp_path / "full")):
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and "not a course workspace" in err and "intro2llm course init" in err
        assert err.count("\n") == 1


def _fake_checkout(root: Path) -> Path:
    """A checkout whose only lesson (14) has one small test per quantization task, marked."""
    lesson = root / "tutorial" / "stage05_advanced" / "lesson14_demo"
    (lesson / "testcases").mkdir(parents=True)
    (lesson / "README.md").write_text("# lesson 14 demo\n")
    (lesson / "testcases" / "basic_test.py").write_text(textwrap.dedent('''\
        import pytest
        import torch

        from intro2llm.ops.nf4 import dequantize_tensor, quantize_tensor


        @pytest.mark.task("quantize_tensor", "dequantize_tensor")
        def test_round_trip():
            w = torch.linspace(-1, 1, 128)
            assert (dequantize_tensor(quantize_tensor(w)) - w).abs().max() < 0.16  # half the widest NF4 gap (0.30)


        @pytest.mark.task("quantize_tensor")
        def test_block_count():
            assert quantize_tensor(torch.ones(130)).absmax.numel() == 3


        def test_unmarked():
            assert 1 + 1 == 2
        '''))
    return root


@needs_checkout
def test_workspace_grades_tasks_then_the_learner_implements_them(tmp_path, capsys):
    src = _fake_checkout(tmp_path / "checkout")
    dest = tmp_path / "ws"
    manifest = ws.init_workspace(dest, [14], source=src, link_binaries=True)
    nf4 = dest / "intro2llm" / "ops" / "nf4.py"
    text = nf4.read_text()
    assert "raise NotImplementedError('lesson 14: implement quantize_tensor — see " \
           "tutorial/stage05_advanced/lesson14_demo/README.md')" in text
    assert (dest / "intro2llm" / "kernels" / "__init__.py").exists() and (dest / "conftest.py").exists()
    blanked = {t["name"] for t in manifest["tasks"] if t["blanked"]}
    assert {"quantize_tensor", "dequantize_tensor"} <= blanked and all(
        t["lesson"] == 14 for t in manifest["tasks"] if t["blanked"])
    # the workspace imports its own copy and the compiled extension copied with it
    probe = ("import intro2llm, intro2llm._ext as e; s = e.state(); "
             "print(intro2llm.__file__); print(s.origin, s.path)")
    env = dict(os.environ, PYTHONPATH=str(dest), PYTHONSAFEPATH="1")
    lines = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[0].startswith(str(dest))
    if (ws.package_dir() / "_C.build.json").exists():
        assert lines[1].startswith("package ") and lines[1].split()[1].startswith(str(dest))

    code, out, _ = _cli(capsys, "test", "14", "--dir", dest)
    assert code == 1
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()[0] in blanked}
    assert "failed" in rows["quantize_tensor"] and "0/2" in rows["quantize_tensor"]
    assert "NotImplementedError: lesson 14: implement" in rows["quantize_tensor"]
    assert "other tests of the lesson: 1 passed, 0 failed" in out

    nf4.write_text((ws.package_dir() / "ops" / "nf4.py").read_text())  # "implement" them: the reference bodies
    code, out, _ = _cli(capsys, "test", "14", "--dir", dest)
    assert code == 0, out  # (the LoRA tasks of lesson 14 have no test in this demo: "no tests", not a failure)
    graded = {ln.split()[0]: ln.split()[-1] for ln in out.splitlines() if ln.startswith("  ")
              and ln.split()[0] in blanked}
    assert graded["quantize_tensor"] == "passed" and graded["dequantize_tensor"] == "passed"
    code, out, _ = _cli(capsys, "status", "--dir", dest)
    line14 = next(ln for ln in out.splitlines() if ln.strip().startswith("14"))
    assert code == 0 and f"2/{len(ws.lesson_tasks(manifest, 14))}" in line14
    assert "not in this workspace" in next(ln for ln in out.splitlines() if ln.strip().startswith("13"))

    code, _, err = _cli(capsys, "test", "13", "--dir", dest)
    assert code == 2 and "not in the workspace" in err and "--lessons 14,13 --force" in err
    (dest / "notes.txt").write_text("mine")
    assert ws.init_workspace(dest, [14], source=src, force=True, link_binaries=True)["lessons"] == [14]
    assert (dest / "notes.txt").read_text() == "mine" and "NotImplementedError" in nf4.read_text()


@needs_checkout
def test_include_kernels_blanks_marked_triton_functions_only_when_asked(tmp_path, monkeypatch):
    kern = tmp_path / "kernels"
    kern.mkdir()
    (kern / "__init__.py").write_text("")
    (kern / "demo.py").write_text(
        "from intro2llm.course import lesson_task\n\n\n@lesson_task(15)\ndef demo_fwd(x):\n    return x\n")
    monkeypatch.setattr(ws, "kernels_dir", lambda: kern)
    src = _fake_checkout(tmp_path / "checkout")
    kept = ws.init_workspace(tmp_path / "a", [14], source=src, link_binaries=True)
    assert (tmp_path / "a/intro2llm/kernels/demo.py").read_text() == (kern / "demo.py").read_text()
    assert "demo_fwd" in [t["name"] for t in kept["tasks"] if t["kernel"] and not t["blanked"]]
    src15 = src / "tutorial" / "stage05_advanced" / "lesson15_demo"
    (src15 / "testcases").mkdir(parents=True)
    blanked = ws.init_workspace(tmp_path / "b", [15], source=src, include_kernels=True, link_binaries=True)
    assert "raise NotImplementedError('lesson 15: implement demo_fwd" in (
        tmp_path / "b/intro2llm/kernels/demo.py").read_text()
    assert "demo_fwd" in [t["name"] for t in ws.lesson_tasks(blanked, 15)]
    assert "demo_fwd" not in [t["name"] for t in ws.lesson_tasks(kept, 15)]


def _check_lesson(n: int, root: Path) -> list[str]:
    """Problems of lesson ``n``'s course check (empty list: fine)."""
    dest = root / f"lesson{n:02d}"
    manifest = ws.init_workspace(dest, [n], link_binaries=True)
    tasks = [t["name"] for t in ws.lesson_tasks(manifest, n)]
    if not tasks:
        return [f"lesson {n}: no function is marked @lesson_task({n})"]
    code, records, output = ws.run_tests(dest, [manifest["lesson_dirs"][str(n)] + "/testcases"], only_tasks=True,
                                         timeout=600)
    if not records:
        return [f"lesson {n}: pytest ran no task-marked test (exit {code}): {output.strip()[-300:]}"]
    results, _ = ws.grade(ws.lesson_tasks(manifest, n), records)
    known = {t["name"] for t in manifest["tasks"] if t["lesson"] == n}  # with kernel tasks (--include-kernels)
    problems = [f"lesson {n}: test {r['nodeid']} names unknown task(s) {sorted(set(r['tasks']) - known)}"
                for r in records if set(r["tasks"]) - known]
    for r in results:
        if r.passed + r.failed + r.skipped == 0:
            problems.append(f"lesson {n}: task {r.name} has no @pytest.mark.task test")
        elif r.failed == 0:
            problems.append(f"lesson {n}: task {r.name}: its {r.passed + r.skipped} test(s) pass with the body "
                            "blanked (they do not exercise it)")
    return problems


def _check_kernel_tasks(root: Path) -> list[str]:
    """With --include-kernels, every marked Triton kernel fails >= 1 of the tests that grade it."""
    lessons = sorted({t.lesson for t in ws.scan_tasks() if t.kernel})
    if not lessons:
        return ["no Triton kernel is marked @lesson_task: --include-kernels would change nothing"]
    dest = root / "kernels"
    manifest = ws.init_workspace(dest, lessons, include_kernels=True, link_binaries=True)
    tasks = [t for t in manifest["tasks"] if t["kernel"]]
    code, records, output = ws.run_tests(dest, [manifest["lesson_dirs"][str(n)] + "/testcases" for n in lessons],
                                         only_tasks=True, timeout=600)
    if not records:
        return [f"kernel tasks: pytest ran no task-marked test (exit {code}): {output.strip()[-300:]}"]
    results, _ = ws.grade(tasks, records)
    return [f"kernel task {r.name}: no test fails with its body blanked ({r.passed} passed, {r.skipped} skipped)"
            for r in results if r.failed == 0]


@needs_checkout
@pytest.mark.slow
def test_every_lesson_blank_workspace_fails_every_task(tmp_path):
    """One pytest per lesson over its task-marked tests, two at a time, and one over the lessons with marked Triton
    kernels blanked too (--include-kernels); the reference passes the same tests in the normal suite (tutorial/)."""
    jobs = [lambda n=n: _check_lesson(n, tmp_path) for n in LESSONS] + [lambda: _check_kernel_tasks(tmp_path)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        problems = [p for ps in pool.map(lambda job: job(), jobs) for p in ps]
    assert not problems, "\n".join(problems)


@needs_checkout
def test_python_m_pytest_from_the_root_imports_the_installed_package():
    """``python -m pytest`` puts the root first on sys.path; the root conftest takes it off again."""
    lesson09 = sorted(ROOT.glob("tutorial/*/lesson09_*/testcases/advanced_test.py"))
    assert lesson09, "lesson 09's advanced tests (which compare with transformers) are missing"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(lesson09[0].relative_to(ROOT)), "-q",
                           "-p", "no:cacheprovider", "-k", "transformers"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "CUDAProperties" not in proc.stdout and proc.returncode == 0, proc.stdout[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
