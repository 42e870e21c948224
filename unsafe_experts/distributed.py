"""Data parallelism through torch.distributed (torchrun, accelerate launch, or any process
group): every rank takes its share of each batch's rows; gradients of what is scored or
trained are summed across ranks, so scores, the selected experts and the updates are those of
one process on the whole batch. Outside a process group every helper is the identity."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's rows of a batch (rows rank, rank + world, ...)."""
    rank, size = world()
    return batch if size == 1 else {k: v[rank::size] for k, v in batch.items()}


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
