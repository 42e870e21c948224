"""Every way a round can choose its experts, in one table that validation, the surgery, the
scoring pass and the comparison read: a method's behaviour is its row, so adding one is a row
here (plus a scorer or a reduction, when it needs a new one), with no name checked elsewhere.

kind: "gradient" (a score from the refusal loss's gradients, one scoring pass), "routing" (a
score from how the router treats jailbreak versus plain prompts) or "control" (no ranking: the
baselines a ranking must beat). selects: "top_k" (the k best scores), "all" (every expert) or
"none" (no expert trains). scorer: the surgery's way to score (Surgery.SCORERS): "gradients"
(score_pass, shaped by the gradient fields below), "contrastive_gradients" (two such passes,
jailbreak refusals and benign requests in attack formats answered as before, contrasted:
contrastive.py), "share_limited_gradients" (one such pass, the experts the benign requests in
attack formats route much to ranked last: share_limit.py), "generated_routing",
"prompt_routing" or "seeded_draw" (random scores, seeded per round; the controls that select all
or none record them too, ranking nothing). trains:
"experts" (the selected experts' rows, the method this project studies) or "all_weights"
(every weight of the model: the dense baseline a local repair is measured against).
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
    scorer: str = "gradients"
    # gradient methods: the per-tensor reduction (a key of scoring.REDUCERS) summed per expert
    reduction: str | None = None
    # the mean over batches of each batch's own squared gradient (with reduction "sq"): a square
    # of the summed gradient is not the sum of the squares, so exact mode reduces after every
    # batch and offloading (which keeps only the sum) gives way to streaming
    squares_each_batch: bool = False
    # the scores divided by the loss-bearing response tokens the router sent to each expert
    per_routed_token: bool = False
    trains: str = "experts"
    # reads the benign-in-format prompts (the retention file's contrastive section)
    needs_benign_in_format: bool = False
    # the surgery settings (TrainConfig fields) that change this method's picks beyond k: the
    # comparison keeps runs at other values of them apart (its `setting` column)
    parameters: tuple[str, ...] = ()

    @property
    def from_gradients(self) -> bool:
        return self.kind == "gradient"

    @property
    def ranks(self) -> bool:
        """Whether k varies the method (a curve over k), not a fixed reference line."""
        return self.selects == "top_k"

    @property
    def trains_experts(self) -> bool:
        return self.selects != "none"

    @property
    def trains_all_weights(self) -> bool:
        return self.trains == "all_weights"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradient", "gradient", "mean |grad| per expert of the refusal loss (the user's method)",
           per_batch=True, reduction="l1"),
    Method("gradient_per_token", "gradient", "mean |grad| divided by the number of loss-bearing "
           "response tokens the router sent to the expert in the scoring pass", reduction="l1",
           per_routed_token=True),
    Method("fisher", "gradient", "mean grad^2 per expert, a diagonal empirical Fisher: the sum "
           "of per-batch squared gradients over the number of batches", reduction="sq",
           squares_each_batch=True),
    Method("snip", "gradient", "mean |grad x weight| per expert (SNIP saliency)",
           reduction="l1_times_weight"),
    Method("contrastive", "gradient", "mean |grad| of refusing the jailbreaks over its mean, minus "
           "--contrast_weight x the same of answering benign requests in attack formats (the "
           "model's own answers): experts the benign requests need rank lower", reduction="l1",
           scorer="contrastive_gradients", needs_benign_in_format=True, parameters=("contrast_weight",)),
    Method("gradient_low_share", "gradient", "mean |grad| per expert as gradient, with every expert "
           "whose routing share of the benign-in-format requests' tokens is over --share_limit x "
           "the uniform share ranked below the rest (share_limit.py)", reduction="l1",
           scorer="share_limited_gradients", needs_benign_in_format=True, parameters=("share_limit",)),
    Method("routing", "routing", "risk difference of router top-k activation on the generated "
           "tokens of complied jailbreaks versus refused plain requests (detect_expert.py)",
           scorer="generated_routing"),
    Method("routing_prompt", "routing", "risk difference of router top-k activation on the "
           "message tokens of jailbreak versus plain prompts", scorer="prompt_routing"),
    Method("random", "control", "k experts drawn with the seed, anew each round", scorer="seeded_draw"),
    Method("all_experts", "control", "every expert trains", selects="all", scorer="seeded_draw"),
    Method("full_param", "control", "every weight trains, attention, embeddings, norms and routers "
           "included (RASA's --full_param_training): the dense repair a local one is measured "
           "against", selects="all", scorer="seeded_draw", trains="all_weights"),
    Method("router_only", "control", "no expert trains; router alignment only", selects="none",
           scorer="seeded_draw"),
)}

# the comparison's headline, tested paired on the seeds both ran and overlapped round by round:
# the user's gradient score against the routing detector it is meant to replace
PAIRED = ("gradient", "routing")


def trains_experts(name: str) -> bool:
    """Whether a run of this method trained experts; a name not in the table (an ablation
    file's source, a retired method) counts as one that did."""
    return name not in METHODS or METHODS[name].trains_experts
