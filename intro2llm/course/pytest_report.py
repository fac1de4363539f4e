"""pytest plugin (``-p intro2llm.course.pytest_report``): one JSON record per test, with its course tasks.

Writes, when the environment names a file in ``INTRO2LLM_COURSE_REPORT``, a list of
``{"nodeid", "outcome": "passed"|"failed"|"skipped", "tasks": [names of @pytest.mark.task], "message"}``
(``message``: the last line of the failure, e.g. ``NotImplementedError: lesson 05: implement ...``). Imports
nothing from intro2llm beyond this package, so the workspace's conftest still runs first.
"""

from __future__ import annotations

import json
import os

_TASKS: dict[str, list[str]] = {}
_RESULTS: dict[str, dict] = {}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        names: list[str] = []
        for mark in item.iter_markers("task"):
            names += [str(a) for a in mark.args]
        _TASKS[item.nodeid] = names


def _message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.strip().splitlines()[0] if crash.message.strip() else ""
    text = str(report.longrepr or "").strip()
    return text.splitlines()[-1] if text else ""


def pytest_runtest_logreport(report):
    rec = _RESULTS.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "message": ""})
    if report.failed and rec["outcome"] != "failed":
        rec["outcome"], rec["message"] = "failed", _message(report)
    elif report.skipped and rec["outcome"] == "passed":
        rec["outcome"] = "skipped"
        rec["message"] = _message(report)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("INTRO2LLM_COURSE_REPORT")
    if not path:
        return
    out = [dict(rec, tasks=_TASKS.get(nodeid, [])) for nodeid, rec in _RESULTS.items()]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
