"""``Trainer``: the training loop every stage of the course builds on (pretraining, SFT, DPO, PPO, GRPO).

One optimizer step = one global batch of ``batch_size`` rows: each of the W processes takes its ``batch_size / W``
rows, splits them into micro-batches of ``micro_batch_size`` rows (gradient accumulation), and runs forward and
backward on each. The loss of a micro-batch is weighted by its share of the *global* number of target tokens,

    L = sum_micro  mean_loss(micro) * n_tokens(micro) / N_global        (times W, since DDP averages gradients)

so the gradient equals the gradient of the token-mean loss of the whole global batch, whatever the split into
processes and micro-batches (8 x 1 == 2 x 4 == 2 processes x 4). Then: global-norm clipping (the norm is logged),
a non-finite loss or gradient norm skips the step (stop after ``max_bad_steps`` in a row), optimizer and scheduler
step, logging (tqdm bar, ``metrics.jsonl``, TensorBoard, wandb), periodic evaluation and crash-safe checkpoints
(``checkpoint.py``) from which ``resume()`` continues bit-exactly.

Subclasses override ``compute_loss(batch) -> mean loss`` and ``count_tokens(batch) -> int`` (the batch is a dict
of tensors whose first dimension is rows) and, if they produce artefacts, ``on_train_end()``.
The training data is an iterator of this rank's batches (a dict of tensors with ``batch_size / W`` rows); when it
has ``state_dict()``/``load_state_dict()``, its position is saved in checkpoints.

Not handled: pipeline/tensor parallelism, fp16 loss scaling (bf16 needs none), uneven batches across ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intro2llm.course import lesson_task
from intro2llm.model.lora import checkpoint_missing_keys, checkpoint_state_dict, is_lora_model, lora_config_dict
from intro2llm.training import checkpoint as ckpt
from intro2llm.training.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    clip_grad_norm,
    consolidate,
    gather_objects,
    init_distributed,
    meta_skeleton,
    unwrap,
    wrap_model,
)
from intro2llm.training.logging import MetricsLogger

PRECISIONS = ("fp32", "bf16", "auto")


@dataclass
class TrainerConfig:
    """Everything the loop needs; ``batch_size`` is the global batch (rows per optimizer step, all ranks)."""

    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int | None = None  # rows per forward on one rank; None: the whole local batch
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    optimizer: str = "adamw"  # adamw | lion | torch-adamw
    weight_decay: float = 0.1
    betas: tuple[float, float] | None = None  # None: the optimizer's default for LMs
    grad_clip: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32) | auto (bf16 where it is fast)
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    out_dir: str | None = None
    progress: bool = True
    tensorboard: bool = True
    wandb: bool | None = None  # None: use wandb if installed (offline)
    device: str = "auto"
    strategy: str = "ddp"  # ddp | fsdp (multi-process only: one process with fsdp is a ValueError)
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the run config

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainerConfig: steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"TrainerConfig: batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainerConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"TrainerConfig: strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.max_bad_steps < 1:
            raise ValueError(f"TrainerConfig: max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainerConfig: lr must be a finite number > 0, got {self.lr}")
        if self.min_lr is not None and not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ValueError(f"TrainerConfig: min_lr must be a finite number >= 0 or None, got {self.min_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainerConfig: weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"TrainerConfig: grad_clip must be a finite number >= 0 or None, got {self.grad_clip}")
        if self.keep_last is not None and (isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int)
                                           or self.keep_last < 1):
            raise ValueError(f"TrainerConfig: keep_last must be an int >= 1 or None, got {self.keep_last!r}")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive steps with a non-finite loss or gradient norm."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where bf16 matmuls are native (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def _split_rows(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of ``batch`` along dim 0 into ``n`` equal parts."""
    parts = {k: v.chunk(n, dim=0) if isinstance(v, torch.Tensor) else [v] * n for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


class Trainer:
    """The training loop (see the module docstring). ``train()`` runs it; ``resume(path)`` continues a run."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        train_data: Iterable[dict[str, torch.Tensor]],
        eval_data: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.info = dist_info or init_distributed(config.device)
        world = self.info.world_size
        if config.strategy == "fsdp" and world == 1:
            raise ValueError(
                "strategy 'fsdp' shards the model over several processes but this is a single process: launch with "
                "torchrun --nproc_per_node N (N >= 2), or train unsharded with strategy 'ddp' (the default)"
            )
        if config.batch_size % world != 0:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the world size {world}")
        self.local_batch = config.batch_size // world
        mb = config.micro_batch_size or self.local_batch
        if self.local_batch % mb != 0:
            raise ValueError(
                f"local batch {self.local_batch} (batch_size {config.batch_size} / {world} ranks) is not a "
                f"multiple of micro_batch_size {mb}"
            )
        self.micro_batch_size = mb
        self.accum_steps = self.local_batch // mb
        self.device = self.info.device
        self.precision = resolve_precision(config.precision, self.device)
        model.to(self.device)
        self._fsdp = self.info.enabled and config.strategy == "fsdp"
        self._ddp = self.info.enabled and config.strategy == "ddp"
        # FSDP: a parameter-less copy (meta device) taken before sharding, to rebuild the full model at the end
        self._skeleton = meta_skeleton(model) if self._fsdp else None
        self.model = wrap_model(model, self.info, config.strategy, bf16=self.precision == "bf16")
        self.raw_model = unwrap(self.model)
        if optimizer is None:
            from intro2llm.optimizer import build_optimizer

            optimizer = build_optimizer(config.optimizer, self.raw_model, lr=config.lr,
                                        weight_decay=config.weight_decay, betas=config.betas)
        self.optimizer = optimizer
        if scheduler is None:
            from intro2llm.optimizer import build_scheduler

            min_lr = config.lr / 10 if config.min_lr is None else config.min_lr
            scheduler = build_scheduler(config.schedule, optimizer, config.warmup_steps, config.steps, min_lr)
        self.scheduler = scheduler
        self.train_data = train_data
        self._train_iter: Iterator | None = None
        self.eval_data = eval_data
        self.step = 0
        self.tokens_seen = 0
        self.bad_streak = 0
        self.last_eval: float | None = None
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.logger = MetricsLogger(
            self.out_dir, enabled=self.info.is_main, tensorboard=config.tensorboard, wandb=config.wandb,
            run_config={k: v for k, v in asdict(config).items() if k != "extra"} | dict(config.extra),
        )
        self.history: list[dict[str, Any]] = []  # the metrics of every step (all ranks), for tests and callers

    # ------------------------------------------------------------------------------------------ hooks
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the target tokens of one micro-batch. Default: ``model(**batch).loss``."""
        return self.model(**batch).loss

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of target tokens the mean in ``compute_loss`` runs over (labels shifted inside the model)."""
        labels = batch["labels"]
        return int((labels[..., 1:] != -100).sum())

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed (for tokens/s): the size of ``input_ids``."""
        return int(batch["input_ids"].numel())

    def on_train_end(self) -> None:
        """Called on rank 0 after the last step (and the final checkpoint); subclasses export artefacts here from
        ``self.raw_model`` — under FSDP that is by then the consolidated full model (see ``train``)."""

    # ------------------------------------------------------------------------------------------ one step
    def _autocast(self):  # noqa: ANN202
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._train_iter is None:
            self._train_iter = iter(self.train_data)
        try:
            batch = next(self._train_iter)
        except StopIteration:
            raise RuntimeError(f"training data ran out at step {self.step} (of {self.config.steps})") from None
        if not isinstance(batch, dict):
            raise TypeError(f"training batches must be dicts of tensors, got {type(batch).__name__}")
        rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        if rows != self.local_batch:
            raise ValueError(f"training batch has {rows} rows, expected batch_size / world = {self.local_batch}")
        return batch

    @lesson_task(8)
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Forward/backward over the micro-batches of ``batch`` (this rank's rows), clip, step. Returns metrics."""
        self.model.train()
        micro = _split_rows(self._to_device(batch), self.accum_steps)
        counts = [self.count_tokens(mb) for mb in micro]
        n_global = all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64)).item()
        if n_global <= 0:
            raise ValueError(f"step {self.step + 1}: the global batch has no target tokens (all labels ignored)")
        world = self.info.world_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            sync = self.model.no_sync() if (self._ddp and not last) else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self.compute_loss(mb)
                weight = counts[i] * world / n_global  # see the module docstring
                (loss * weight).backward()
            loss_sum += loss.detach().double() * counts[i]
        loss_val = (all_reduce_sum(loss_sum) / n_global).item()
        grad_norm = clip_grad_norm(self.model.parameters(), self.config.grad_clip)  # global norm (FSDP: all shards)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        if skipped:
            self.bad_streak += 1
            warnings.warn(
                f"step {self.step + 1}: non-finite loss ({loss_val}) or grad norm ({grad_norm}); skipping the update "
                f"({self.bad_streak}/{self.config.max_bad_steps} in a row)",
                RuntimeWarning, stacklevel=2,
            )
        else:
            self.bad_streak = 0
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        tokens = sum(self.batch_tokens(mb) for mb in micro) * world
        return {"loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "skipped": skipped}

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over ``eval_data()`` (each rank evaluates its rows; the sums are all-reduced)."""
        if self.eval_data is None:
            return None
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.eval_data():
            batch = self._to_device(batch)
            n = self.count_tokens(batch)
            with self._autocast():
                loss = self.compute_loss(batch)
            total += loss.double() * n
            count += n
        self.model.train()
        all_reduce_sum(total)
        all_reduce_sum(count)
        return (total / count).item() if count.item() > 0 else None

    # ------------------------------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor] | None:
        return checkpoint_state_dict(self.raw_model) if self.info.is_main else None  # LoRA: the adapters only

    def _optimizer_state(self) -> dict[str, Any] | None:
        return self.optimizer.state_dict() if self.info.is_main else None

    def checkpoint_root(self) -> Path:
        if self.out_dir is None:
            raise ValueError("checkpoints need TrainerConfig.out_dir")
        return self.out_dir / "checkpoints"

    def _trainer_state(self, rngs: list) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
            "rng": rngs,
            "tokens_seen": self.tokens_seen,
            "world_size": self.info.world_size,
            "strategy": "fsdp" if self._fsdp else "ddp",
            "bad_streak": self.bad_streak,
            "adapter": lora_config_dict(self.raw_model),  # LoRA: the base pointer and options
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call this). DDP / one process: rank 0 writes
        the full layout; FSDP: every rank writes its shards with torch.distributed.checkpoint (sharded layout)."""
        if self._fsdp:
            return self._save_sharded()
        model_state = self._model_state()
        optim_state = self._optimizer_state()
        rngs = gather_objects(ckpt.rng_state())
        path = self._on_main(lambda: ckpt.save_checkpoint(self.checkpoint_root(), self.step, model_state, optim_state,
                                                          self._trainer_state(rngs), keep_last=self.config.keep_last))
        barrier()
        return path

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (a file-system step of a checkpoint save), its result there and None elsewhere;
        a ``CheckpointError`` it raises is raised on every rank (broadcast), so no rank waits for a failed one."""
        error, result = None, None
        if self.info.is_main:
            try:
                result = fn()
            except ckpt.CheckpointError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error is not None:
            raise ckpt.CheckpointError(error)
        return result

    def _sharded_state(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}`` keyed by parameter names (FSDP: DTensor shards; else full tensors), the
        form torch.distributed.checkpoint saves and loads in place."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        module = self.model if self._fsdp else self.raw_model
        return {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, self.optimizer)}

    def _save_sharded(self) -> Path | None:
        import torch.distributed.checkpoint as dcp

        root = self.checkpoint_root()
        tmp = broadcast_object(self._on_main(lambda: ckpt.begin_sharded_save(root, self.step)))
        try:  # collective: DCP gathers every rank's plan and reports any rank's failure on all ranks
            dcp.save(self._sharded_state(), checkpoint_id=Path(tmp) / ckpt.SHARDED_DIR)
        except Exception as exc:  # noqa: BLE001 - any failure of the write: name it, keep older checkpoints
            if self.info.is_main:
                ckpt.abort_save(tmp)
            raise ckpt.CheckpointError(f"saving sharded checkpoint step {self.step} into {tmp} failed: {exc}") from exc
        rngs = gather_objects(ckpt.rng_state())
        path = self._on_main(lambda: ckpt.finish_sharded_save(root, self.step, tmp, self._trainer_state(rngs),
                                                              keep_last=self.config.keep_last))
        barrier()
        return path

    def resume(self, path: str | os.PathLike | None = None) -> int:
        """Load the newest checkpoint under ``path`` (a run directory or a ``checkpoints`` dir) or ``path`` itself
        if it is a checkpoint. Raises ``CheckpointError`` if there is none or a file is missing or corrupt."""
        path = Path(path) if path is not None else self.checkpoint_root()
        if (path / ckpt.META_FILE).exists() or path.name.startswith("step_"):
            target = path
        else:
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            target, damaged = ckpt.latest_intact_checkpoint(root)
            if target is None:
                why = f"; damaged: {damaged[0][1]}" if damaged else ""
                raise ckpt.CheckpointError(f"--resume: no intact checkpoint in {path} (looked for {root}/step_*){why}")
            # Newer but damaged checkpoints: said, and moved aside (kept for inspection) so that the run's next
            # saves neither count them for keep-last nor collide with them.
            for bad, reason in damaged:
                aside = bad.with_name("damaged-" + bad.name)
                if self.info.is_main:
                    if not aside.exists():
                        os.rename(bad, aside)
                    import sys

                    print(f"warning: {reason}; resuming from the newest intact checkpoint {target.name} instead "
                          f"(the damaged one is kept as {aside})", file=sys.stderr)
        c = ckpt.load_checkpoint(target)
        ts = c.trainer_state
        if bool(ts.get("adapter")) != is_lora_model(self.raw_model):
            raise ckpt.CheckpointError(
                f"checkpoint {target} holds " + ("LoRA adapters" if ts.get("adapter") else "a full model")
                + " but the model " + ("has adapters" if is_lora_model(self.raw_model) else "has none")
                + ": resume with the same --lora/--qlora options"
            )
        if c.sharded is not None:
            self._load_sharded(c)
        elif self._fsdp:
            self._load_full_into_sharded(c)
        else:
            missing, unexpected = self.raw_model.load_state_dict(c.model_state, strict=False)
            missing = checkpoint_missing_keys(self.raw_model, missing)  # a LoRA model's base is not stored
            if missing or unexpected:
                raise ckpt.CheckpointError(
                    f"checkpoint {target / ckpt.MODEL_FILE} does not fit the model: missing {missing}, "
                    f"unexpected {unexpected}"
                )
            if c.optimizer_state is not None:
                self.optimizer.load_state_dict(c.optimizer_state)
        self.scheduler.load_state_dict(ts["scheduler"])
        if ts.get("data") is not None:
            if not hasattr(self.train_data, "load_state_dict"):
                raise ckpt.CheckpointError(f"checkpoint {target} has a data position but the data cannot load it")
            self.train_data.load_state_dict(ts["data"])
            self._train_iter = None
        rngs, saved_world = ts["rng"], ts.get("world_size", 1)
        if saved_world != self.info.world_size and self.info.is_main:
            # The data position is global (rank r of W takes its rows of the same global batch), so the run goes
            # on with the same batches; only the per-rank RNG streams (dropout, sampling) cannot be carried over.
            import sys

            print(f"note: checkpoint {target.name} was written by {saved_world} process(es), this run has "
                  f"{self.info.world_size}: same data order and weights; per-rank RNG streams restart from the "
                  "saved ones by rank modulo the old world size; losses match up to reduction order", file=sys.stderr)
        ckpt.set_rng_state(rngs[self.info.rank % len(rngs)])
        self.step = c.step
        self.tokens_seen = ts.get("tokens_seen", 0)
        self.bad_streak = ts.get("bad_streak", 0)
        self.logger.truncate_after(self.step)
        return self.step

    def _load_sharded(self, c: ckpt.Checkpoint) -> None:
        """A sharded (DCP) checkpoint into this run, whatever its world size or strategy: DCP reads the pieces
        each rank's tensors need (FSDP: its shards; DDP / one process: full tensors)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._sharded_state()
        try:
            dcp.load(state, checkpoint_id=c.sharded)
        except Exception as exc:  # noqa: BLE001 - DCP raises its own types; name the checkpoint and the cause
            raise ckpt.CheckpointError(f"sharded checkpoint {c.path} does not fit this model/optimizer: {exc}") \
                from exc
        module = self.model if self._fsdp else self.raw_model
        set_model_state_dict(module, state["model"])
        set_optimizer_state_dict(module, self.optimizer, state["optim"])

    def _load_full_into_sharded(self, c: ckpt.Checkpoint) -> None:
        """A full checkpoint (one process / DDP) into an FSDP run: every rank reads the file and keeps its shards;
        the optimizer state is re-keyed from torch's parameter indices to parameter names first."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if c.trainer_state.get("adapter"):
            raise ckpt.CheckpointError(f"checkpoint {c.path} holds only LoRA adapters (a non-FSDP run); resume it "
                                       "without --strategy fsdp")
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.model, c.model_state, options=opts)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {c.path / ckpt.MODEL_FILE} does not fit the model: {exc}") \
                from exc
        if c.optimizer_state is not None:
            named = _optimizer_state_by_name(self.raw_model, self.optimizer, c.optimizer_state, c.path)
            set_optimizer_state_dict(self.model, self.optimizer, named, options=opts)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, Any]]:
        """Run until ``config.steps``; returns the per-step metrics of this call. Under FSDP, afterwards
        ``raw_model`` on rank 0 is the consolidated (unsharded) model, ready for ``generate`` and export; ``model``
        stays sharded on every rank."""
        cfg = self.config
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.info.is_main),
                   dynamic_ncols=True, desc="train")
        start, start_tokens, cpu0 = time.perf_counter(), self.tokens_seen, time.process_time()
        records = []
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self._next_batch())
                self.step += 1
                self.tokens_seen += metrics["tokens"]
                now = time.perf_counter()
                metrics["step_time"] = now - t0
                metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / max(now - start, 1e-9)
                metrics["tokens_seen"] = self.tokens_seen
                metrics["elapsed"] = now - start
                metrics["cpu_seconds"] = time.process_time() - cpu0  # this process, all threads
                if self.eval_data is not None and (
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps
                ):
                    self.last_eval = self.evaluate()
                    metrics["eval_loss"] = self.last_eval
                if self.bad_streak >= cfg.max_bad_steps:
                    self.logger.log(self.step, metrics)
                    raise NonFiniteLossError(
                        f"stopping at step {self.step}: the loss or gradient norm was non-finite for "
                        f"{self.bad_streak} steps in a row (lower the lr, enable grad_clip, check the data)"
                    )
                self.logger.log(self.step, metrics)
                records.append(metrics)
                self.history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if self.out_dir is not None and cfg.save_every and self.step % cfg.save_every == 0 \
                        and self.step < cfg.steps:
                    self.save_checkpoint()
            if self.out_dir is not None:
                self.save_checkpoint()
            if self._fsdp:
                # Generation, evaluation helpers and exports after training read the parameters outside the
                # sharded forward: on rank 0 ``raw_model`` becomes the consolidated full model (a collective).
                full = consolidate(self.model, self._skeleton, self.info)
                if full is not None:
                    self.raw_model = full
            if self.info.is_main:
                self.on_train_end()
        finally:
            bar.close()
            self.logger.close()
        return records


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             path: Path) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered in param-group order) re-keyed by parameter name, the form
    ``set_optimizer_state_dict`` takes. The numbering is matched against this optimizer's groups, built the same
    way from the same model."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved_groups = state.get("param_groups", [])
    if len(saved_groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(saved_groups, optimizer.param_groups)):
        raise ckpt.CheckpointError(
            f"checkpoint {path / ckpt.OPTIMIZER_FILE}: its param groups "
            f"{[len(g['params']) for g in saved_groups]} do not match this optimizer's "
            f"{[len(g['params']) for g in optimizer.param_groups]} (different model, optimizer or weight decay split)"
        )
    index_to_name = {}
    for saved, live in zip(saved_groups, optimizer.param_groups):
        for i, p in zip(saved["params"], live["params"]):
            index_to_name[i] = names[id(p)]
    return {
        "state": {index_to_name[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in saved_groups],
    }
