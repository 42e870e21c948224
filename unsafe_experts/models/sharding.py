"""FSDP (torch's fully_shard) for models that do not fit one device.

Every decoder layer and the whole model are sharded along dim 0 across the ranks. For a fused
expert tensor [experts, ...] and a router [experts, hidden] dim 0 is the expert, so each rank
holds a contiguous block of experts with their gradients and, in SparseRowAdamW, the optimizer
state of the selected experts it holds: device memory for weights, gradients and optimizer state
is divided by the number of ranks. Ranks still take different rows of each batch (data
parallelism); fully_shard's reduce-scatter sums their gradients (divide factor 1, fp32), which
matches the loss normalised by the global token count."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .distributed import world


def load_sharded(load, device: torch.device) -> torch.nn.Module:
    """`load()` (a model on the CPU) sharded across all ranks, each rank's shard on `device`.
    The ranks load in turn, each dropping the rest of the model before the next starts, so
    host memory holds one whole model and the shards at a time, not one whole model per rank
    (fully_shard's set-up exchanges nothing between ranks)."""
    mesh = init_device_mesh(device.type, (world()[1],))
    model = None
    for turn in range(world()[1]):
        if turn == world()[0]:
            model = shard_model(load(), device, mesh)
        dist.barrier()
    return model


def shard_model(model: torch.nn.Module, device: torch.device, mesh=None) -> torch.nn.Module:
    """Shards a model loaded on the CPU across all ranks; each rank's shard moves to `device`."""
    if mesh is None:
        mesh = init_device_mesh(device.type, (world()[1],))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM, which gloo has too
    # non-persistent buffers (rotary frequencies) are not sharded: move them too
    return model.to(device)


def is_sharded(model_or_param) -> bool:
    if isinstance(model_or_param, torch.nn.Module):
        return isinstance(model_or_param, FSDPModule)
    return isinstance(model_or_param, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the tensor itself when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the global dim-0 rows this rank holds (all rows when not sharded).
    fully_shard splits dim 0 as torch.chunk does: ceil(n / ranks) rows each, the last fewer."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    rank, size = world()
    chunk = -(-param.shape[0] // size)
    start = min(rank * chunk, param.shape[0])
    return start, start + param.to_local().shape[0]


def gather_rows(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Per-row values [local rows] of a sharded parameter -> [all rows] on every rank."""
    if not isinstance(param, DTensor):
        return values
    size = world()[1]
    chunk = -(-param.shape[0] // size)
    padded = torch.zeros(chunk, *values.shape[1:], dtype=values.dtype, device=values.device)
    padded[:len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:param.shape[0]]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (None on the other ranks); every rank must call
    it. None as well for a model that is not sharded: save it as it is."""
    if not is_sharded(model):
        return None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if world()[0] == 0 else None
