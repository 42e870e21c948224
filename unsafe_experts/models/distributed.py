"""Data parallelism through torch.distributed (torchrun, accelerate launch, or any process
group): every rank takes its share of each batch's rows; gradients of what is scored or
trained are summed across ranks, so scores, the selected experts and the updates are those of
one process on the whole batch. Outside a process group every helper is the identity."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world() -> int:
    """The number of processes this run was launched with (torchrun sets WORLD_SIZE), known
    before the process group is joined."""
    return world()[1] if world()[1] > 1 else int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: str | None) -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join its process group: gloo on CPU,
    nccl on GPUs. Returns this process's rank (0 when alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        # the pipeline evaluates on rank 0 between rounds while the other ranks wait in the
        # next collective: allow hours, not the default 10-30 minutes
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(hours=6))
    return world()[0]


def local_device(device: str | None) -> torch.device:
    """The requested device; on GPUs under torchrun, this rank's own GPU (LOCAL_RANK)."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a batch (rows rank, rank + world, ...)."""
    rank, size = world()
    return batch if size == 1 else {k: v[rank::size] for k, v in batch.items()}


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
