"""Crash-safe training checkpoints: one directory per step, written to a temporary directory and renamed.

Layout of ``<root>/step_00000120/``:

    model.safetensors   model weights (tied tensors stored once, aliases in the safetensors metadata)
    optimizer.pt        optimizer.state_dict()
    trainer.pt          step, scheduler state, data-sampler position, RNG states of every rank, extra counters
    meta.json           step + the size and SHA-256 of every file above (written last)

Why it is safe: everything is written into ``<root>/.tmp-step_…`` and fsync'ed; only then is the directory renamed
to ``step_…`` (``os.rename`` of a directory is atomic on POSIX). A process killed while saving, or a full disk,
leaves a stray ``.tmp-*`` directory (ignored, removed by the next save) and the previous checkpoints untouched.
Only after a successful rename are checkpoints beyond ``keep_last`` deleted. Loading checks every file against
``meta.json`` and reads pickles with ``torch.load(weights_only=True)`` only (no arbitrary code from a checkpoint);
a missing or corrupt file raises ``CheckpointError`` naming it.

Not handled: sharded (per-rank) checkpoints — under FSDP the trainer gathers a full state dict on rank 0 first.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the states, ready for ``load_state_dict`` calls."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state()`` returned (python tuples come back as lists from torch.load; convert)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first name, record aliases."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t.contiguous().cpu()
    return unique, aliases


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Completed checkpoint directories under ``root``, oldest first (temporary ``.tmp-*`` dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep_last: int | None = 3,
) -> Path:
    """Write ``root/step_<step>/`` atomically and keep only the newest ``keep_last`` (None: keep all).

    On any error (disk full, permission…) the temporary directory is removed, older checkpoints are left as they
    were, and ``CheckpointError`` is raised with the cause.
    """
    from safetensors.torch import save_file

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        weights, aliases = _dedup_shared(model_state)
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        _after_file_hook(tmp / MODEL_FILE)
        files = [MODEL_FILE]
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            _after_file_hook(tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        torch.save({**trainer_state, "step": step}, tmp / TRAINER_FILE)
        _after_file_hook(tmp / TRAINER_FILE)
        files.append(TRAINER_FILE)
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        for f in [*files, META_FILE]:
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again (e.g. after a resume): swap the old one out first
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError | RuntimeError | ValueError):
            prev = latest_checkpoint(root)
            raise CheckpointError(
                f"saving checkpoint {final} failed ({exc}); "
                + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
            ) from exc
        raise
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _after_file_hook(path: Path) -> None:
    """Called after each file of a checkpoint is written; tests patch it to simulate a crash mid-save."""


# ---------------------------------------------------------------------------------------------- load
def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` holds a complete checkpoint; return its meta. Raises ``CheckpointError`` naming the
    missing or corrupt file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {meta_path} is corrupt: {exc}") from exc
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt: {f.stat().st_size} bytes, expected {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt: SHA-256 does not match {META_FILE}")
    return meta


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file; name it
        raise CheckpointError(f"checkpoint file {path} could not be read: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory (verified first). Tensors are loaded on CPU."""
    from safetensors import safe_open

    path = Path(path)
    meta = verify_checkpoint(path)
    model_file = path / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt", device="cpu") as f:
            model_state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint file {model_file} could not be read: {exc}") from exc
    for name, target in aliases.items():
        model_state[name] = model_state[target]
    optimizer_state = _torch_load(path / OPTIMIZER_FILE) if OPTIMIZER_FILE in meta["files"] else None
    trainer_state = _torch_load(path / TRAINER_FILE)
    return Checkpoint(path=path, step=int(meta["step"]), model_state=model_state,
                      optimizer_state=optimizer_state, trainer_state=trainer_state)
