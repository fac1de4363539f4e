"""Course mode: the learner implements each lesson's tasks, the lesson tests grade them.

A *task* is a function or method of the reference code that a lesson's 实现任务 section asks the learner to write.
It is marked where it lives, once::

    from intro2llm.course import lesson_task

    @lesson_task(5)                      # task name defaults to the qualified name: "estimate_flops"
    def estimate_flops(config, seq_len): ...

    class RMSNorm(nn.Module):
        @lesson_task(2)                  # task name "RMSNorm.forward"
        def forward(self, x): ...

The decorator returns the function unchanged (no wrapper, no cost at run time); it only records the task. A
lesson test that grades a task names it with ``@pytest.mark.task("estimate_flops")`` (several names allowed).
``intro2llm course init`` copies the package into a workspace and replaces the bodies of the chosen lessons'
marked functions with ``raise NotImplementedError(...)``; ``intro2llm course test N`` runs lesson N's tests there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

F = TypeVar("F", bound=Callable)

LESSONS = tuple(range(1, 16))


@dataclass(frozen=True)
class Task:
    lesson: int
    name: str
    module: str
    qualname: str


TASKS: dict[int, list[Task]] = {}


def lesson_task(lesson: int, name: str | None = None) -> Callable[[F], F]:
    """Mark a function or method as a task of ``lesson`` (1-15); returns it unchanged."""
    if not isinstance(lesson, int) or lesson not in LESSONS:
        raise ValueError(f"lesson_task: lesson must be an int in 1..15, got {lesson!r}")

    def mark(fn: F) -> F:
        inner = getattr(fn, "fn", fn)  # a @triton.jit kernel keeps the Python function in .fn
        qualname = getattr(fn, "__qualname__", None) or getattr(inner, "__qualname__", repr(fn))
        task = Task(lesson, name or qualname, getattr(inner, "__module__", "?"), qualname)
        TASKS.setdefault(lesson, []).append(task)
        return fn

    return mark
