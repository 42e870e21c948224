"""The contrastive score (issue 25): an expert's share of the gradient of refusing jailbreaks,
less its share of the gradient of answering benign requests in the same attack formats.

The plain gradient score is large wherever refusal is cheap to insert, including experts that
carry the attack's format for every request, benign or not; repairing those teaches the model
to refuse the format. Subtracting the benign-in-format signal asks, per expert, whether it
serves the harmful requests more than the benign ones dressed the same way.
"""
from __future__ import annotations

import random

import torch


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean over every expert (mean 1), so that two passes with other
    losses and token counts are on one scale; all zeros stay zeros."""
    mean = scores.double().mean()
    return (scores / mean).to(scores.dtype) if mean > 0 else torch.zeros_like(scores)


def contrast(harm: torch.Tensor, benign: torch.Tensor, weight: float) -> torch.Tensor:
    """[layers, experts]: normalised(harm) - weight * normalised(benign). weight 0 ranks as
    the plain gradient score does; larger weights demote experts the benign requests need."""
    return normalised(harm) - weight * normalised(benign.to(harm.device))


def benign_in_format_sample(prompts: list, n: int, seed: int) -> list:
    """n of the benign-in-format prompts (the retention file's contrastive section), a seeded
    draw; all of them when there are fewer."""
    return random.Random(seed).sample(prompts, min(n, len(prompts)))
