"""The routing-share variant (issue 25): the gradient score, with selection restricted to the
experts the benign requests in attack formats route little to.

The causal check found that the gradient picks experts whose loss carries refusal wherever it is
cheap to insert, including experts that process the attack's format for every request. An
expert the router sends a large share of the benign-in-format tokens to serves those requests;
repairing it teaches the model to refuse the format. Here such an expert ranks below every
other, so it is picked only when fewer than k experts are under the limit.
"""
from __future__ import annotations

import torch

from .routing import routing_stats


def benign_share(model, layers, batches) -> torch.Tensor:
    """[layers, experts]: the share of the batches' real tokens (attention mask; prompt and
    answer alike, since the format lives in the prompt) whose router top-k includes the expert.
    Each layer's shares sum to its top-k."""
    freq, _ = routing_stats(model, layers, [{**b, "content_mask": b["attention_mask"]} for b in batches])
    return freq


def below_share_limit(scores: torch.Tensor, share: torch.Tensor,
                      limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores with every expert whose share is over `limit` x its layer's uniform share (the
    layer's shares summed, i.e. its top-k, over its experts) moved below every expert under it,
    keeping the order within each side; the [layers, experts] mask of the experts under it)."""
    share = share.to(scores.device).double()
    eligible = share <= limit * share.sum(-1, keepdim=True) / share.shape[-1]
    if eligible.all() or not eligible.any():
        return scores.clone(), eligible
    drop = scores.max() - scores.min() + 1  # past the whole range: every demoted one ranks last
    return torch.where(eligible, scores, scores - drop), eligible
