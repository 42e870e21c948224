"""The measured workloads on an OLMoE-shaped model scaled down for 2 CPU cores.

OLMoE-1B-7B: hidden 2048, 16 layers, 64 experts, top-8, expert intermediate 1024, vocab 50304.
Scaled: hidden 128, 4 layers, 64 experts, top-8, expert intermediate 64, vocab 4096 (experts
and top-k as in OLMoE; hidden : intermediate 2 : 1 as in OLMoE).
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unsafe_experts.models.architectures import moe_layers  # noqa: F401  (re-exported for bench.__main__)
from unsafe_experts.models.memory import peak_mb, phase_peak_mb, reset_peak
from unsafe_experts.selection.score_pass import score_pass  # noqa: F401  (re-exported for bench.__main__, bench.sharded)
from unsafe_experts.selection.scoring import expert_grad_scores, top_k
from unsafe_experts.training.phases import expert_params, lm_loss, masked_sft, set_trainable  # noqa: F401

SHAPE = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, vocab_size=4096)


@contextmanager
def unmapped_frees_in_children():
    """Processes started inside (spawned, so glibc reads its environment anew) map and unmap
    every tensor of 64 KiB or more. With glibc's defaults freed tensors stay in its heap (its
    mmap threshold grows after large frees), so resident memory would not show a phase's own
    peak; but that setting makes every allocation fault pages in, so times are measured in
    this process, without it."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


@contextmanager
def measuring_process():
    """A fresh process for CPU peak-memory phases: `.submit(fn, *args).result()`."""
    with unmapped_frees_in_children(), \
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("olmoe", **{**SHAPE, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def batches(n: int, batch_size: int, seq_len: int, vocab: int = 4096, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100  # loss on the second half: the "response"
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def timed_together(fns, repeats: int) -> list[float]:
    """Median seconds of each fn over repeats, the fns taking turns (after one warm-up each)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            t = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def plain_fwd_bwd(m, layers, batch):
    """Forward and backward with the expert weights trainable, nothing else."""
    set_trainable(m, expert_params(layers))
    lm_loss(m, batch).backward()


def our_scoring_step(m, layers, batch):
    plain_fwd_bwd(m, layers, batch)
    return expert_grad_scores(layers)


def research_scoring_step(m, layers, batch):
    """The research code's reduction: one `.item()` per expert parameter (a host sync each)."""
    plain_fwd_bwd(m, layers, batch)
    scores = {}
    for layer in layers:
        for e in range(layer.num_experts):
            total, count = 0.0, 0
            for p in layer.expert_params.values():
                total += p.grad[e].abs().sum().item()
                count += p.grad[e].numel()
            scores[(layer.index, e)] = total / count
    return scores


def dense_adamw_step(m, layers, batch, selection, lr=1e-4):
    """The research code's masked SFT: AdamW over all expert tensors, unselected grads zeroed."""
    params = expert_params(layers)
    set_trainable(m, params)
    opt = torch.optim.AdamW(params, lr=lr)
    keep = {layer.index: torch.zeros(layer.num_experts, dtype=torch.bool) for layer in layers}
    for layer_index, e in selection:
        keep[layer_index][e] = True
    lm_loss(m, batch).backward()
    with torch.no_grad():
        for layer in layers:
            for p in layer.expert_params.values():
                p.grad[~keep[layer.index]] = 0
    opt.step()
    return opt


def our_sft_step(m, layers, batch, selection, lr=1e-4):
    return masked_sft(m, layers, [batch], selection, lr, 0.0, 1, lambda *a: None, progress=False)


def selection_for(m, layers, batch, k):
    return top_k(our_scoring_step(m, layers, batch), k, layers)


# memory phases: run in the measuring process, on a fresh model each

def sft_peak_mb(step: str, k: int, seq_len: int, batch_size: int) -> float:
    """One masked-SFT step (`step` names it in bench.workloads) on a fresh model, so no variant
    inherits another's buffers. Runs in the measuring process."""
    step = globals()[step]
    m = model()
    layers = moe_layers(m)
    batch = batches(1, batch_size, seq_len)[0]
    selection = selection_for(m, layers, batch, k)
    set_trainable(m, [])
    mb, _ = phase_peak_mb(lambda: step(m, layers, batch, selection))
    return mb


def scoring_pass_peak_mb(memory: str, batches_n: int) -> float:
    """A full accumulate scoring pass on a fresh model (memory: exact, streamed or offload).
    Runs in the measuring process."""
    m = model()
    layers = moe_layers(m)
    data = batches(batches_n, 1, 32)  # short: the gradients, not activations, dominate
    mb, _ = phase_peak_mb(lambda: score_pass(m, layers, data, lambda *a: None, progress=False,
                                               streamed=memory == "streamed",
                                               offload=memory == "offload"))
    return mb


# OLMoE-1B-7B's real shape (bench.full_size)

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                   num_experts_per_tok=8, vocab_size=50304)
FULL_SIZE_PHASES = {
    "scoring_ours": lambda m, layers, batch, selection: our_scoring_step(m, layers, batch),
    "scoring_research": lambda m, layers, batch, selection: research_scoring_step(m, layers, batch),
    "sft_ours": our_sft_step,
    "sft_research": dense_adamw_step,
}


def full_size_setup(device: str, layers_n: int, batch_size: int, seq_len: int):
    """The model, its MoE layers, one batch and the k = 10% experts it selects."""
    device = torch.device(device)
    torch.manual_seed(0)
    config = AutoConfig.for_model("olmoe", **{**OLMOE_1B_7B, "num_hidden_layers": layers_n})
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    layers = moe_layers(model)
    batch = {k: v.to(device) for k, v in
             batches(1, batch_size, seq_len, vocab=config.vocab_size)[0].items()}
    selection = selection_for(model, layers, batch, sum(l.num_experts for l in layers) // 10)
    set_trainable(model, [])
    return model, layers, batch, selection


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_peak_mb(phase: str, device: str, layers_n: int, batch_size: int, seq_len: int) -> float:
    """Peak MB above the model's own memory of one run of `phase` on a fresh model."""
    model, layers, batch, selection = full_size_setup(device, layers_n, batch_size, seq_len)
    device = torch.device(device)
    gc.collect()
    reset_peak(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_mb(device)
    FULL_SIZE_PHASES[phase](model, layers, batch, selection)
    sync(device)
    return peak_mb(device) - before
