"""`unsafe-experts ablate`: evaluate a model with given experts switched off (their router
logits at -inf before top-k), to ask whether a method's experts are causally needed for the
jailbreak and whether they also carry benign capability."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig

from .flags import add_fields
from .loading import ENDPOINT_FIELDS, evaluation_config, load_model
from .tables import evaluation_table


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="evaluate with experts switched off (causal check)")
    p.add_argument("--model", required=True, help="the model to evaluate (usually the unrepaired one)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experts", help="the experts to switch off: a JSON file, or the JSON itself "
                       "(e.g. '[[0, 1], [3, 7]]'); either a list of [layer, expert] pairs or "
                       "{\"experts\": [...]}")
    which.add_argument("--run", help="a run's output_dir: ablate the experts of one of its rounds")
    p.add_argument("--round", type=int, help="with --run: which round (default: the last)")
    p.add_argument("--random", type=int, metavar="SEED",
                   help="instead, as many experts drawn at random with this seed (the control)")
    p.add_argument("--with_baseline", action="store_true", help="also evaluate without ablation")
    # no --endpoint: the ablated weights exist in this process only; no --eval_rounds: one
    # model is evaluated, with the experts off (and, with --with_baseline, on)
    add_fields(p.add_argument_group("evaluation", argument_default=argparse.SUPPRESS),
               EvaluationConfig, skip=(*ENDPOINT_FIELDS, "suite", "rounds"), dest="eval__",
               helps={"eval_set": "evaluate on this eval_set.json (from `unsafe-experts organism`) "
                                  "with the experts switched off (required)"})
    p.add_argument("--out", help="write experts, metrics and samples here (JSON)")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--quiet", action="store_true")


def random_like(experts: list, layers, seed: int) -> list[tuple[int, int]]:
    """As many (layer, expert) pairs, drawn uniformly with the seed, leaving every layer at
    least its router's top-k live experts."""
    pool = [(layer.index, e) for layer in layers for e in range(layer.num_experts)]
    room = {layer.index: layer.num_experts - layer.top_k for layer in layers}
    rng, drawn = random.Random(seed), []
    for pair in rng.sample(pool, len(pool)):
        if len(drawn) == len(experts):
            break
        if room[pair[0]] > 0:
            drawn.append(pair)
            room[pair[0]] -= 1
    return sorted(drawn)


def run(args) -> None:
    from unsafe_experts.artefacts.atomic import write_json_atomic
    from unsafe_experts.artefacts.run_metadata import RunRecord, expert_key
    from unsafe_experts.evaluation.evaluate import evaluate, evaluation_suite
    from unsafe_experts.models.ablation import ablated, load_expert_set
    from unsafe_experts.models.architectures import moe_layers

    cfg = evaluation_config(args)
    if args.round is not None and not args.run:
        raise ConfigError("--round goes with --run")
    suite = evaluation_suite(cfg)
    # read (and shape-checked) before the model loads, which takes minutes on a real one; the
    # pairs are checked against its layers once it is here
    load_expert_set(args.experts or args.run, args.round)
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    layers = moe_layers(model)
    experts = load_expert_set(args.experts or args.run, args.round, layers)
    source = {"model": args.model, "experts": args.experts, "run": args.run, "round": args.round}
    if args.run:
        params = RunRecord.load(args.run).data["parameters"]
        source.update(method=params["method"], seed=params["seed"])
    if args.random is not None:
        experts = random_like(experts, layers, args.random)
        source.update(method="random", seed=args.random)
    results = {}
    if args.with_baseline:
        results["baseline"] = evaluate(model, tokenizer, suite, cfg, progress=not args.quiet)
    with ablated(model, layers, experts):
        results["ablated"] = evaluate(model, tokenizer, suite, cfg, progress=not args.quiet)
    print(f"ablated {len(experts)} experts: " + " ".join(expert_key(l, e) for l, e in experts))
    print(evaluation_table({k: v["metrics"] for k, v in results.items()}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"experts": [list(x) for x in experts], "source": source,
                                     **results})
