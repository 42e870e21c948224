"""The routing-based baseline: which experts jailbreak prompts use more than plain prompts.

Per (layer, expert): the share of message tokens whose router top-k includes the expert, on
the jailbreak prompts (`all_prompt`) and on the same goals asked plainly; the unsafe score is
the difference (a risk difference, as in SteerMoE, arXiv 2509.09660). The router's own
choices are used (its returned expert indices), so families with grouped or biased routing
(DeepSeek-V3) are counted as they really route.
"""
from __future__ import annotations

import torch

from .adapters import MoELayer
from .router_kl import captured_router_outputs, route


@torch.no_grad()
def routing_stats(model, layers: list[MoELayer], batches) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers, experts] selection frequency, [layers, experts] mean routing probability)
    over the message tokens of `batches` (router prompts with a content mask)."""
    num_experts = layers[0].num_experts
    picks = torch.zeros(len(layers), num_experts, device=model.device)
    probs = torch.zeros_like(picks)
    tokens = torch.zeros((), device=model.device)
    with captured_router_outputs(layers) as captured:
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            route(model, batch)
            mask = batch["content_mask"].flatten().float()
            tokens += mask.sum()
            for i in range(len(layers)):
                logits, indices = captured[i][0].float(), captured[i][-1]
                chosen = torch.zeros_like(logits).scatter_(1, indices.long(), 1.0)
                picks[i] += (chosen * mask[:, None]).sum(0)
                probs[i] += (logits.softmax(-1) * mask[:, None]).sum(0)
    return picks / tokens, probs / tokens


def routing_scores(model, layers, safe_batches, unsafe_batches) -> dict[str, torch.Tensor]:
    """Risk difference of selection frequency (jailbreak minus plain), and the parts."""
    safe_freq, safe_prob = routing_stats(model, layers, safe_batches)
    unsafe_freq, unsafe_prob = routing_stats(model, layers, unsafe_batches)
    return {"score": unsafe_freq - safe_freq, "freq_plain": safe_freq, "freq_jailbreak": unsafe_freq,
            "weight_plain": safe_prob, "weight_jailbreak": unsafe_prob}
