"""Crash-safe file writes shared by every module that saves something (tokenizers, shards, checkpoints, results).

``atomic_write(path, data)`` writes to a temporary file in the same directory, fsyncs it, then renames it over
``path`` with ``os.replace`` (atomic on POSIX): a crash or a full disk leaves either the old file or the new one,
never a half-written one, and no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, data: bytes | memoryview | str | Callable[[str], None]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a callable that writes the file at the temp path it is given)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
