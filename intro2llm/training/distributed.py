"""Data parallelism under ``torchrun``: process-group setup, DDP / FSDP2 wrapping, and small collectives.

``torchrun --nproc_per_node=W`` starts W processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set;
``init_distributed()`` joins them (gloo on CPU, nccl on CUDA). Every rank holds a full model replica (DDP: gradients
are all-reduced and averaged during backward) or a 1/W shard of every parameter (FSDP2 ``fully_shard``: parameters
all-gathered per block for compute, gradients reduce-scattered). With global batch G each rank sees G/W rows, and
the averaged gradient equals the single-process gradient of the whole batch — the property tests check.

References: Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (VLDB 2020);
Zhao et al., "PyTorch FSDP" (2023); the FSDP2 ``torch.distributed.fsdp.fully_shard`` tutorial.
Not handled: tensor/pipeline parallelism, multi-node rendezvous options beyond what torchrun's env provides.
"""

from __future__ import annotations

import os
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


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (idempotent); pick the device for this rank."""
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
        dist.init_process_group(backend=backend)
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


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """DDP (``strategy="ddp"``) or FSDP2 (``"fsdp"``, CUDA) around ``model``; unchanged with one process."""
    if strategy not in ("ddp", "fsdp"):
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
    # Shard each transformer block separately (its parameters are gathered just for its compute), then the rest.
    blocks = _transformer_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):  # noqa: ANN001, ANN201 - any picklable object
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:  # noqa: ANN001
    """Every rank's ``obj`` as a list (on every rank); ``[obj]`` with one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
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
