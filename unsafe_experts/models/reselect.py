"""How each architecture's router turns (masked) logits into routing weights and expert choices.

Each rule is (router, router input, logits, forced) -> (weights, indices) and reproduces the router of
transformers 5.24 bit for bit on unmasked logits (tested on every architecture), so the ablation
can recompute a router's choice after masking experts out (or forcing them in: `forced`, a
bool mask over experts, is needed only where the choice is not by logit) without touching its
forward. They
live apart from architectures.py so that the record can name them and ablation.py can read them
from the record: the import graph stays one-way (ablation -> architectures -> reselect).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def _softmax_top_k(router, logits, cast: bool):
    probs = F.softmax(logits, dtype=torch.float, dim=-1) if cast else F.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        values /= values.sum(dim=-1, keepdim=True)
    return (values.to(logits.dtype) if cast else values), indices


def softmax_top_k(router, hidden, logits, forced=None):
    """OLMoE, Qwen2/3-MoE: softmax, top-k, renormalise if norm_topk_prob, cast back."""
    return _softmax_top_k(router, logits, cast=True)


def softmax_top_k_fp32(router, hidden, logits, forced=None):
    """Mixtral: as softmax_top_k (Mixtral always renormalises), but the weights stay fp32."""
    return _softmax_top_k(router, logits, cast=False)


def top_k_softmax(router, hidden, logits, forced=None):
    """GPT-OSS: top-k of the logits, then a softmax over the k."""
    values, indices = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(values, dim=1, dtype=values.dtype), indices


def granite(router, hidden, logits, forced=None):
    """GraniteMoE: top-k of the logits, softmax over the k, in the input's dtype."""
    values, indices = logits.topk(router.top_k, dim=-1)
    return torch.softmax(values, dim=-1).type_as(hidden), indices


def deepseek_v3(router, hidden, logits, forced=None):
    """Sigmoid scores plus the correction bias choose, within the best groups; an ablated expert's
    choice score is -inf (its sigmoid alone would be 0, and the bias could still pick it); a
    forced expert's is +inf (its raised logit alone could lose to another expert's bias)."""
    scores = logits.sigmoid()
    choice = (scores + router.e_score_correction_bias).masked_fill(logits == float("-inf"), float("-inf"))
    if forced is not None:
        choice = choice.masked_fill(forced, float("inf"))
    per_group = router.num_experts // router.num_group
    group_scores = choice.view(-1, router.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, router.num_group, per_group).reshape(-1, router.num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * router.routed_scaling_factor, indices


def phimoe(router, hidden, logits, forced=None):
    """PhiMoE's sparsemixer, taken from the model's own module so it is the same function."""
    sparsemixer = sys.modules[type(router).__module__].sparsemixer
    return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=router.training,
                       top_k=router.top_k)
