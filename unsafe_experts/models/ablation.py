"""Causal ablation: switch given (layer, expert) pairs off and see what the model does without them.

An ablated expert's router logit is set to -inf before the top-k, so the expert is never chosen,
and the routing weights of the experts that are chosen are recomputed exactly as the family
computes them (renormalised over the top-k where the family does so). The router's own forward
is left alone; a forward hook recomputes its (weights, indices) from the masked logits with the
family's rule below. Each rule reproduces the router bit for bit on unmasked logits (tested on
every family), which is what makes the un-ablated experts' weights trustworthy.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ExpertSetError
from .architectures import MoELayer, UnsupportedModelError, moe_layers


def _softmax_top_k(router, hidden, logits, cast: bool):
    """OLMoE, Qwen2/3-MoE (renormalise if norm_topk_prob, cast back), Mixtral (always renormalise,
    weights stay fp32)."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1) if cast else F.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        values /= values.sum(dim=-1, keepdim=True)
    return (values.to(logits.dtype) if cast else values), indices


def _top_k_softmax(router, hidden, logits):
    """GPT-OSS: top-k of the logits, then a softmax over the k."""
    values, indices = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(values, dim=1, dtype=values.dtype), indices


def _granite(router, hidden, logits):
    values, indices = logits.topk(router.top_k, dim=-1)
    return torch.softmax(values, dim=-1).type_as(hidden), indices


def _deepseek_v3(router, hidden, logits):
    """Sigmoid scores plus the correction bias choose, within the best groups; an ablated expert's
    choice score is -inf (its sigmoid alone would be 0, and the bias could still pick it)."""
    scores = logits.sigmoid()
    choice = (scores + router.e_score_correction_bias).masked_fill(logits == float("-inf"), float("-inf"))
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


def _phimoe(router, hidden, logits):
    """PhiMoE's sparsemixer, taken from the model's own module so it is the same function."""
    sparsemixer = sys.modules[type(router).__module__].sparsemixer
    return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=router.training,
                       top_k=router.top_k)


# model_type -> (router, router input, masked logits) -> (weights, indices), as in transformers 5.24
RESELECT = {
    "olmoe": lambda r, h, x: _softmax_top_k(r, h, x, cast=True),
    "qwen2_moe": lambda r, h, x: _softmax_top_k(r, h, x, cast=True),
    "qwen3_moe": lambda r, h, x: _softmax_top_k(r, h, x, cast=True),
    "mixtral": lambda r, h, x: _softmax_top_k(r, h, x, cast=False),
    "gpt_oss": _top_k_softmax,
    "granitemoe": _granite,
    "deepseek_v3": _deepseek_v3,
    "phimoe": _phimoe,
}


@contextmanager
def masked_routers(model_type: str, layers: list[MoELayer], masked: dict[int, list[int]]):
    """Hooks the router of every layer in `masked` (decoder index -> experts to switch off; an
    empty list re-routes unchanged); the hooks are removed on exit."""
    if model_type not in RESELECT:
        raise UnsupportedModelError(f"ablation does not know how {model_type!r} routes; "
                                    f"supported: {', '.join(sorted(RESELECT))}")
    reselect = RESELECT[model_type]

    def hook_for(experts):
        def hook(module, inputs, output):
            logits = output[0].clone()
            logits[..., experts] = float("-inf")
            weights, indices = reselect(module, inputs[0], logits)
            return (logits, weights, indices, *output[3:])
        return hook

    by_index = {layer.index: layer for layer in layers}
    handles = [by_index[i].router.register_forward_hook(hook_for(sorted(experts)))
               for i, experts in masked.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablated(model, layers: list[MoELayer] | None, experts: Iterable[tuple[int, int]]):
    """While active, the model never routes a token to any of `experts` ((decoder layer index,
    expert) pairs); the other experts' weights are renormalised as the family does."""
    layers = layers if layers is not None else moe_layers(model)
    pairs = check_experts(list(experts), layers, "ablation")
    grouped: dict[int, list[int]] = {}
    for layer_index, expert in pairs:
        grouped.setdefault(layer_index, []).append(expert)
    for layer in layers:
        live = layer.num_experts - len(grouped.get(layer.index, []))
        if live < layer.top_k:
            raise ExpertSetError(f"ablation: layer {layer.index} would keep {live} experts, fewer "
                                 f"than the {layer.top_k} its router picks per token")
    with masked_routers(model.config.model_type, layers, grouped):
        yield


def check_experts(pairs: list, layers: list[MoELayer] | None, source: str) -> list[tuple[int, int]]:
    """[(layer, expert)] with every pair checked against the model's layers (without layers:
    only that each is a pair of integers); duplicates dropped."""
    sizes = None if layers is None else {layer.index: layer.num_experts for layer in layers}
    out: list[tuple[int, int]] = []
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ExpertSetError(f"{source}: {pair!r} is not a [layer, expert] pair of integers")
        layer_index, expert = pair
        if sizes is not None and layer_index not in sizes:
            raise ExpertSetError(f"{source}: [{layer_index}, {expert}]: layer {layer_index} is not "
                                 f"a MoE layer of this model (MoE layers: {', '.join(map(str, sizes))})")
        if sizes is not None and not 0 <= expert < sizes[layer_index]:
            raise ExpertSetError(f"{source}: [{layer_index}, {expert}]: layer {layer_index} has "
                                 f"experts 0 to {sizes[layer_index] - 1}")
        if (layer_index, expert) not in out:
            out.append((layer_index, expert))
    return out


def load_expert_set(path: str | Path, round: int | None = None,
                    layers: list[MoELayer] | None = None) -> list[tuple[int, int]]:
    """The experts named by a file or a run: a JSON list of [layer, expert] pairs, a JSON object
    {"experts": [...]}, or a run's training_metadata.json (or its directory), whose round
    `round` (default: the last recorded) is read. With `layers`, every pair is checked to exist."""
    path = Path(path)
    if path.is_dir():
        path = path / "training_metadata.json"
    if not path.is_file():
        raise ExpertSetError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExpertSetError(f"{path}: not valid JSON ({e})") from None
    source = str(path)
    if isinstance(data, dict) and "identified_experts_per_round" in data:
        rounds = data["identified_experts_per_round"]
        if not rounds:
            raise ExpertSetError(f"{path}: the run has no completed round")
        key = str(round if round is not None else max(map(int, rounds)))
        if key not in rounds:
            raise ExpertSetError(f"{path}: no round {key}; recorded rounds: {', '.join(sorted(rounds, key=int))}")
        data, source = rounds[key], f"{path} round {key}"
    elif round is not None:
        raise ExpertSetError(f"{path}: round={round} needs a run's training_metadata.json")
    if isinstance(data, dict):
        if "experts" not in data:
            raise ExpertSetError(f"{source}: an object needs an \"experts\" list")
        data = data["experts"]
    if not isinstance(data, list):
        raise ExpertSetError(f"{source}: expected a list of [layer, expert] pairs")
    return check_experts(data, layers, source)
