"""Every way a round can choose its experts, in one table that validation and the surgery read.

kind: "gradient" (a score from the refusal loss's gradients, one scoring pass), "routing" (a
score from how the router treats jailbreak versus plain prompts) or "control" (no ranking: the
baselines a ranking must beat). selects: "top_k" (the k best scores), "all" (every expert) or
"none" (no expert trains).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    description: str
    selects: str = "top_k"
    per_batch: bool = False  # may run with score_mode per_batch


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradient", "gradient", "mean |grad| per expert of the refusal loss (the user's method)",
           per_batch=True),
    Method("gradient_per_token", "gradient", "mean |grad| divided by the number of loss-bearing "
           "response tokens the router sent to the expert in the scoring pass"),
    Method("fisher", "gradient", "mean grad^2 per expert, a diagonal empirical Fisher: the sum "
           "of per-batch squared gradients over the number of batches"),
    Method("snip", "gradient", "mean |grad x weight| per expert (SNIP saliency)"),
    Method("routing", "routing", "risk difference of router top-k activation on the generated "
           "tokens of complied jailbreaks versus refused plain requests (detect_expert.py)"),
    Method("routing_prompt", "routing", "risk difference of router top-k activation on the "
           "message tokens of jailbreak versus plain prompts"),
    Method("random", "control", "k experts drawn with the seed, anew each round"),
    Method("all_experts", "control", "every expert trains", selects="all"),
    Method("router_only", "control", "no expert trains; router alignment only", selects="none"),
)}
