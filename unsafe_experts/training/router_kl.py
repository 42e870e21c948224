"""Routing distributions per MoE layer and the KL that aligns jailbreak routing to plain routing.

Per layer, the distribution the architecture routes by, over a prompt's message tokens (not padding,
not template scaffolding), then averaged over the batch: one distribution over experts per
layer. Softmax routers (OLMoE, Qwen, Mixtral, PhiMoE, GPT-OSS, Granite): the softmax of the
token-mean of the router logits, as the research code did. Sigmoid routers with a correction
bias (DeepSeek-V3, which picks experts by sigmoid(logit) + bias): the token-mean of those
choice scores, normalised over the experts; a softmax of its logits is not what it routes by.
The KL is the plain sum over experts, p * (log p - log q) (the research code's
`kl_div(reduction="batchmean")` on 1-D tensors divided it by the number of experts), then the
mean over layers.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..models.architectures import MoELayer
from ..models.sharding import is_sharded

KL_TYPES = ("forward", "reverse", "symmetric")


@contextmanager
def captured_router_outputs(layers: list[MoELayer]):
    """Collects each router's output (logits [tokens, E], weights, expert indices [tokens, k])
    during a forward, keyed by MoE layer position; hooks are removed on exit."""
    captured: dict[int, tuple] = {}

    def hook_for(i):
        def hook(_module, _inputs, output):
            captured[i] = output if isinstance(output, tuple) else (output,)
        return hook

    handles = [layer.router.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def route(model, batch: dict[str, torch.Tensor]):
    """A forward for the routing only: the decoder alone, without the LM head. Returns a zero
    to add to a loss on the router outputs. A sharded model runs whole, because fully_shard
    gathers weights in the forwards of the modules it wraps, and its zero hangs on the logits:
    fully_shard gathers a layer's weights for backward only when a gradient reaches the layer's
    output, which a loss on router outputs alone never sends."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    if not is_sharded(model):
        model.model(**inputs)
        return 0.0
    return model(**inputs).logits[..., :1].sum() * 0


def choice_biases(layers: list[MoELayer]) -> dict[int, torch.Tensor]:
    """Position -> correction bias, for the layers whose router picks by sigmoid + bias."""
    return {i: layer.router.e_score_correction_bias for i, layer in enumerate(layers)
            if getattr(layer.router, "e_score_correction_bias", None) is not None}


def routing_distribution(captured: dict[int, tuple], mask: torch.Tensor,
                         biases: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """[layers, experts]: per prompt the routing distribution over its masked tokens (softmax of
    the mean logit; for a layer in `biases`, the normalised mean of sigmoid(logit) + bias),
    averaged over the batch."""
    batch, seq = mask.shape
    weights = mask.float().unsqueeze(-1)
    tokens = weights.sum(1).clamp_min(1.0)
    dists = []
    for i in sorted(captured):
        logits = captured[i][0].float().view(batch, seq, -1)
        if biases and i in biases:
            # bias-corrected scores can dip below 0; the choice only ranks them, so clamp
            choice = (logits.sigmoid() + biases[i].float()).clamp_min(1e-6)
            mean = (choice * weights).sum(1) / tokens
            dists.append((mean / mean.sum(-1, keepdim=True)).mean(0))
        else:
            dists.append(((logits * weights).sum(1) / tokens).softmax(-1).mean(0))
    return torch.stack(dists)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim."""
    p, q = p.clamp_min(1e-12), q.clamp_min(1e-12)
    return (p * (p.log() - q.log())).sum(-1)


def router_kl(safe: torch.Tensor, unsafe: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Mean over layers of forward KL(safe||unsafe), reverse KL(unsafe||safe) or their mean."""
    if kl_type == "forward":
        per_layer = kl(safe, unsafe)
    elif kl_type == "reverse":
        per_layer = kl(unsafe, safe)
    elif kl_type == "symmetric":
        per_layer = (kl(safe, unsafe) + kl(unsafe, safe)) / 2
    else:
        raise ValueError(f"unknown kl_type {kl_type!r}; choose from {KL_TYPES}")
    return per_layer.mean()
