"""Data parallelism under ``torchrun``: process-group setup, DDP / FSDP2 wrapping, and small collectives.

``torchrun --nproc_per_node=W`` starts W processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set;
``init_distributed()`` joins them (gloo on CPU, nccl on CUDA). Every rank holds a full model replica (DDP: gradients
are all-reduced and averaged during backward) or a 1/W shard of every parameter (FSDP2 ``fully_shard``: parameters
all-gathered per block for compute, gradients reduce-scattered). With global batch G each rank sees G/W rows, and
the averaged gradient equals the single-process gradient of the whole batch — the property tests check.

FSDP2 details (``wrap_model(..., "fsdp")``): every transformer block is its own ``fully_shard`` unit, then the root
(embeddings, final norm, head); under bf16 a ``MixedPrecisionPolicy`` computes in bf16 and reduces gradients in
fp32 (the sharded master weights stay fp32). Parameters become DTensors: code that reads them outside the sharded
forward (generation, export) needs the full tensors — ``meta_skeleton`` (taken before sharding, parameters on the
meta device, so it costs no memory) plus ``consolidate`` (all-gather a full state dict, rank 0 loads it into a copy
of the skeleton) give an ordinary unsharded module.

Post-training: trainers built on ``Trainer`` (SFT, DPO) inherit all of this; a frozen reference model is copied
before the policy is sharded and made a ``frozen_replica`` (sharded too under FSDP). PPO and GRPO run their own loop
with ``distribute_policy``, ``gathered_params`` (full weights for generation), ``rank_rows``, ``average_gradients``,
``all_reduce_stats``, ``clip_grad_norm`` and ``full_state_dict``: every rank samples the same rollout and trains on
its share of each mini-batch. ``run_in_process_group`` is the body of every training command.

Multi-node is the same code: ``torchrun --nnodes N --nproc_per_node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT``
on every node sets the same environment variables. A rank that dies makes the others fail in their next collective
(the connection closes) or, at the latest, after the process-group timeout (``init_distributed(timeout=)``, default
``INTRO2LLM_DIST_TIMEOUT`` = 600 s), so no rank waits forever.

References: Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB 2020);
Zhao et al., "PyTorch FSDP" (2023); the FSDP2 ``torch.distributed.fsdp.fully_shard`` tutorial.
LoRA/QLoRA under FSDP: the adapters and the fp32 embedding/LM head are sharded; a 4-bit (QLoRA) base keeps its NF4
codes in buffers, which FSDP2 does not shard, so every rank holds the whole (small) quantized base.
Not handled: tensor/pipeline parallelism, CPU offload of shards.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_S = 600.0


def init_distributed(device: str | None = None, timeout: float | None = None) -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (idempotent); pick the device for this rank.

    ``timeout`` (seconds; default ``$INTRO2LLM_DIST_TIMEOUT`` or 600): the longest any collective waits for the other
    ranks before raising — the bound on how long survivors of a dead rank can hang."""
    if timeout is None:
        timeout = float(os.environ.get("INTRO2LLM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout > 0:
        raise ValueError(f"init_distributed: timeout must be > 0 seconds, got {timeout}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed(synchronize: bool = True) -> None:
    """Leave the process group (no-op without one). ``synchronize``: every rank meets at a barrier first — pass
    False on an error path, where another rank may never arrive.

    Call it after everything that holds the group (the DDP-wrapped model, the trainer) is gone. This works around a
    shutdown deadlock of the gloo backend, caught here with gdb (torch 2.13, CPU, two ranks, about one run in ten
    under load): ``~ProcessGroupGloo`` joins its worker threads while the thread that dropped the last reference
    holds the GIL, and a worker still releasing the tensors of a finished collective waits for the GIL to decref
    them. When a DDP ``Reducer`` held that last reference, the destructor ran whenever Python freed the model.
    So: collect garbage (cycles too), meet at a barrier, then sleep briefly with the GIL released so the workers
    finish their releases; only then is the group destroyed.
    """
    if not dist.is_initialized():
        return
    import gc
    import time

    gc.collect()
    if synchronize and dist.get_world_size() > 1:
        dist.barrier()
    if dist.get_backend() == "gloo":
        time.sleep(0.2)  # GIL released: gloo's worker threads drop their last tensor references
    dist.destroy_process_group()


STRATEGIES = ("ddp", "fsdp")


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp", bf16: bool = False) -> nn.Module:
    """DDP (``strategy="ddp"``) or FSDP2 (``"fsdp"``; gloo/CPU or nccl/CUDA) around ``model``; unchanged with one
    process. ``bf16``: FSDP computes with bf16 copies of the gathered parameters and reduces gradients in fp32."""
    if strategy not in STRATEGIES:
        raise ValueError(f"wrap_model: strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6 keeps it under _composable
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise RuntimeError(f"FSDP2 (fully_shard) is not available in torch {torch.__version__}") from exc
    kwargs = {}
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Shard each transformer block separately (its parameters are gathered just for its compute), then the rest.
    blocks = _transformer_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def frozen_replica(model: nn.Module, info: DistInfo, strategy: str = "ddp", bf16: bool = False) -> nn.Module:
    """``model`` as a frozen reference (DPO's π_ref, PPO/GRPO's KL anchor): eval mode, no parameter requires grad,
    on this rank's device. Under FSDP it is sharded like the policy (pass a module that is not sharded yet, e.g.
    a deep copy taken before the policy is sharded), so it costs 1/W of its memory per rank; its forwards are then
    collectives that every rank runs in step. Under DDP / one process it stays an ordinary local module: it is never
    updated, so the replicas need no synchronisation."""
    if is_sharded(model):
        raise ValueError("frozen_replica: the model is already FSDP-sharded; copy it before sharding the policy")
    model.eval()
    model.requires_grad_(False)
    model.to(info.device)
    if strategy == "fsdp" and info.enabled:
        wrap_model(model, info, "fsdp", bf16=bf16)
    return model


@contextlib.contextmanager
def gathered_params(model: nn.Module) -> Iterator[nn.Module]:
    """The plain module with full (unsharded) parameters for the duration of the block: code that reads weights
    outside the module forward (the KV-cache / C++ decode path of generation, weight bundles) sees ordinary tensors.
    FSDP2: every ``fully_shard`` unit is all-gathered (``unshard()``, a collective: every rank enters the block)
    and resharded on exit, so generation costs the full model's memory on each rank only while it runs; DDP: the
    module inside the wrapper; one process: ``model`` itself."""
    units = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")] \
        if is_sharded(model) else []
    # forwards inside the block (the prefill, module-forward decode steps) must not reshard the blocks again: the
    # decode reads their weights directly afterwards (wrap_model's blocks reshard after forward; the root never does)
    blocks = [u for u in units if u is not model]
    for unit in blocks:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield unwrap(model)
    finally:
        for unit in units:
            unit.reshard()
        for unit in blocks:
            unit.set_reshard_after_forward(True, recurse=False)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of ``parameters`` to the global norm ``max_norm`` (None or 0: measure only) and return
    the norm before clipping as a float. Under FSDP the gradients are DTensor shards: torch computes the norm over
    all shards (a collective), so every rank clips by the same global factor."""
    params = [p for p in parameters if p.grad is not None]
    sharded = [p for p in params if hasattr(p.grad, "full_tensor")]
    if not sharded or len(sharded) == len(params):  # all plain, or all FSDP shards: torch's clip
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # FSDP shards plus replicated parameters (PPO's value head): the two norms combined, then one clip factor
    plain = [p for p in params if not hasattr(p.grad, "full_tensor")]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in (sharded, plain)]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
    if max_norm and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for p in params:
            p.grad.mul_(coef)
    return total


# ---------------------------------------------------------------------------------------- RL trainers (PPO, GRPO)
def distribute_policy(model: nn.Module, info: DistInfo, strategy: str = "ddp", ref_model: nn.Module | None = None,
                      need_ref: bool = False, bf16: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """(policy, frozen reference or None) for a trainer that runs its own loop (PPO, GRPO) on ``info``'s ranks.

    The reference (``ref_model``, else a deep copy of ``model`` taken first, when ``need_ref``) is a
    ``frozen_replica``. The policy is moved to the rank's device; ``fsdp`` shards it in place (``wrap_model``);
    ``ddp`` keeps an ordinary replica per rank and the trainer calls ``average_gradients`` once per optimizer step
    (DDP's all-reduce without the wrapper: the RL code calls the policy's submodules and reads its weights outside
    ``forward`` — KV-cache prefill, the fused head, generation — which a ``DistributedDataParallel`` wrapper does
    not expose, and its per-backward hooks would all-reduce every micro-batch). One process: unchanged."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    if strategy == "fsdp" and not info.enabled:
        raise ValueError("strategy 'fsdp' shards the model over several processes but this is a single process: "
                         "launch with torchrun --nproc_per_node N (N >= 2), or use strategy 'ddp'")
    ref = None
    if need_ref:
        ref = frozen_replica(ref_model if ref_model is not None else copy.deepcopy(model), info, strategy, bf16)
    model.to(info.device)
    if strategy == "fsdp":
        wrap_model(model, info, "fsdp", bf16=bf16)
    return model, ref


def check_even_split(units: int, minibatches: int, info: DistInfo, what: str) -> None:
    """``ValueError`` unless ``units`` (GRPO: groups, PPO: rows) per step split into ``minibatches`` equal mini-batches
    that each split evenly over the ranks (``rank_rows``); a no-op with one process. Checked when a trainer is built,
    so a bad setting fails before any rollout."""
    if not info.enabled:
        return
    per = -(-units // minibatches)
    if units % minibatches or per % info.world_size:
        raise ValueError(f"{units} {what} per step in {minibatches} mini-batch(es) cannot be split evenly over "
                         f"{info.world_size} processes: each mini-batch needs a multiple of {info.world_size} {what}")


def rank_rows(rows: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """This rank's contiguous share of ``rows`` (a mini-batch every rank holds), in whole units of ``unit`` rows
    (GRPO: a group); all of ``rows`` with one process. Every rank must get the same number of rows (under FSDP each
    forward is a collective), so the number of units must be divisible by the world size: ``ValueError`` if not."""
    world = _world()
    if world == 1:
        return rows
    units = rows.numel() // unit
    if rows.numel() % unit or units % world:
        raise ValueError(f"a mini-batch of {rows.numel()} rows ({units} units of {unit}) cannot be split evenly over "
                         f"{world} processes: make the rows (or groups) per mini-batch a multiple of the world size")
    share = rows.numel() // world
    rank = dist.get_rank()
    return rows[rank * share:(rank + 1) * share]


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of replicated parameters over ranks (one all-reduce per tensor; no-op with one
    process). FSDP-sharded (DTensor) gradients are skipped: ``fully_shard`` already reduce-scattered them."""
    world = _world()
    if world == 1:
        return
    for p in parameters:
        if p.grad is not None and not hasattr(p.grad, "full_tensor"):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def all_reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """Sum each value over ranks (the same keys on every rank, e.g. per-rank shares of a mini-batch mean)."""
    if _world() == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))


def _full(t):  # noqa: ANN001, ANN202 - a tensor or any state value
    return t.full_tensor().cpu() if hasattr(t, "full_tensor") else t


def full_state_dict(obj: nn.Module | torch.optim.Optimizer) -> dict:
    """``obj.state_dict()`` (a module or an optimizer, e.g. over a policy and PPO's value head) with full tensors:
    FSDP's DTensor shards are all-gathered to CPU (a collective under FSDP: every rank calls it, in the same order).
    The layout is the ordinary one, so the result loads under any strategy and world size (``load_full_state_dict``).
    """
    state = obj.state_dict()
    if isinstance(obj, torch.optim.Optimizer):
        return {**state, "state": {i: {k: _full(v) for k, v in st.items()} for i, st in state["state"].items()}}
    return {k: _full(v) for k, v in state.items()}


def load_full_state_dict(obj: nn.Module | torch.optim.Optimizer, state: dict) -> None:
    """The inverse of ``full_state_dict``: full tensors into a (possibly FSDP-sharded) module or its optimizer, each
    rank keeping its shards. A module's keys must match exactly (``ValueError`` naming the differences)."""
    if isinstance(obj, torch.optim.Optimizer):
        params = [p for g in obj.param_groups for p in g["params"]]
        per_param = {i: {k: v if k == "step" else _like(v, params[i]) for k, v in st.items()}
                     for i, st in state["state"].items()}
        obj.load_state_dict({**state, "state": per_param})
        return
    live = obj.state_dict()
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise ValueError(f"the state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    obj.load_state_dict({k: _like(v, live[k]) for k, v in state.items()})


def _like(value, ref: torch.Tensor):  # noqa: ANN001, ANN202
    """``value`` (a full tensor) sharded like the DTensor ``ref``; unchanged when ``ref`` is an ordinary tensor."""
    if not hasattr(ref, "device_mesh") or not isinstance(value, torch.Tensor) or value.shape != ref.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


def run_in_process_group(fn: Callable[[DistInfo], int], device: str | None = None,
                         timeout: float | None = None) -> int:
    """Join the torchrun group (if any), run ``fn(info)`` -> exit code, leave the group (see ``cleanup_distributed``):
    the body of every command that trains under torchrun. ``fn`` runs in its own frame, so the wrapped models and
    trainers it holds are freed before the group is destroyed."""
    info = init_distributed(device, timeout=timeout)
    rc = 1
    try:
        rc = fn(info)
    finally:
        cleanup_distributed(synchronize=rc == 0)
    return rc


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` has FSDP2-sharded (DTensor) parameters."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (take it before sharding) whose parameters live on the meta device (no memory); buffers and
    every other attribute are copied. Tied parameters stay tied. ``consolidate`` fills it with real weights."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for _, p in model.named_parameters(remove_duplicate=False)}
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """A real copy of ``skeleton`` on ``device`` holding ``state`` (a full state dict; strict)."""
    model = copy.deepcopy(skeleton)
    real: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in real:  # one new tensor per parameter object: tied weights stay tied
                real[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            mod._parameters[name] = real[id(p)]
    model.to(device)
    model.load_state_dict(state, strict=True)
    return model


def consolidate(model: nn.Module, skeleton: nn.Module, info: DistInfo) -> nn.Module | None:
    """The full, unsharded model (CPU) on rank 0 and None elsewhere; a collective: every rank must call it.

    ``model`` is the FSDP2-sharded module, ``skeleton`` its ``meta_skeleton`` taken before sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # full_state_dict + cpu_offload: all-gathered one tensor at a time, kept on rank 0 only
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    return materialize(skeleton, state)


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    for name in ("layers", "blocks", "h"):
        for mod in model.modules():
            sub = getattr(mod, name, None)
            if isinstance(sub, nn.ModuleList) and len(sub) > 0:
                return list(sub)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modifies the module in place, nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _world() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op with one process)."""
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):  # noqa: ANN001, ANN201 - any picklable object
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:  # noqa: ANN001
    """Every rank's ``obj`` as a list (on every rank); ``[obj]`` with one process."""
    if _world() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _world() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------- lesson helpers
def simulate_ring_all_reduce(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Ring all-reduce of W equal-shaped tensors, simulated in one process (the algorithm NCCL/gloo use).

    Each tensor is cut into W chunks. Reduce-scatter: in W-1 steps, rank r sends chunk (r - s) mod W to rank r+1,
    which adds it to its own; afterwards rank r holds the full sum of chunk (r + 1) mod W. All-gather: W-1 more
    steps pass the finished chunks around the ring. Returns (every rank's result, elements sent per rank), the
    latter being 2 (W - 1) / W * N — independent of W for large W, which is why the ring scales.
    """
    world = len(tensors)
    if world == 0:
        raise ValueError("simulate_ring_all_reduce: need at least one tensor")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"simulate_ring_all_reduce: shapes differ: {[tuple(t.shape) for t in tensors]}")
    bufs = [list(t.detach().flatten().clone().tensor_split(world)) for t in tensors]  # bufs[rank][chunk]
    sent = 0
    for s in range(world - 1):  # reduce-scatter
        msgs = [(r, (r - s) % world, bufs[r][(r - s) % world].clone()) for r in range(world)]
        for r, c, data in msgs:
            bufs[(r + 1) % world][c] += data
            sent += data.numel() if r == 0 else 0
    for s in range(world - 1):  # all-gather: rank r owns the finished chunk (r + 1 - s) mod W
        msgs = [(r, (r + 1 - s) % world, bufs[r][(r + 1 - s) % world].clone()) for r in range(world)]
        for r, c, data in msgs:
            bufs[(r + 1) % world][c] = data
            sent += data.numel() if r == 0 else 0
    return [torch.cat(b).view(shape) for b in bufs], sent


def zero_memory_per_rank(num_params: int, world_size: int, stage: int, bytes_per_param: tuple = (4, 4, 8)) -> float:
    """Bytes per rank for weights + grads + Adam state under ZeRO stage 0 (DDP), 1, 2 or 3 (= FSDP full shard).

    ``bytes_per_param`` = (weight, grad, optimizer) bytes; fp32 Adam: (4, 4, 8). Stage 1 shards the optimizer
    state, 2 also the gradients, 3 also the weights (Rajbhandari et al., "ZeRO", SC 2020).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_memory_per_rank: stage must be 0, 1, 2 or 3, got {stage}")
    w, g, o = bytes_per_param
    shard = [(w, g, o), (w, g, o / world_size), (w, g / world_size, o / world_size),
             (w / world_size, g / world_size, o / world_size)][stage]
    return num_params * sum(shard)
