"""Real text corpora available on every machine without a download.

``python_stdlib`` yields the source of this Python's standard library (``sysconfig.get_paths()["stdlib"]``, about
30 MB of ``.py`` files for CPython 3.11; ``site-packages`` excluded), in a fixed, sorted order so that splits are
reproducible. A few files are deliberately not UTF-8 (encoding tests): they are decoded with their PEP 263
``coding:`` declaration when it works, else as UTF-8 with U+FFFD replacements — never an exception.

Not handled: other file types, licence filtering, deduplication (see ``filtering.py`` / ``dedup.py``).
"""

from __future__ import annotations

import io
import os
import sysconfig
import tokenize
from collections.abc import Iterator

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the ``.py`` files under the stdlib directory (or ``root``), site-packages excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard-library directory {root!r} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def decode_source(data: bytes) -> str:
    """Text of a Python source file: UTF-8, else its declared encoding, else UTF-8 with replacements."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return data.decode("utf-8", errors="replace")


def python_stdlib(max_bytes: int | None = None, *, root: str | None = None) -> Iterator[str]:
    """Yield the text of each stdlib ``.py`` file in sorted path order, stopping once ``max_bytes`` (of file
    size) have been yielded; the file that crosses the limit is cut so the total is exactly ``max_bytes``."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}")
    total = 0
    for path in stdlib_files(root):
        if max_bytes is not None and total >= max_bytes:
            return
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue  # unreadable (permissions, broken link): skip rather than crash
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        total += len(data)
        yield decode_source(data)
