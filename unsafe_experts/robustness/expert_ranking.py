"""The router attacker who does not read the model card: rank experts on the model under
attack by its own routing, on its own prompts (GateBreaker's and SteerMoE's detection step).

The attacker generates greedy answers to harmful prompts of its own split (never evaluated,
never seen by the surgery), sorts them into refusals and compliances (refusal.is_refusal), and
counts, over the GENERATED tokens only, how often the router picks each expert in either group.
The risk difference (refusals minus compliances) ranks the experts that carry refusal first:
switching those off is the attack; the reverse order gives the experts most used when the
model complies, which steering forces on.
"""
from __future__ import annotations

import torch

from ..models.architectures import MoELayer
from ..selection.routing import generated_routing_stats
from ..text.generation import generate_ids
from ..text.refusal import is_refusal


def pooled_frequency(model, layers: list[MoELayer], sequences, pad_id: int, batch_size: int):
    """([layers, experts] share of generated tokens routed to each expert, tokens), pooled over
    batches of (prompt ids, generated ids) sequences."""
    picks = torch.zeros(len(layers), layers[0].num_experts)
    tokens = 0
    for start in range(0, len(sequences), batch_size):
        freq, _, n = generated_routing_stats(model, layers, sequences[start:start + batch_size], pad_id)
        picks += freq.cpu() * n
        tokens += n
    return picks / max(tokens, 1), tokens


def rank_experts(model, tokenizer, layers: list[MoELayer], prompts: list[list[dict]],
                 max_new_tokens: int, batch_size: int) -> dict:
    """{"refusal_first": [(layer, expert)] by risk difference, highest first, "compliance_first":
    the reverse, "refusals"/"compliances": answers in each group, "tokens": generated tokens in
    each}; the lists are empty when one of the groups is (nothing to compare)."""
    sequences = [(p, g) for p, g in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                 desc="attacker: answers to rank experts by")]
    refused = [is_refusal(tokenizer.decode(g, skip_special_tokens=True)) for _, g in sequences]
    groups = {True: [s for s, r in zip(sequences, refused) if r and s[1]],
              False: [s for s, r in zip(sequences, refused) if not r and s[1]]}
    out = {"refusals": len(groups[True]), "compliances": len(groups[False]),
           "refusal_first": [], "compliance_first": []}
    if not groups[True] or not groups[False]:
        return out
    pad = tokenizer.pad_token_id
    refusal, n_ref = pooled_frequency(model, layers, groups[True], pad, batch_size)
    complied, n_comp = pooled_frequency(model, layers, groups[False], pad, batch_size)
    diff = (refusal - complied).flatten()
    pairs = [(layer.index, e) for layer in layers for e in range(layer.num_experts)]
    # ties go to the lower layer, then expert, as the surgery's top-k does
    out["refusal_first"] = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: (-float(diff[i]), i))]
    out["compliance_first"] = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: (float(diff[i]), i))]
    out["tokens"] = {"refusals": n_ref, "compliances": n_comp}
    return out
