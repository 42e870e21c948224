"""The measured workloads on an OLMoE-shaped model scaled down for 2 CPU cores.

OLMoE-1B-7B: hidden 2048, 16 layers, 64 experts, top-8, expert intermediate 1024, vocab 50304.
Scaled: hidden 128, 4 layers, 64 experts, top-8, expert intermediate 64, vocab 4096 (experts
and top-k as in OLMoE; hidden : intermediate 2 : 1 as in OLMoE).
"""
from __future__ import annotations

import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unsafe_experts.adapters import moe_layers  # noqa: F401  (re-exported for bench.__main__)
from unsafe_experts.phases import expert_params, lm_loss, masked_sft, score_pass, set_trainable  # noqa: F401
from unsafe_experts.scoring import expert_grad_scores, top_k

SHAPE = dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, vocab_size=4096)


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
