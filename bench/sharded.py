"""Memory per rank with `--sharding fsdp` on CPU: 2 gloo processes against 1 process holding
the whole model, the same model and global batch (python -m bench runs it)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unsafe_experts.models.memory import phase_peak_mb
from unsafe_experts.models.sharding import local, shard_model

from . import workloads as w


def _rank(rank: int, world: int, tmp: str, k: int, layers_n: int) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        m = w.model(num_hidden_layers=layers_n)
        if world > 1:
            m = shard_model(m, torch.device("cpu"))
        layers = w.moe_layers(m)
        held = sum(local(p).numel() * p.element_size() for p in m.parameters()) / 2**20
        data = w.batches(2, 4, 32)  # each rank takes its rows of every batch
        log = lambda *a: None  # noqa: E731
        score_mb, scores = phase_peak_mb(lambda: w.score_pass(m, layers, data, log, progress=False))
        selection = w.top_k(scores, k, layers)
        sft_mb, _ = phase_peak_mb(lambda: w.masked_sft(m, layers, data, selection, 1e-4, 0.0, 1, log,
                                                       progress=False))
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(
            {"weights_mb": held, "scoring_mb": score_mb, "sft_mb": sft_mb}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def per_rank_mb(world: int, k: int, layers_n: int) -> dict[str, float]:
    """The largest rank's weights held, and its peaks (above its resident memory before) of an
    exact scoring pass and a masked-SFT epoch over the same 2 batches of 4 x 32 tokens."""
    with tempfile.TemporaryDirectory() as tmp, w.unmapped_frees_in_children():
        mp.spawn(_rank, args=(world, tmp, k, layers_n), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}
