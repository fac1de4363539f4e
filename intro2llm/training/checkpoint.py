"""Crash-safe training checkpoints: one directory per step, written to a temporary directory and renamed.

Layout of ``<root>/step_00000120/``:

    model.safetensors   model weights (tied tensors stored once, aliases in the safetensors metadata)
    optimizer.pt        optimizer.state_dict()
    trainer.pt          step, scheduler state, data-sampler position, RNG states of every rank, extra counters
    meta.json           step + the size and SHA-256 of every file above (written last)

Why it is safe: everything is written into ``<root>/.tmp-step_…`` and fsync'ed; only then is the directory renamed
to ``step_…`` (``os.rename`` of a directory is atomic on POSIX). A process killed while saving, or a full disk,
leaves a stray ``.tmp-*`` directory (ignored, removed by the next save) and the previous checkpoints untouched.
Re-saving a step that exists (resuming a finished run) first renames the old directory to ``.old-step_…``, then
the new one into place, then removes the backup; a crash between the two renames leaves only the backup, which
``list_checkpoints`` (and the next save) renames back, so at every point one complete copy is found. Only after
a successful rename are checkpoints beyond ``keep_last`` deleted.

Loading trusts nothing on disk: ``meta.json`` must be an object with ``format_version`` 1, an int ``step`` equal
to the directory's (``step_<n>``), and ``files`` listing exactly the three files (sharded layout: ``trainer.pt``
and every file under ``sharded/``), each with an int ``bytes`` and a 64-hex-digit ``sha256`` that the file
matches (``optimizer.pt`` is always written; it holds ``None`` when the run had no optimizer state). Pickles
are read with ``torch.load(weights_only=True)`` only (no arbitrary code from a checkpoint). Any violation raises
``CheckpointError`` naming the file and what is wrong;
``latest_intact_checkpoint`` returns the newest checkpoint that passes, with the reasons the newer ones failed.

Sharded layout (FSDP; ``meta.json`` has ``"layout": "sharded"``): ``trainer.pt`` plus ``sharded/``, a
``torch.distributed.checkpoint`` (DCP) directory with ``{"model": ..., "optim": ...}`` — ``.metadata`` and one
``__<rank>_0.distcp`` file per rank holding that rank's shards. The same atomic protocol: rank 0 creates the
temporary directory (``begin_sharded_save``), every rank writes its shards into it, rank 0 then writes
``trainer.pt`` and ``meta.json`` with the hash of every file and renames (``finish_sharded_save``). DCP reshards
on load, so a sharded checkpoint resumes on any world size, and unsharded (one process, DDP) too; the trainer
converts a full checkpoint into shards the other way. Multi-node: the checkpoint root must be a filesystem that
every node sees (rank 0 hashes all shards before the rename).
"""

from __future__ import annotations

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

from intro2llm._ext import file_sha256  # the build records hash their .so the same way
from intro2llm.course import lesson_task

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
SHARDED_DIR = "sharded"  # the DCP directory of a sharded checkpoint
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the reason."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the states, ready for ``load_state_dict`` calls."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]  # empty for a sharded checkpoint (its states are in ``sharded``)
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    sharded: Path | None = None  # the DCP directory of a sharded checkpoint (load with torch.distributed.checkpoint)


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


def _restore_interrupted_resaves(root: Path) -> None:
    """A re-save killed between its two renames leaves ``.old-step_N`` and no ``step_N``: put the backup back. A
    backup next to a completed ``step_N`` is the superseded copy: remove it."""
    for backup in root.glob(".old-step_*"):
        m = re.match(r"^\.old-(step_\d+)-\d+$", backup.name)
        if not m or not backup.is_dir():
            continue
        final = root / m.group(1)
        try:
            if final.exists():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.rename(backup, final)
        except OSError:  # a read-only root: leave it; loading the backup's step is then not possible from here
            pass


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Completed checkpoint directories under ``root``, oldest first (temporary ``.tmp-*`` dirs are ignored;
    an interrupted re-save's backup is restored first)."""
    root = Path(root)
    if not root.is_dir():
        return []
    _restore_interrupted_resaves(root)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under ``root``, or None (not verified: see ``latest_intact_checkpoint``)."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def latest_intact_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that passes ``verify_checkpoint``, and ``(path, reason)`` for every
    newer one that does not (newest first)."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path, damaged
        except CheckpointError as exc:
            damaged.append((path, str(exc)))
    return None, damaged


# ---------------------------------------------------------------------------------------------- save
@lesson_task(8)
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

    _check_save_args(step, keep_last)
    root = Path(root)
    final, tmp = root / step_dir_name(step), None
    try:
        tmp = _begin(root, step)
        weights, aliases = _dedup_shared(model_state)
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        _after_file_hook(tmp / MODEL_FILE)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)  # always written (None without an optimizer)
        _after_file_hook(tmp / OPTIMIZER_FILE)
        _commit(root, step, tmp, trainer_state, layout="full")
    except BaseException as exc:
        _fail_save(root, final, tmp, exc)
    _prune(root, keep_last)
    return final


