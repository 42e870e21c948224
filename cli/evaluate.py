"""`unsafe-experts evaluate --model M`: ASR, refusal, over-refusal and benign log-likelihood of
one model, on an organism's eval_set.json or an evaluation suite."""
from __future__ import annotations

import argparse
from pathlib import Path

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig

from .flags import add_fields, field_values
from .tables import metrics_table


def add_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="ASR, refusal, over-refusal and benign log-likelihood, "
                        "on an organism's eval_set.json or an evaluation suite")
    ev.add_argument("--model", required=True)
    # absent flags stay absent, so EvaluationConfig's defaults apply
    # `--suite` here is the pipeline's evaluation.suite (`train --eval_suite`); one model is
    # evaluated once, so there are no rounds to choose among
    add_fields(ev.add_argument_group("evaluation", argument_default=argparse.SUPPRESS),
               EvaluationConfig, skip=("suite", "rounds"), dest="eval__",
               helps={"eval_set": "evaluate the model on this eval_set.json (from `unsafe-experts "
                                  "organism`), or give --suite"})
    ev.add_argument("--suite", help="evaluate on this suite instead of --eval_set: a suite YAML "
                    "file, an organism's folder (its eval_set.json as a suite), or a bundled suite's name "
                    "(organism: build/organism, built by `make demo`; standard); --eval_max_new_tokens overrides the suite's "
                    "max_new_tokens")
    ev.add_argument("--out", help="write metrics and samples here (JSON)")
    ev.add_argument("--trust_remote_code", action="store_true")
    ev.add_argument("--quiet", action="store_true")


def run(args) -> None:
    from unsafe_experts.artefacts.atomic import write_json_atomic
    from unsafe_experts.evaluation.evaluate import connect, evaluate, evaluation_suite

    from .loading import load_target

    given = field_values(args, EvaluationConfig, "eval__")
    if given.get("eval_set") and args.suite:
        raise ConfigError("give --eval_set (an organism's eval_set.json) or --suite, not both")
    if not given.get("eval_set") and not args.suite:
        raise ConfigError("--eval_set or --suite is required")
    cfg = EvaluationConfig(**given, suite=args.suite).validate()
    suite = evaluation_suite(cfg)  # data and judges checked before the model loads
    endpoint = connect(cfg)  # and the server, when one generates
    model, tokenizer = load_target(args.model, args.trust_remote_code, endpoint)
    result = evaluate(model, tokenizer, suite, cfg, progress=not args.quiet, endpoint=endpoint)
    print(metrics_table(result["metrics"]))
    if result["left_out"]:
        print(f"left out: {', '.join(result['left_out'])} (they need the weights in this "
              "process: evaluate without --endpoint for them)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)
