"""A robustness evaluation: every attack of ATTACKS at every budget, on the repaired model and
(optionally) the unrepaired reference, on the same prompts, through the one evaluation path.

Attacks that change the model (router masks and forcing, top-k, quantisation, fine-tuning) are
scored by `evaluate()` on the suite's seeded sample: ASR per attack family, plain refusal,
benign-in-format refusal and benign log-likelihood, each with n and ci95, plus
`asr_all_families` (pooled). Attacks on the prompt (prefill, GCG) are scored on the plain
harmful requests of the same sample (`asr_plain`). The rest of each set, never evaluated, is
the attacker's own split: its prompts rank experts for the router attacker who does not know
the repaired list, and its answers feed the fine-tuning attacks.

Adding an attack is one entry of ATTACKS: (its budgets, how it runs on one model).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError, ExpertSetError
from ..evaluation.evaluate import EvaluationConfig, evaluate
from ..evaluation.judges import load_judge
from ..evaluation.suites import Item, Suite
from ..models.ablation import load_expert_set, steered
from ..models.architectures import MoELayer, moe_layers
from ..models.modes import eval_mode
from ..stats import proportion, subset
from .budgets import RobustnessConfig
from .durability import changed_top_k, fine_tuning, quantised, top_k_range
from .expert_ranking import rank_experts
from .gcg import GCGConfig
from .prompt_attacks import PREFILLS, gcg_attack, prefill_attack, target_for


@dataclass
class Target:
    """One model under attack: `after` (the repair) or `before` (its reference)."""
    label: str
    model: object
    tokenizer: object
    layers: list[MoELayer] = field(default_factory=list)
    ranking: dict | None = None  # the attacker's expert ranking on this model, made once


@dataclass
class Setup:
    suite: Suite
    evaluation: EvaluationConfig
    config: RobustnessConfig
    run_experts: dict[str, list[tuple[int, int]]]  # "all", "round_1", ... ({} without a run)
    attacker: dict  # "rank_prompts", "benign_pairs", "harmful_pairs"
    plain: list[Item]  # the evaluated plain harmful requests
    judge: Callable  # the plain set's judge


def pooled(figures: list[dict]) -> dict:
    """One share over several sets' answers (each figure's value x n successes)."""
    flags = []
    for m in figures:
        hits = round(m["value"] * m["n"])
        flags += [True] * hits + [False] * (m["n"] - hits)
    return proportion(flags)


def summary(metrics: dict) -> dict:
    """The evaluation's metrics plus two pooled over the attack families: asr_all_families
    (harmful requests answered) and format_refusal_all (benign requests in those formats
    refused; XSTest's plain over_refusal is not among them)."""
    out = dict(metrics)
    asr = [m for k, m in metrics.items() if k.startswith("asr_") and "n" in m]
    formats = [m for k, m in metrics.items() if k.startswith("over_refusal_") and "n" in m]
    if asr:
        out["asr_all_families"] = pooled(asr)
    if formats:
        out["format_refusal_all"] = pooled(formats)
    return out


def _evaluate(setup: Setup, target: Target, model=None) -> dict:
    result = evaluate(model if model is not None else target.model, target.tokenizer, setup.suite,
                      setup.evaluation)
    return summary(result["metrics"])


def _take(pairs: list[tuple[int, int]], budget: int, layers: list[MoELayer]) -> list[tuple[int, int]]:
    """The first `budget` pairs a router attacker can switch off: it skips an expert whose loss
    would leave its layer fewer live experts than the router picks per token."""
    left = {layer.index: layer.num_experts - layer.top_k for layer in layers}
    out = []
    for layer_index, expert in pairs:
        if len(out) == budget:
            break
        if left[layer_index] > 0:
            left[layer_index] -= 1
            out.append((layer_index, expert))
    return out


def _ranking(setup: Setup, target: Target) -> dict:
    if target.ranking is None:
        target.ranking = rank_experts(target.model, target.tokenizer, target.layers,
                                      setup.attacker["rank_prompts"], setup.evaluation.max_new_tokens or 48,
                                      setup.evaluation.batch_size)
    return target.ranking


def _router(off_key: str | None, on_key: str | None):
    """A router attack on the attacker's ranking: switch off the top b of `off_key`'s order,
    force on the top b of `on_key`'s."""
    def run(setup: Setup, target: Target, budgets) -> dict:
        ranking = _ranking(setup, target)
        if not ranking["refusal_first"]:
            reason = (f"no {'compliance' if ranking['compliances'] == 0 else 'refusal'} among the "
                      f"attacker's {ranking['refusals'] + ranking['compliances']} answers to rank by")
            return {b: {"skipped": reason} for b in budgets}
        out = {}
        for b in budgets:
            off = _take(ranking[off_key], b, target.layers) if off_key else []
            on = ranking[on_key][:b] if on_key else []
            with steered(target.model, target.layers, off=off, on=on) as forced:
                out[b] = {**_evaluate(setup, target), "experts_off": off, "experts_forced": forced}
        return out
    return run


def _unmaskable(experts: list[tuple[int, int]], layers: list[MoELayer]) -> str | None:
    """Why a router cannot switch every listed expert off (a layer would keep fewer live
    experts than it routes each token to), or None when it can."""
    for layer in layers:
        listed = sum(1 for index, _ in experts if index == layer.index)
        if layer.num_experts - listed < layer.top_k:
            return (f"the list holds {listed} of layer {layer.index}'s {layer.num_experts} experts; "
                    f"a router that picks {layer.top_k} cannot switch them all off")
    return None


def _known(setup: Setup, target: Target, budgets) -> dict:
    out = {}
    for name in budgets:
        experts = setup.run_experts[name]
        if reason := _unmaskable(experts, target.layers):
            out[name] = {"skipped": reason}
            continue
        with steered(target.model, target.layers, off=experts):
            out[name] = {**_evaluate(setup, target), "experts_off": experts}
    return out


def _prefill(setup: Setup, target: Target, budgets) -> dict:
    result = prefill_attack(target.model, target.tokenizer, setup.plain, setup.judge, budgets,
                            setup.evaluation.max_new_tokens or 48, setup.evaluation.batch_size)
    return {b: {"asr_plain": m} for b, m in result.items()}


def _gcg(setup: Setup, target: Target, budgets) -> dict:
    c = setup.config
    gcg = GCGConfig(suffix_tokens=c.gcg_suffix_tokens, top_k=c.gcg_top_k, candidates=c.gcg_candidates,
                    seed=c.seed)
    result = gcg_attack(target.model, target.tokenizer, setup.plain, setup.judge, budgets, gcg,
                        c.gcg_goals, c.seed, setup.evaluation.max_new_tokens or 48, setup.evaluation.batch_size)
    return {s: {"asr_plain": m} for s, m in result.items()}


def _top_k(setup: Setup, target: Target, budgets) -> dict:
    out = {}
    for delta in budgets:
        k = target.layers[0].top_k + delta
        with changed_top_k(target.model, k):
            out[delta] = {**_evaluate(setup, target), "top_k": k}
    return out


def _quantisation(setup: Setup, target: Target, budgets) -> dict:
    return {kind: _evaluate(setup, target, quantised(target.model, kind)) for kind in budgets}


def _benign_finetune(setup: Setup, target: Target, budgets) -> dict:
    return _finetune(setup, target, setup.attacker["benign_pairs"], budgets, {b: b for b in budgets})


def _harmful_finetune(setup: Setup, target: Target, budgets) -> dict:
    out = {}
    for n in budgets:
        pairs = setup.attacker["harmful_pairs"][:n]
        out.update(_finetune(setup, target, pairs, [setup.config.harmful_steps], {setup.config.harmful_steps: n}))
    return out


def _finetune(setup, target, pairs, steps, label) -> dict:
    c = setup.config
    out = {}
    for step, twin in fine_tuning(target.model, target.tokenizer, pairs, steps, lr=c.finetune_lr,
                                  seed=c.seed):
        out[label[step]] = {**_evaluate(setup, target, twin), "steps": step, "examples": len(pairs)}
    return out


@dataclass(frozen=True)
class Attack:
    description: str
    budgets: Callable[[Setup], list]  # the budget axis, from the config (or the run)
    run: Callable[[Setup, Target, list], dict]  # {budget: metrics} on one model
    needs: tuple[str, ...] = ()  # attacker data it reads ("rank_prompts", ...), or "run"


ATTACKS: dict[str, Attack] = {
    "none": Attack("no attack: the figures on the same prompts", lambda s: ["-"],
                   lambda s, t, b: {"-": _evaluate(s, t)}),
    "router_known": Attack("switch off the experts the run changed (all rounds, each round alone)",
                           lambda s: list(s.run_experts), _known, ("run",)),
    "router_unknown": Attack("switch off the top b experts by the model's own routing on refusals "
                             "minus compliances (attacker's prompts)", lambda s: s.config.router_budgets,
                             _router("refusal_first", None), ("rank_prompts",)),
    "router_steer": Attack("force on the top b experts used most in complied answers (SteerMoE)",
                           lambda s: s.config.router_budgets, _router(None, "compliance_first"),
                           ("rank_prompts",)),
    "router_both": Attack("both: the top b switched off and the top b forced on",
                          lambda s: s.config.router_budgets,
                          _router("refusal_first", "compliance_first"), ("rank_prompts",)),
    "prefill": Attack("the answer begins with an affirmative opening; b openings tried",
                      lambda s: s.config.prefill_budgets, _prefill),
    "gcg": Attack("a GCG suffix optimised per request on the model; ASR vs steps",
                  lambda s: s.config.gcg_steps, _gcg),
    "top_k": Attack("experts per token at inference changed by the delta",
                    lambda s: s.config.top_k_deltas, _top_k),
    "quantisation": Attack("weights cast to bf16 or quantised to int8",
                           lambda s: s.config.quantisations, _quantisation),
    "finetune_benign": Attack("all weights fine-tuned on benign instructions for N steps",
                              lambda s: s.config.finetune_steps, _benign_finetune, ("benign_pairs",)),
    "finetune_harmful": Attack("all weights fine-tuned on N harmful (goal, compliance) pairs",
                               lambda s: s.config.harmful_examples, _harmful_finetune, ("harmful_pairs",)),
}


def check_attacks(names: list[str]) -> list[str]:
    """The attacks to run (all when none named); an unknown name is named in the error."""
    for name in names:
        if name not in ATTACKS:
            raise ConfigError(f"attack {name!r}: unknown; choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names)) or list(ATTACKS)


def attacker_split(suite: Suite, limit: int | None, seed: int) -> dict[str, list[Item]]:
    """Per set, the items the evaluation's seeded sample leaves out: the attacker's own."""
    out = {}
    for s in suite.sets:
        kept = set(subset(range(len(s.items)), limit, seed))
        out[s.name + "/" + s.kind] = [x for i, x in enumerate(s.items) if i not in kept]
    return out


def run_experts(run_dir, layers) -> dict[str, list[tuple[int, int]]]:
    """{"all": every expert any round changed, "round_R": round R's} of a run folder."""
    meta = Path(run_dir) / "training_metadata.json"
    try:
        data = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError) as e:
        raise ExpertSetError(f"{meta}: not readable as JSON ({e})") from None
    rounds = data.get("identified_experts_per_round") if isinstance(data, dict) else None
    if not rounds or not isinstance(rounds, dict):
        raise ExpertSetError(f"{run_dir}: no expert list (no training_metadata.json with a completed round)")
    bad = [r for r in rounds if not str(r).isdigit()]
    if bad:
        raise ExpertSetError(f"{meta}: round {bad[0]!r} is not a round number")
    per_round = {f"round_{r}": load_expert_set(run_dir, int(r), layers) for r in sorted(rounds, key=int)}
    empty = [name for name, experts in per_round.items() if not experts]
    if empty:
        raise ExpertSetError(f"{meta}: {empty[0]} lists no expert; there is nothing to switch off")
    union = list(dict.fromkeys(p for experts in per_round.values() for p in experts))
    return {"all": union, **per_round}


def _shape(model, layers: list[MoELayer]) -> tuple:
    return model.config.model_type, [(x.index, x.num_experts, x.top_k) for x in layers]


def check_reference(after: Target, before: Target) -> None:
    """The reference must be the repaired model's architecture: the same expert list names the
    same experts in both, and their figures compare."""
    a, b = _shape(after.model, after.layers), _shape(before.model, before.layers)
    if a != b:
        raise ConfigError(f"reference model: {b[0]} with MoE layers (index, experts, top-k) {b[1]} "
                          f"is not the repaired model's architecture ({a[0]}, {a[1]})")


def setup(suite: Suite, evaluation: EvaluationConfig, config: RobustnessConfig, names: list[str],
          layers: list[MoELayer], run_dir=None) -> Setup:
    """Everything checked before any attack runs: the attack names, budgets against the model,
    the run's expert list, the attacker's split."""
    config.validate()
    evaluation = replace(evaluation, limit=config.limit, limit_seed=config.limit_seed).validate()
    total = sum(layer.num_experts for layer in layers)
    if max(config.router_budgets) > total:
        raise ConfigError(f"router_budgets: {max(config.router_budgets)} is more than the model's "
                          f"{total} experts")
    needs = {n for name in names for n in ATTACKS[name].needs}
    if "run" in needs and not run_dir:
        raise ConfigError("router_known needs the run's folder (--run_dir) for its expert list")
    experts = run_experts(run_dir, layers) if run_dir else {}
    split = attacker_split(suite, config.limit, config.limit_seed)
    harmful = [x for s in suite.sets if s.kind == "harmful" for x in split[s.name + "/harmful"]]
    plain_set = next((s for s in suite.sets if s.kind == "harmful" and s.name == "plain"),
                     next((s for s in suite.sets if s.kind == "harmful"), None))
    if plain_set is None:
        raise ConfigError(f"suite {suite.name}: no harmful set to attack")
    attacker = {
        "rank_prompts": [x.messages for x in subset(harmful, config.rank_prompts, config.seed)],
        "benign_pairs": [(x.messages, x.answer) for s in suite.sets if s.kind == "reference"
                         for x in split[s.name + "/reference"] if x.answer],
        "harmful_pairs": [(x.messages, target_for(x.request)) for x in split[plain_set.name + "/harmful"]],
    }
    for need in needs - {"run"}:
        if not attacker[need]:
            raise ConfigError(f"the attacker's split has no {need.replace('_', ' ')}: the evaluation "
                              f"sample (limit {config.limit}) takes every prompt of the sets; lower limit")
    for delta in config.top_k_deltas if "top_k" in names else []:
        if layers[0].top_k + delta not in top_k_range(layers):
            raise ConfigError(f"top_k_deltas: {delta:+d} gives top-k {layers[0].top_k + delta}; a "
                              f"router picks 1 to {top_k_range(layers)[-1]} experts")
    if "prefill" in names and max(config.prefill_budgets) > len(PREFILLS):
        raise ConfigError(f"prefill_budgets: {max(config.prefill_budgets)} is more than the "
                          f"{len(PREFILLS)} openings there are")
    evaluated = subset(plain_set.items, config.limit, config.limit_seed)
    if "gcg" in names and config.gcg_goals > len(evaluated):
        raise ConfigError(f"gcg_goals: {config.gcg_goals} is more than the {len(evaluated)} plain "
                          "requests evaluated (robustness limit)")
    if max(config.harmful_examples) > len(attacker["harmful_pairs"]) and "harmful_pairs" in needs:
        raise ConfigError(f"harmful_examples: {max(config.harmful_examples)} is more than the "
                          f"{len(attacker['harmful_pairs'])} goals of the attacker's split")
    return Setup(suite, evaluation, config, experts, attacker, evaluated,
                 load_judge(plain_set.judge, evaluation.batch_size))


def run_robustness(targets: list[Target], setup_: Setup, names: list[str], progress: bool = True,
                   on_attack: Callable[[str, dict], None] | None = None) -> dict:
    """{"setup": what ran, "attacks": {attack: {budget: {label: metrics}}}} with the label of
    every target ("after", "before"); `on_attack(name, partial result)` after each attack, so a
    caller can write what is done before the next begins."""
    for t in targets:
        t.layers = t.layers or moe_layers(t.model)
    result = {"setup": {"config": setup_.config.as_dict(), "attacks": names,
                        "limit": setup_.config.limit, "suite": setup_.suite.name,
                        "attacker": {k: len(v) for k, v in setup_.attacker.items()},
                        "run_experts": setup_.run_experts, "seconds": {}},
              "attacks": {}}
    for name in tqdm(names, desc="robustness", disable=not progress):
        attack = ATTACKS[name]
        budgets = attack.budgets(setup_)
        table = {str(b): {} for b in budgets}
        for t in targets:
            start = time.perf_counter()
            with eval_mode(t.model):
                for b, metrics in attack.run(setup_, t, budgets).items():
                    table[str(b)][t.label] = metrics
            result["setup"]["seconds"][f"{name}/{t.label}"] = round(time.perf_counter() - start, 1)
        result["attacks"][name] = table
        if on_attack:
            on_attack(name, result)
    return result
