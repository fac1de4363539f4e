"""Training metrics sinks: ``metrics.jsonl`` (always), TensorBoard, and wandb when it is installed.

``metrics.jsonl`` holds one JSON object per line; every optimizer step writes one line with at least
``step``, ``loss``, ``lr`` (plus ``grad_norm``, ``tokens``, ``tokens_per_s``, ``eval_loss`` on eval steps). On resume
the lines after the checkpoint's step are dropped first, so the file always describes the one run that produced
the weights. Only rank 0 logs (other ranks get a disabled logger). wandb runs offline unless ``WANDB_MODE`` says
otherwise (nothing is uploaded by default). Not handled: log rotation, non-scalar metrics.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from intro2llm._io import atomic_write
from intro2llm.course import lesson_task


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:  # NaN is not valid JSON; keep the line parseable
        return None
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return None
    return v


class MetricsLogger:
    """Writes scalars to ``out_dir/metrics.jsonl``, TensorBoard (``out_dir/tb``) and optionally wandb."""

    def __init__(
        self,
        out_dir: str | os.PathLike | None,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: bool | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled and out_dir is not None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._tb = None
        self._wandb = None
        self._file = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except ImportError as exc:  # tensorboard is a dependency, but do not die for a log sink
                warnings.warn(f"TensorBoard logging disabled: {exc}", stacklevel=2)
        if wandb is not False:
            try:
                import wandb as _wandb
            except ImportError:
                _wandb = None
                if wandb:
                    warnings.warn("wandb=True but wandb is not installed; logging without it", stacklevel=2)
            if _wandb is not None:
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = _wandb.init(project="intro2llm", dir=str(self.out_dir), config=run_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop lines whose ``step`` is greater than ``step`` (they belong to a run that was not checkpointed)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut by a crash
                continue
        atomic_write(self.path, "".join(x + "\n" for x in keep))

    @lesson_task(8)
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record for optimizer step ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k == "step" or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a helper for tests, lessons and the README)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