def begin_sharded_save(root: str | os.PathLike, step: int) -> Path:
    """Rank 0, before a sharded save: create and return the temporary directory; every rank then writes its DCP
    shards into ``tmp / SHARDED_DIR`` and rank 0 calls ``finish_sharded_save`` (or ``abort_save`` on failure)."""
    _check_save_args(step, None)
    root, tmp = Path(root), None
    try:
        tmp = _begin(root, step)
        (tmp / SHARDED_DIR).mkdir()
    except BaseException as exc:
        _fail_save(root, root / step_dir_name(step), tmp, exc)
    return tmp


def finish_sharded_save(root: str | os.PathLike, step: int, tmp: str | os.PathLike, trainer_state: dict[str, Any],
                        keep_last: int | None = 3) -> Path:
    """Rank 0, after every rank wrote its shards into ``tmp``: ``trainer.pt``, ``meta.json``, rename, prune."""
    _check_save_args(step, keep_last)
    root, tmp = Path(root), Path(tmp)
    final = root / step_dir_name(step)
    try:
        if not (tmp / SHARDED_DIR / ".metadata").is_file():
            raise ValueError(f"{tmp / SHARDED_DIR} holds no DCP .metadata (the shards were not written)")
        _commit(root, step, tmp, trainer_state, layout="sharded")
    except BaseException as exc:
        _fail_save(root, final, tmp, exc)
    _prune(root, keep_last)
    return final


