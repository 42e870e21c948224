"""The routing-based baselines: which experts the model uses more on jailbreaks than on plain
requests. Both score a (layer, expert) by a risk difference (SteerMoE, arXiv 2509.09660): the
share of tokens whose router top-k includes the expert on jailbreak prompts (`all_prompt`)
minus that share on the same goals asked plainly.

- `routing` (the research code's method): generate a greedy response (routing_max_new_tokens)
  to each jailbreak prompt and to its goal asked plainly; keep only the pairs where the model
  complies with the jailbreak and refuses the plain request (refusal.is_refusal; none left is
  an error); route prompt + response again in one teacher-forced forward and count the
  GENERATED tokens only; the risk difference per batch of pairs, then the mean over batches.
- `routing_prompt`: no generation; count the prompts' message tokens (no template
  scaffolding, no padding) of every record, pooled over all tokens.

`routing` is the research code's method (JACKPURCELL/RASAMoE-public, detect_expert.py:
process_mixed_batches, calculate_risk_diff_per_batch, aggregate_batch_risk_diffs): batches are
formed from consecutive records (batch_size pairs, as its 8-pair batches) before filtering, a
batch left with no pair is skipped, and within a batch the generated tokens of all its
responses are pooled. Deviations: it samples at temperature 1 with a seed where we decode
greedily (reproducible without a seed); it judges refusals with GPT-4o-mini where we use
refusal.is_refusal; vLLM never feeds back the last sampled token, so it routes one token fewer
per response than we do; both render Qwen3 prompts with enable_thinking=False (chat.py, as
every phase does); and responses are generated once per run, on the model before
surgery (kept in output_dir for a resumed run), with each round re-measuring their routing on
the current model - the research code detects once, and after a repair the jailbreaks would
no longer be complied with, leaving no pair to score.

Both count the router's own choices (its returned expert indices), where the research code
takes softmax then top-k of the router logits. Softmax keeps the order, so for every architecture
that picks its top-k by logit (OLMoE, Qwen2/3-MoE, Mixtral, PhiMoE, GPT-OSS, Granite) the two
are the same experts; DeepSeek-V3 picks by bias-corrected sigmoid scores within groups, and
there ours counts the experts that really process the token, which is what a risk difference
of activation is meant to measure.
"""
from __future__ import annotations

import torch

from ..models.architectures import MoELayer
from ..records import DatasetError
from ..text.refusal import is_refusal
from ..training.router_kl import captured_router_outputs, route


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


def keep_pairs(jailbreak_texts: list[str], plain_texts: list[str]) -> tuple[list[bool], dict]:
    """Which (jailbreak, plain) pairs show the behaviour to explain: the model complies with the
    jailbreak and refuses the plain request. An error when no pair does."""
    jail_refused = [is_refusal(t) for t in jailbreak_texts]
    plain_refused = [is_refusal(t) for t in plain_texts]
    kept = [p and not j for j, p in zip(jail_refused, plain_refused)]
    summary = {"total": len(kept), "kept": sum(kept), "dropped": len(kept) - sum(kept),
               "jailbreak_refused": sum(jail_refused),
               "plain_not_refused": len(kept) - sum(plain_refused)}
    if not any(kept):
        raise DatasetError(
            f"routing: none of the {len(kept)} (jailbreak, plain) pairs shows a complied jailbreak "
            f"and a refused plain request ({summary['jailbreak_refused']} jailbreak responses were "
            f"refusals, {summary['plain_not_refused']} plain responses were not), so there are no "
            "generated tokens to compare; use more records, a larger routing_max_new_tokens, or "
            "method routing_prompt")
    return kept, summary


@torch.no_grad()
def generated_routing_stats(model, layers: list[MoELayer], sequences, pad_id: int):
    """([layers, experts] selection frequency, mean routing probability, tokens) over the
    generated tokens of (prompt ids, generated ids) sequences, pooled. One forward of prompt +
    response, right-padded so every real token keeps its unpadded position and attention."""
    width = max(len(p) + len(g) for p, g in sequences)
    rows, attention, generated = [], [], []
    for prompt, gen in sequences:
        fill = width - len(prompt) - len(gen)
        rows.append(prompt + gen + [pad_id] * fill)
        attention.append([1] * (len(prompt) + len(gen)) + [0] * fill)
        generated.append([0] * len(prompt) + [1] * len(gen) + [0] * fill)
    batch = {"input_ids": torch.tensor(rows, device=model.device),
             "attention_mask": torch.tensor(attention, device=model.device)}
    mask = torch.tensor(generated, device=model.device).flatten().bool()
    picks = torch.zeros(len(layers), layers[0].num_experts, device=model.device)
    probs = torch.zeros_like(picks)
    with captured_router_outputs(layers) as captured:
        route(model, batch)
        for i in range(len(layers)):
            logits, indices = captured[i][0].float()[mask], captured[i][-1][mask]
            picks[i] = torch.bincount(indices.flatten().long(), minlength=picks.shape[1]).float()
            probs[i] = logits.softmax(-1).sum(0)
    tokens = int(mask.sum())
    return picks / max(tokens, 1), probs / max(tokens, 1), tokens


def generated_routing_scores(model, layers, jailbreak, plain, kept: list[bool], batch_size: int,
                             pad_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Per batch of consecutive pairs (filtered afterwards, as the research code does), the
    risk difference over generated tokens, jailbreak minus plain; then the mean over batches
    that kept a pair. `jailbreak` and `plain`: (prompt ids, generated ids) per record."""
    parts = {k: [] for k in ("freq_jailbreak", "freq_plain", "weight_jailbreak", "weight_plain")}
    tokens = {"jailbreak": 0, "plain": 0}
    for start in range(0, len(kept), batch_size):
        chosen = [i for i in range(start, min(start + batch_size, len(kept))) if kept[i]]
        if not chosen:
            continue
        for side, seqs in (("jailbreak", jailbreak), ("plain", plain)):
            freq, prob, n = generated_routing_stats(model, layers, [seqs[i] for i in chosen], pad_id)
            parts[f"freq_{side}"].append(freq)
            parts[f"weight_{side}"].append(prob)
            tokens[side] += n
    means = {k: torch.stack(v).mean(0) for k, v in parts.items()}
    means["score"] = means["freq_jailbreak"] - means["freq_plain"]
    return means, {"batches": len(parts["freq_plain"]), "generated_tokens": tokens}
