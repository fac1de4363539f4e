"""Learner workspaces: a copy of the package with the chosen lessons' tasks blanked, the lessons' READMEs and tests.

``init_workspace(dest, lessons)`` builds, in ``dest``::

    intro2llm/          the installed package (Triton kernels as intro2llm/kernels, the compiled _C and its record);
                        the bodies of the chosen lessons' ``@lesson_task`` functions replaced by
                        ``raise NotImplementedError("lesson NN: implement X — see tutorial/.../README.md")``
                        (signature, decorators and docstring kept; rewritten with ``ast`` offsets, the rest of each
                        file byte for byte the reference)
    tutorial/           the chosen lessons' folders (README.md, testcases/)
    conftest.py         puts ``dest`` first on sys.path, so the workspace imports its own copy (child processes too)
    pytest.ini          the project's pytest settings (markers, --import-mode=importlib)
    .course/            workspace.json (lessons, tasks) and results.json (the last ``course test`` of each lesson)

Tasks are found by reading the source (``ast``), never by importing it: a decorator ``@lesson_task(N)`` or
``@lesson_task(N, "name")`` on a function or method marks that function; on a class, every method defined in the
class body. Kernels (the Triton package, C++/CUDA) stay the reference unless ``include_kernels``: then marked
functions in ``intro2llm/kernels`` are blanked too (mark a kernel's host launcher, since a blanked body must run as
Python); C++/CUDA sources are never blanked.

``run_lesson(dest, N)`` runs lesson N's tests in the workspace in a child pytest with the report plugin
``intro2llm.course.pytest_report`` and grades every task: passed when all the tests marked
``@pytest.mark.task(name)`` passed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from intro2llm.course import LESSONS

STATE_DIR = ".course"
MANIFEST = "workspace.json"
RESULTS = "results.json"
FORMAT_VERSION = 1
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.o", "*.tmp")
_LESSON_DIR = re.compile(r"lesson(\d\d)_")


class CourseError(ValueError):
    """A user error of the course commands (bad lesson list, not a workspace, non-empty directory...)."""


@dataclass(frozen=True)
class MarkedTask:
    lesson: int
    name: str
    file: str  # relative to the package root, e.g. "model/norm.py"
    qualname: str
    kernel: bool  # in the Triton kernels package


# ---- lessons --------------------------------------------------------------------------------------------------
def valid_lessons_text() -> str:
    return f"{LESSONS[0]}-{LESSONS[-1]}"


def format_lessons(lessons: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    parts, i = [], 0
    while i < len(lessons):
        j = i
        while j + 1 < len(lessons) and lessons[j + 1] == lessons[j] + 1:
            j += 1
        parts.append(str(lessons[i]) if i == j else f"{lessons[i]}-{lessons[j]}")
        i = j + 1
    return ",".join(parts)


def parse_lessons(spec: str | None) -> list[int]:
    """``"1-15"``, ``"3,5,7"``, ``"2-4,9"`` -> sorted lesson numbers; None/"" -> all; CourseError names bad parts."""
    if spec is None or not spec.strip():
        return list(LESSONS)
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise CourseError(f"bad lesson list {spec!r}: {part!r} is not a number or a range (valid lessons: "
                              f"{valid_lessons_text()}, e.g. --lessons 1-15 or --lessons 3,5,7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise CourseError(f"bad lesson range {part!r}: {lo} > {hi}")
        bad = [n for n in range(lo, hi + 1) if n not in LESSONS]
        if bad:
            raise CourseError(f"unknown lesson {bad[0]} in {spec!r}: valid lessons are {valid_lessons_text()}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def find_checkout(start: str | os.PathLike | None = None) -> Path:
    """The repository checkout holding ``tutorial/``: ``start``, else the package's parent (editable install or
    source tree), else the working directory or one of its parents."""
    cands = [Path(start)] if start is not None else []
    if start is None:
        cands.append(package_dir().parent)
        cwd = Path.cwd()
        cands += [cwd, *cwd.parents]
    for cand in cands:
        if (cand / "tutorial").is_dir() and any((cand / "tutorial").glob("stage*/lesson*")):
            return cand.resolve()
    where = start if start is not None else "the package's source tree or the working directory"
    raise CourseError(f"no course lessons (tutorial/stage*/lesson*) found in {where}: run from a checkout of the "
                      "intro2llm repository or pass --source CHECKOUT")


def lesson_dirs(checkout: Path, lessons: list[int] | None = None) -> dict[int, Path]:
    """Lesson number -> its folder relative to ``checkout`` (``tutorial/stageNN_x/lessonNN_y``); two folders for
    one of ``lessons`` (default: all) is an error."""
    found: dict[int, list[Path]] = {}
    for d in sorted((checkout / "tutorial").glob("stage*/lesson*")):
        m = _LESSON_DIR.match(d.name)
        if d.is_dir() and m and (d / "testcases").is_dir():
            found.setdefault(int(m.group(1)), []).append(d.relative_to(checkout))
    for n in lessons if lessons is not None else found:
        if len(found.get(n, [])) > 1:
            raise CourseError(f"two folders for lesson {n}: {' and '.join(map(str, found[n]))}")
    return {n: ds[0] for n, ds in found.items()}


# ---- finding and blanking tasks -------------------------------------------------------------------------------
def package_dir() -> Path:
    import intro2llm

    return Path(intro2llm.__file__).resolve().parent


def kernels_dir() -> Path | None:
    """Where ``intro2llm.kernels`` lives (``kernels/`` of the checkout in an editable install)."""
    import importlib.util

    spec = importlib.util.find_spec("intro2llm.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _task_decorator(dec: ast.expr) -> tuple[int, str | None] | None:
    if not isinstance(dec, ast.Call):
        return None
    fn = dec.func
    if not ((isinstance(fn, ast.Name) and fn.id == "lesson_task") or
            (isinstance(fn, ast.Attribute) and fn.attr == "lesson_task")):
        return None
    try:
        lesson = ast.literal_eval(dec.args[0])
        name = ast.literal_eval(dec.args[1]) if len(dec.args) > 1 else None
        for kw in dec.keywords:
            if kw.arg == "name":
                name = ast.literal_eval(kw.value)
    except (IndexError, ValueError) as exc:
        raise CourseError(f"lesson_task needs literal arguments: {ast.unparse(dec)}") from exc
    return int(lesson), name


def _marked(tree: ast.Module):
    """(lesson, name, qualname, node, functions to blank) for every @lesson_task in a module."""
    out = []

    def walk(body, prefix):
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            qual = f"{prefix}{node.name}"
            for dec in node.decorator_list:
                mark = _task_decorator(dec)
                if mark:
                    lesson, name = mark
                    if isinstance(node, ast.ClassDef):
                        fns = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                    else:
                        fns = [node]
                    out.append((lesson, name or qual, qual, node, fns))
            if isinstance(node, ast.ClassDef):
                walk(node.body, qual + ".")

    walk(tree.body, "")
    return out


def scan_tasks(pkg: Path | None = None, kernels: Path | None = None) -> list[MarkedTask]:
    """Every ``@lesson_task`` in the package (and the Triton kernels package), read from the source."""
    pkg = pkg or package_dir()
    kernels = kernels if kernels is not None else kernels_dir()
    roots = [(pkg, "", False)]
    separate = kernels is not None and kernels != pkg / "kernels"  # it replaces pkg/kernels in a workspace
    if separate:
        roots.append((kernels, "kernels/", True))
    tasks = []
    for root, prefix, is_kernel in roots:
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts or (separate and root == pkg and path.is_relative_to(pkg / "kernels")):
                continue
            rel = prefix + path.relative_to(root).as_posix()
            text = path.read_text(encoding="utf-8")
            if "lesson_task" not in text:
                continue
            for lesson, name, qual, _, _ in _marked(ast.parse(text, filename=str(path))):
                tasks.append(MarkedTask(lesson, name, rel, qual, is_kernel or rel.startswith("kernels/")))
    return tasks


def blank_source(text: str, lessons: set[int], message) -> tuple[str, list[tuple[int, str]]]:
    """Replace the bodies of the functions marked for ``lessons`` by ``raise NotImplementedError(message(N, name))``.

    Signature, decorators, docstring and every other byte of the file stay. Returns the new text and the
    (lesson, task name) pairs blanked. Nested marked functions inside a blanked body go with it.
    """
    data = text.encode("utf-8")
    lines = data.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def off(lineno: int, col: int) -> int:  # ast columns are UTF-8 byte offsets
        return starts[lineno - 1] + col

    spans: list[tuple[int, int, bytes]] = []
    blanked = []
    for lesson, name, _, _, fns in _marked(ast.parse(text)):
        if lesson not in lessons:
            continue
        blanked.append((lesson, name))
        raise_stmt = f"raise NotImplementedError({message(lesson, name)!r})".encode()
        for fn in fns:
            body = fn.body
            has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
                body[0].value.value, str)
            rest = body[1:] if has_doc else body
            if rest and has_doc:  # from the docstring's end: the comments before the first statement go too
                a = off(body[0].end_lineno, body[0].end_col_offset)
                b = off(rest[-1].end_lineno, rest[-1].end_col_offset)
                spans.append((a, b, b"\n" + b" " * rest[0].col_offset + raise_stmt))
            elif rest:
                first = rest[0].lineno
                while first - 1 > fn.lineno and lines[first - 2].strip()[:1] in (b"#", b""):
                    first -= 1  # comment/blank lines between the signature and the first statement
                b = off(rest[-1].end_lineno, rest[-1].end_col_offset)
                if first < rest[0].lineno:
                    spans.append((off(first, 0), b, b" " * rest[0].col_offset + raise_stmt))
                else:
                    spans.append((off(first, rest[0].col_offset), b, raise_stmt))
            else:  # docstring only: add the raise on its own line after it
                doc = body[0]
                b = off(doc.end_lineno, doc.end_col_offset)
                spans.append((b, b, b"\n" + b" " * doc.col_offset + raise_stmt))
    spans.sort()
    kept: list[tuple[int, int, bytes]] = []
    for a, b, repl in spans:
        if kept and a < kept[-1][1]:  # inside a span already blanked (a marked function nested in another)
            continue
        kept.append((a, b, repl))
    for a, b, repl in reversed(kept):
        data = data[:a] + repl + data[b:]
    out = data.decode("utf-8")
    ast.parse(out)  # the rewrite must stay valid Python
    return out, blanked


# ---- the workspace ----------------------------------------------------------------------------------------------
_CONFTEST = Path(__file__).with_name("workspace_conftest.py")
_PYTEST_INI = """\
[pytest]
addopts = --import-mode=importlib -ra
testpaths = tutorial
python_files = test_*.py *_test.py
markers =
    gpu: needs a CUDA device (skipped without one)
    slow: takes more than a few seconds
    distributed: starts several processes with torchrun
    task(*names): the course tasks (intro2llm.course.lesson_task names) this lesson test grades