def abort_save(tmp: str | os.PathLike | None) -> None:
    """Remove the temporary directory of a save that failed."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_save_args(step: int, keep_last: int | None) -> None:
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")


def _begin(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_resaves(root)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _commit(root: Path, step: int, tmp: Path, trainer_state: dict[str, Any], layout: str) -> None:
    """Write trainer.pt and meta.json (hashes of every file in ``tmp``), fsync, rename ``tmp`` to ``step_<step>``."""
    final = root / step_dir_name(step)
    torch.save({**trainer_state, "step": step}, tmp / TRAINER_FILE)
    _after_file_hook(tmp / TRAINER_FILE)
    if layout == "full":
        files = list(_FILES)
    else:
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    meta = {"format_version": FORMAT_VERSION, "step": step,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in files}}
    if layout != "full":
        meta["layout"] = layout
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    for f in [*files, META_FILE]:
        _fsync_file(tmp / f)
    for d in {(tmp / f).parent for f in files} | {tmp}:
        _fsync_dir(d)
    if final.exists():  # saving the same step again (e.g. after a resume): swap the old one out first
        backup = root / f".old-{final.name}-{os.getpid()}"  # restored by the next listing if we die now
        os.rename(final, backup)
        _fsync_dir(root)
        _resave_hook("backed-up")
        os.rename(tmp, final)
        _fsync_dir(root)
        _resave_hook("swapped")
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def _fail_save(root: Path, final: Path, tmp: Path | None, exc: BaseException) -> None:
    abort_save(tmp)
    if isinstance(exc, OSError | RuntimeError | ValueError):
        prev = latest_checkpoint(root)
        raise CheckpointError(
            f"saving checkpoint {final} failed ({exc}); "
            + (f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
        ) from exc
    raise exc


def _prune(root: Path, keep_last: int | None) -> None:
    """Only after a successful rename: delete checkpoints beyond the newest ``keep_last``."""
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _after_file_hook(path: Path) -> None:
    """Called after each file of a checkpoint is written; tests patch it to simulate a crash mid-save."""


def _resave_hook(stage: str) -> None:
    """Called between the renames of a re-save ("backed-up", "swapped"); tests patch it to crash there."""


# ---------------------------------------------------------------------------------------------- load
_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` holds a complete checkpoint; return its meta. Raises ``CheckpointError`` naming the
    missing or corrupt file (``meta.json`` included) and what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {meta_path} is corrupt: {why}")

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION or isinstance(meta.get("format_version"), bool):
        raise bad(f"format_version is {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"'step' must be an int >= 0, got {step!r}")
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise bad(f"'step' is {step} but the directory is {path.name}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise bad(f"'files' must be an object, got {type(files).__name__}")
    layout = meta.get("layout", "full")
    if layout == "full":
        expected = set(_FILES)
    elif layout == "sharded":
        # trainer.pt + every file of the DCP directory, exactly as found on disk (a missing or extra shard: corrupt)
        on_disk = {p.relative_to(path).as_posix() for p in (path / SHARDED_DIR).rglob("*") if p.is_file()}
        expected = {TRAINER_FILE} | on_disk
        if f"{SHARDED_DIR}/.metadata" not in files:
            raise bad(f"a sharded checkpoint must list {SHARDED_DIR}/.metadata")
    else:
        raise bad(f"'layout' is {layout!r}, expected 'full' or 'sharded'")
    if set(files) != expected:
        raise bad(f"'files' lists {sorted(files)}, expected exactly {sorted(expected)}"[:600])
    for name in sorted(expected):
        info = files[name]
        if not isinstance(info, dict) or set(info) != {"bytes", "sha256"}:
            raise bad(f"entry for {name} must be {{'bytes': int, 'sha256': hex}}, got {info!r}"[:300])
        size, digest = info["bytes"], info["sha256"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"'bytes' of {name} must be an int >= 0, got {size!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise bad(f"'sha256' of {name} must be 64 lowercase hex digits, got {digest!r}"[:300])
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is corrupt: {f.stat().st_size} bytes, expected {size}")
        if file_sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt: SHA-256 does not match {META_FILE}")
    return meta


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file; name it
        raise CheckpointError(f"checkpoint file {path} could not be read: {exc}") from exc


@lesson_task(8)
def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory (verified first). Tensors are loaded on CPU."""
    from safetensors import safe_open

    path = Path(path)
    meta = verify_checkpoint(path)
    if meta.get("layout") == "sharded":
        trainer_state = _torch_load(path / TRAINER_FILE)
        _check_trainer_state(path, trainer_state, meta)
        return Checkpoint(path=path, step=int(meta["step"]), model_state={}, optimizer_state=None,
                          trainer_state=trainer_state, sharded=path / SHARDED_DIR)
    model_file = path / MODEL_FILE
    try:
        with safe_open(str(model_file), framework="pt", device="cpu") as f:
            model_state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint file {model_file} could not be read: {exc}") from exc
    for name, target in aliases.items():
        model_state[name] = model_state[target]
    optimizer_state = _torch_load(path / OPTIMIZER_FILE)
    if optimizer_state is not None and not isinstance(optimizer_state, dict):
        raise CheckpointError(f"checkpoint file {path / OPTIMIZER_FILE} holds a {type(optimizer_state).__name__}, "
                              "expected an optimizer state dict or None")
    trainer_state = _torch_load(path / TRAINER_FILE)
    _check_trainer_state(path, trainer_state, meta)
    return Checkpoint(path=path, step=int(meta["step"]), model_state=model_state,
                      optimizer_state=optimizer_state, trainer_state=trainer_state)


def _check_trainer_state(path: Path, trainer_state: Any, meta: dict[str, Any]) -> None:
    if not isinstance(trainer_state, dict) or trainer_state.get("step") != meta["step"]:
        got = trainer_state.get("step") if isinstance(trainer_state, dict) else type(trainer_state).__name__
        raise CheckpointError(f"checkpoint file {path / TRAINER_FILE} does not match {META_FILE}: step {got!r}, "
                              f"expected {meta['step']}")
