"""``intro2llm course``: learner workspaces where you implement the lessons' tasks and the lesson tests grade them.

    intro2llm course init DIR [--lessons 1-15|3,5,7] [--include-kernels] [--force]
    intro2llm course test N [--dir DIR]
    intro2llm course status [--dir DIR]
"""

from __future__ import annotations

import argparse
import sys


def _fail(msg: str) -> int:
    print(f"intro2llm course: {msg}", file=sys.stderr)
    return 2


def _init(args: argparse.Namespace) -> int:
    from intro2llm.course import workspace as ws

    try:
        lessons = ws.parse_lessons(args.lessons)
        manifest = ws.init_workspace(args.dir, lessons, include_kernels=args.include_kernels, force=args.force,
                                     source=args.source)
    except (ws.CourseError, OSError) as exc:
        return _fail(str(exc))
    chosen = set(manifest["lessons"])
    blanked = [t for t in manifest["tasks"] if t["blanked"]]
    print(f"workspace {args.dir}: lessons {ws.format_lessons(sorted(chosen))}, {len(blanked)} tasks to implement "
          f"(kernels {'blanked where marked' if args.include_kernels else 'kept as the reference'})")
    for n in sorted(chosen):
        names = [t["name"] for t in blanked if t["lesson"] == n]
        print(f"  lesson {n:02d}  {manifest['lesson_dirs'][str(n)]}: {', '.join(names) or '(no marked tasks)'}")
    print(f"next: read a lesson's README.md, implement its tasks in {args.dir}/intro2llm, then "
          f"`intro2llm course test N --dir {args.dir}`")
    return 0


def _test(args: argparse.Namespace) -> int:
    from intro2llm.course import workspace as ws

    try:
        results, other, code, output = ws.run_lesson(args.dir, args.lesson)
    except ws.CourseError as exc:
        return _fail(str(exc))
    if args.verbose:
        print(output)
    width = max([len(r.name) for r in results] + [4])
    print(f"lesson {args.lesson:02d} ({args.dir})")
    print(f"  {'task':<{width}}  {'tests':>7}  result")
    for r in results:
        total = r.passed + r.failed + r.skipped
        hint = f"  {r.first_failure[:100]}" if r.failed and r.first_failure else ""
        print(f"  {r.name:<{width}}  {r.passed:>3}/{total:<3}  {r.status}{hint}")
    if not results:
        print("  (this lesson marks no tasks)")
    if any(other.values()):
        print(f"  other tests of the lesson: {other['passed']} passed, {other['failed']} failed, "
              f"{other['skipped']} skipped")
    done = sum(r.status == "passed" for r in results)
    print(f"{done}/{len(results)} tasks passed" + ("" if code == 0 else "; `--verbose` shows pytest's output"))
    return 0 if code == 0 and not any(r.status == "failed" for r in results) else 1


def _status(args: argparse.Namespace) -> int:
    from intro2llm.course import workspace as ws

    try:
        rows = ws.status(args.dir)
    except ws.CourseError as exc:
        return _fail(str(exc))
    print(f"workspace {args.dir}")
    print(f"  {'lesson':<6}  {'done':>7}  {'last test':<20}  folder")
    for r in rows:
        if r["dir"] is None:
            print(f"  {r['lesson']:02d}      {'-':>7}  {'-':<20}  not in this workspace (the reference)")
            continue
        done = "?" if r["done"] is None else str(r["done"])
        print(f"  {r['lesson']:02d}      {done:>3}/{r['total']:<3}  {r['tested'] or 'not tested yet':<20}  {r['dir']}")
    return 0


def register(subparsers) -> None:
    """Add ``course`` with its ``init``, ``test`` and ``status`` subcommands."""
    course = subparsers.add_parser("course", help="learner workspaces: implement the lessons' tasks, tests grade them")
    sub = course.add_subparsers(dest="course_command", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="create a workspace with the chosen lessons' tasks left to implement")
    p.add_argument("dir", help="the workspace directory (new or empty)")
    p.add_argument("--lessons", help="lessons to implement: 1-15 (default: all), 3,5,7 or 2-4,9; the others stay "
                   "the reference")
    p.add_argument("--include-kernels", action="store_true", help="also blank the marked functions of the Triton "
                   "kernels package (C++/CUDA stay the reference)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory (replaces the "
                   "workspace's own files there)")
    p.add_argument("--source", help="the repository checkout holding tutorial/ (default: found from the package "
                   "or the working directory)")
    p.set_defaults(func=_init)

    p = sub.add_parser("test", help="run a lesson's basic and advanced tests in a workspace: tasks passed/failed")
    p.add_argument("lesson", type=int, help="lesson number (1-15)")
    p.add_argument("--dir", default=".", help="the workspace (default: the working directory)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print pytest's output")
    p.set_defaults(func=_test)

    p = sub.add_parser("status", help="every lesson's tasks done/total in a workspace")
    p.add_argument("--dir", default=".", help="the workspace (default: the working directory)")
    p.set_defaults(func=_status)