filterwarnings = ignore::DeprecationWarning:tensorboard.*
"""


def _copy_file(src: str, dst: str, link_binaries: bool) -> None:
    if link_binaries and src.endswith(".so"):
        os.symlink(os.path.abspath(src), dst)
    else:
        shutil.copy2(src, dst)


def init_workspace(dest: str | os.PathLike, lessons: list[int] | None = None, *, include_kernels: bool = False,
                   force: bool = False, source: str | os.PathLike | None = None,
                   link_binaries: bool = False) -> dict:
    """Create a learner workspace in ``dest`` (see the module docstring); returns its manifest.

    ``force`` allows a non-empty ``dest`` (the workspace's own files are replaced, others left alone).
    ``link_binaries`` symlinks the compiled ``.so`` files instead of copying them (tests: 15 workspaces).
    """
    dest = Path(dest)
    lessons = sorted(set(lessons)) if lessons is not None else list(LESSONS)
    bad = [n for n in lessons if n not in LESSONS]
    if bad:
        raise CourseError(f"unknown lesson {bad[0]}: valid lessons are {valid_lessons_text()}")
    if dest.exists() and not dest.is_dir():
        raise CourseError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise CourseError(f"{dest} is not empty: choose an empty or new directory, or pass --force to overwrite "
                          "the workspace files in it")
    checkout = find_checkout(source)
    dirs = lesson_dirs(checkout, lessons)
    missing = [n for n in lessons if n not in dirs]
    if missing:
        raise CourseError(f"lesson {missing[0]} has no folder with testcases/ under {checkout / 'tutorial'} "
                          f"(found lessons: {', '.join(str(n) for n in sorted(dirs)) or 'none'})")
    pkg, kern = package_dir(), kernels_dir()
    tasks = scan_tasks(pkg, kern)

    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".course-init-", dir=dest))
    try:
        copy = lambda s, d: _copy_file(s, d, link_binaries)  # noqa: E731
        shutil.copytree(pkg, tmp / "intro2llm", ignore=_IGNORE, copy_function=copy, symlinks=False)
        if kern is not None and kern != pkg / "kernels":  # the kernels live elsewhere (editable install: kernels/)
            shutil.rmtree(tmp / "intro2llm" / "kernels", ignore_errors=True)  # never a mix of two copies
            shutil.copytree(kern, tmp / "intro2llm" / "kernels", ignore=_IGNORE, copy_function=copy)
        from intro2llm import _ext

        csrc = _ext.source_dir(pkg)
        if csrc is not None and not (tmp / "intro2llm" / "_csrc").exists():  # a rebuild for another torch can run
            shutil.copytree(csrc, tmp / "intro2llm" / "_csrc", ignore=_IGNORE)

        def message(lesson: int, name: str) -> str:
            return f"lesson {lesson:02d}: implement {name} — see {dirs[lesson].as_posix()}/README.md"

        chosen = set(lessons)
        blanked: set[tuple[int, str]] = set()
        for rel in sorted({t.file for t in tasks if t.lesson in chosen and (include_kernels or not t.kernel)}):
            path = tmp / "intro2llm" / rel
            new, done = blank_source(path.read_text(encoding="utf-8"), chosen, message)
            path.write_text(new, encoding="utf-8")
            blanked.update(done)
        for n in lessons:
            shutil.copytree(checkout / dirs[n], tmp / dirs[n], ignore=_IGNORE)
        for readme in (checkout / "tutorial").glob("**/README.md"):  # tutorial/ and stage READMEs
            rel = readme.relative_to(checkout)
            if len(rel.parts) <= 3 and not _LESSON_DIR.match(rel.parts[-2]):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(readme, tmp / rel)
        shutil.copy2(_CONFTEST, tmp / "conftest.py")
        (tmp / "pytest.ini").write_text(_PYTEST_INI)
        manifest = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(checkout),
            "lessons": lessons,
            "include_kernels": include_kernels,
            "lesson_dirs": {str(n): d.as_posix() for n, d in sorted(dirs.items()) if n in chosen},
            "tasks": [asdict(t) | {"blanked": (t.lesson, t.name) in blanked} for t in tasks],
        }
        (tmp / STATE_DIR).mkdir()
        (tmp / STATE_DIR / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        for entry in sorted(tmp.iterdir()):  # move into place: the workspace's own names only
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            entry.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_manifest(dest: str | os.PathLike) -> dict:
    path = Path(dest) / STATE_DIR / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CourseError(f"{dest} is not a course workspace (no {STATE_DIR}/{MANIFEST}): create one with "
                          f"`intro2llm course init {dest}`") from None
    except (OSError, ValueError) as exc:
        raise CourseError(f"{path} cannot be read ({exc}): recreate the workspace with "
                          f"`intro2llm course init {dest} --force`") from None


def lesson_tasks(manifest: dict, lesson: int) -> list[dict]:
    """The tasks graded in ``lesson`` in this workspace (kernel tasks only when the kernels were blanked)."""
    return [t for t in manifest["tasks"]
            if t["lesson"] == lesson and (manifest["include_kernels"] or not t["kernel"])]


# ---- grading --------------------------------------------------------------------------------------------------
@dataclass
class TaskResult:
    name: str
    passed: int
    failed: int  # failed or errored
    skipped: int
    first_failure: str = ""

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        if self.passed:
            return "passed"
        return "no tests" if not self.skipped else "skipped"


def run_tests(workdir: Path, paths: list[str], *, only_tasks: bool = False, extra: list[str] | None = None,
              timeout: float | None = None, quiet: bool = True) -> tuple[int, list[dict], str]:
    """Run pytest on ``paths`` in ``workdir`` importing its own package; returns (exit code, per-test records,
    pytest's output). Each record: nodeid, outcome (passed/failed/skipped), tasks, message."""
    fd, report = tempfile.mkstemp(prefix="course-report-", suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    workdir = Path(workdir).resolve()
    env["PYTHONPATH"] = str(workdir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["INTRO2LLM_COURSE_REPORT"] = report
    env.pop("PYTHONSAFEPATH", None)
    cmd = [sys.executable, "-m", "pytest", *paths, "-p", "intro2llm.course.pytest_report", "-p", "no:cacheprovider",
           "-q" if quiet else "-v", "--tb=line"]
    if only_tasks:
        cmd += ["-m", "task"]
    cmd += extra or []
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        try:
            records = json.loads(Path(report).read_text() or "[]")
        except ValueError:
            records = []
    finally:
        os.unlink(report)
    return proc.returncode, records, proc.stdout + proc.stderr


def grade(tasks: list[dict], records: list[dict]) -> tuple[list[TaskResult], dict]:
    """Per task: how many of its tests passed/failed/skipped; plus counts for tests that grade no task."""
    by_name = {t["name"]: TaskResult(t["name"], 0, 0, 0) for t in tasks}
    other = {"passed": 0, "failed": 0, "skipped": 0}
    for rec in records:
        names = [n for n in rec["tasks"] if n in by_name]
        if not names:
            other[rec["outcome"]] = other.get(rec["outcome"], 0) + 1
        for n in names:
            r = by_name[n]
            setattr(r, rec["outcome"], getattr(r, rec["outcome"]) + 1)
            if rec["outcome"] == "failed" and not r.first_failure:
                r.first_failure = rec.get("message", "")
    return list(by_name.values()), other


def run_lesson(dest: str | os.PathLike, lesson: int, *, only_tasks: bool = False, timeout: float | None = None,
               save: bool = True) -> tuple[list[TaskResult], dict, int, str]:
    """Run lesson ``lesson``'s tests (basic and advanced) in workspace ``dest`` and grade its tasks."""
    dest = Path(dest)
    manifest = read_manifest(dest)
    if lesson not in LESSONS:
        raise CourseError(f"unknown lesson {lesson}: valid lessons are {valid_lessons_text()}")
    ldir = manifest["lesson_dirs"].get(str(lesson))
    if ldir is None:
        have = ",".join(str(n) for n in manifest["lessons"])
        raise CourseError(f"lesson {lesson} is not in the workspace {dest} (it has lessons {have}): add it with "
                          f"`intro2llm course init {dest} --lessons {have},{lesson} --force`")
    tasks = lesson_tasks(manifest, lesson)
    code, records, output = run_tests(dest, [f"{ldir}/testcases"], only_tasks=only_tasks, timeout=timeout)
    if code not in (0, 1) and not records:
        raise CourseError(f"pytest could not run lesson {lesson}'s tests (exit {code}): "
                          f"{(output.strip().splitlines() or ['no output'])[-1]}")
    results, other = grade(tasks, records)
    if save:
        path = dest / STATE_DIR / RESULTS
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        saved[str(lesson)] = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "tasks": {r.name: r.status for r in results}, "other": other}
        from intro2llm._io import atomic_write

        atomic_write(path, json.dumps(saved, indent=1, ensure_ascii=False))
    return results, other, code, output


def status(dest: str | os.PathLike) -> list[dict]:
    """One row per lesson: in the workspace or not, blanked or reference, tasks done/total from the last test."""
    dest = Path(dest)
    manifest = read_manifest(dest)
    try:
        saved = json.loads((dest / STATE_DIR / RESULTS).read_text())
    except (OSError, ValueError):
        saved = {}
    rows = []
    for n in LESSONS:
        tasks = lesson_tasks(manifest, n)
        last = saved.get(str(n))
        done = sum(1 for t in tasks if last and last["tasks"].get(t["name"]) == "passed")
        rows.append({"lesson": n, "dir": manifest["lesson_dirs"].get(str(n)), "chosen": n in manifest["lessons"],
                     "total": len(tasks), "done": done if last else None, "tested": last["time"] if last else None})
    return rows
