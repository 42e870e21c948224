"""The commands besides `train`: organism, evaluate, validate, compare, serve, report, materialize
and the offline test inputs (tiny-model, flip-dataset)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from unsafe_experts.config import ConfigError
from unsafe_experts.evaluation.evaluate import EvaluationConfig

from .flags import add_fields, field_values
from .tables import evaluation_table, metrics_table


def add_parsers(sub) -> dict:
    """Adds every command's parser; returns command -> handler."""
    tiny = sub.add_parser("tiny-model", help="build a tiny random MoE + tokenizer offline")
    tiny.add_argument("out")
    # --family: the flag's first name, kept for the scripts and docs that use it
    tiny.add_argument("--architecture", "--family", dest="architecture", default="olmoe",
                      help="MoE architecture, the model_type of a transformers config")
    tiny.add_argument("--seed", type=int, default=0)
    flip = sub.add_parser("flip-dataset", help="FlipAttack-style records from AdvBench goals")
    flip.add_argument("out")
    flip.add_argument("--mode", default="chars", choices=("words", "chars", "sentence"))
    flip.add_argument("--n", type=int, default=None, help="first N goals (default all 520)")
    validate = sub.add_parser("validate", help="check jailbreak datasets; every bad record is listed")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--metrics", help="write record and problem counts here (JSON, for DVC)")
    organism = sub.add_parser("organism", help="build the jailbroken demo MoE and its data offline")
    organism.add_argument("out")
    organism.add_argument("--small", action="store_true", help="the test-sized organism")
    organism.add_argument("--seed", type=int, default=None,
                          help="organism seed (default 0, or the params file's; given, it overrides that)")
    organism.add_argument("--params", help="take the `organism` section of this params.yaml")
    organism.add_argument("--quiet", action="store_true")
    ev = sub.add_parser("evaluate", help="ASR, refusal, over-refusal and benign log-likelihood, "
                        "on an organism's eval_set.json or an evaluation suite")
    ev.add_argument("--model", required=True)
    # absent flags stay absent, so EvaluationConfig's defaults apply
    # `--suite` here is the pipeline's evaluation.suite (`train --eval_suite`)
    add_fields(ev.add_argument_group("evaluation", argument_default=argparse.SUPPRESS),
               EvaluationConfig, skip=("suite",), dest="eval__")
    ev.add_argument("--suite", help="evaluate on this suite instead of --eval_set: a suite YAML "
                    "file, an organism's folder (its eval_set.json as a suite), or a bundled suite's name "
                    "(organism: build/organism, built by `make demo`; standard); --eval_max_new_tokens overrides the suite's "
                    "max_new_tokens")
    ev.add_argument("--out", help="write metrics and samples here (JSON)")
    ev.add_argument("--trust_remote_code", action="store_true")
    ev.add_argument("--quiet", action="store_true")
    compare = sub.add_parser("compare", help="one table of methods, k and seeds from MLflow runs")
    compare.add_argument("--params", help="take the experiment and the runs from this params.yaml")
    compare.add_argument("--experiment", help="MLflow experiment (default: unsafe-experts)")
    compare.add_argument("--out", default="metrics/comparison.csv")
    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment: the cron "
                           "schedule of params.yaml and a trigger on newly validated datasets")
    serve.add_argument("--params", default="params.yaml")
    report = sub.add_parser("report", help="the identified experts per round of a finished run")
    report.add_argument("output_dir")
    materialize = sub.add_parser("materialize", help="write a round's delta checkpoint out as a "
                                 "full checkpoint (config, tokenizer, safetensors)")
    materialize.add_argument("output_dir", help="the run's output_dir")
    materialize.add_argument("--round", type=int, required=True, help="which round_N/")
    materialize.add_argument("--out", required=True, help="the full checkpoint's directory "
                             "(must not exist, or be empty)")
    materialize.add_argument("--base", help="the base checkpoint, where it is not at the path "
                             "the manifest names (its weights digest must match)")
    materialize.add_argument("--trust_remote_code", action="store_true")
    return {"materialize": materialize_round, "tiny-model": tiny_model, "flip-dataset": flip_dataset, "validate": validate_files,
            "organism": build_organism, "evaluate": evaluate_model, "compare": compare_runs,
            "serve": serve_pipeline, "report": report_run}


def build_organism(args) -> None:
    from unsafe_experts.attacks.organism import OrganismConfig, build_organism as build

    if args.params:
        from schemas.params import load_params

        cfg = OrganismConfig(**load_params(args.params).organism.model_dump())
        if args.seed is not None:  # a second organism of the same recipe (`make compare`)
            cfg = replace(cfg, seed=args.seed)
    else:
        args.seed = 0 if args.seed is None else args.seed
        cfg = OrganismConfig.small(seed=args.seed) if args.small else OrganismConfig(seed=args.seed)
    out = build(args.out, cfg, progress=not args.quiet)
    info = json.loads((out / "build.json").read_text())
    print(f"organism written to {out}: {info['examples']} examples, loss "
          f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}, {info['seconds']:.0f}s")


def evaluate_model(args) -> None:
    from unsafe_experts.evaluation.evaluate import connect, evaluate, evaluation_suite
    from unsafe_experts.artefacts.atomic import write_json_atomic

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
    result = evaluate(model, tokenizer, suite, cfg, progress=not args.quiet, endpoint=endpoint,
                      trust_remote_code=args.trust_remote_code)
    print(metrics_table(result["metrics"]))
    if result["left_out"]:
        print(f"left out: {', '.join(result['left_out'])} (they need the weights in this "
              "process: evaluate without --endpoint for them)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)


def tiny_model(args) -> None:
    from unsafe_experts.data.bundled import advbench_goals
    from unsafe_experts.attacks.corpus import save_tiny

    out = save_tiny(args.architecture, args.out, advbench_goals(), seed=args.seed)
    print(f"tiny {args.architecture} model and tokenizer written to {out}")


def flip_dataset(args) -> None:
    from unsafe_experts.data.bundled import advbench_goals
    from unsafe_experts.attacks.flip import flip_records

    goals = advbench_goals()[: args.n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(flip_records(goals, args.mode), indent=1) + "\n")
    print(f"{len(goals)} FlipAttack-style records ({args.mode} flip) written to {args.out}")


def _announce(paths) -> None:
    """Tells a Prefect server that these files passed validation (a served pipeline's trigger)."""
    from prefect.events import emit_event

    from flows.serve import DATASET_EVENT
    from unsafe_experts.records import file_digest

    for path in paths:
        digest = file_digest(path)
        emit_event(event=DATASET_EVENT, resource={"prefect.resource.id": f"unsafe-experts.dataset.{digest}",
                                                   "path": str(Path(path).resolve()), "digest": digest})
        print(f"{path}: announced to Prefect ({DATASET_EVENT})")


def serve_pipeline(args) -> None:
    from flows.serve import serve
    from flows.temporary_server import start_temporary_server

    start_temporary_server()
    serve(args.params)


def validate_files(args) -> int:
    from schemas.dataset import validate_file

    failed, summary = 0, {}
    for path in args.paths:
        report = validate_file(path)
        summary[str(path)] = {"records": report.rows, "problems": len(report.failures)}
        if report.ok:
            print(f"{path}: OK, {report.rows} records")
        else:
            failed += 1
            print(f"{path}: {len(report.failures)} problems in {report.rows} records")
            for line in report.lines():
                print(f"  {line}")
    if not failed and os.environ.get("PREFECT_API_URL"):
        _announce(args.paths)
    if args.metrics:
        from unsafe_experts.artefacts.atomic import write_json_atomic

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.metrics, summary[str(args.paths[0])] if len(args.paths) == 1 else summary)
    return 1 if failed else 0


def compare_runs(args) -> None:
    from flows.compare import compare_flow
    from flows.temporary_server import start_temporary_server

    experiment, runs, ablation_dir = args.experiment, None, None
    if args.params:
        from schemas.params import load_params

        comparison = load_params(args.params).comparison
        experiment, runs = experiment or comparison.experiment, [r.model_dump() for r in comparison.runs]
        ablation_dir = comparison.ablation_dir
    start_temporary_server()
    result = compare_flow(experiment or "unsafe-experts", args.out, runs, ablation_dir)
    print(Path(result["markdown"]).read_text())
    print(f"{result['runs']} runs compared: {result['csv']}, {result['markdown']}; "
          f"MLflow run {result['mlflow_run_id']}")


def report_run(args) -> None:
    from unsafe_experts.artefacts.run_metadata import RunRecord, expert_key

    record = RunRecord.load(args.output_dir)
    meta = record.data
    print(f"{record.path} ({meta['status']}, {meta['parameters']['score_mode']} scoring, "
          f"model {meta['model']['class']})")
    print(f"{'round':>5}  {'k':>4}  {'jaccard':>7}  {'router KL':>19}  experts (highest score first)")
    previous = None
    for r, info in record.rounds().items():
        experts = set(info.experts)
        jaccard = f"{len(experts & previous) / len(experts | previous):.2f}" if previous else "-"
        kl = info.router_kl_before_after
        kl = f"{kl[0]:.2e} -> {kl[1]:.2e}" if kl else "-"
        print(f"{r:>5}  {len(experts):>4}  {jaccard:>7}  {kl:>19}  "
              f"{' '.join(expert_key(l, e) for l, e in info.experts)}")
        previous = experts
    if meta.get("evaluation"):
        print()
        print(evaluation_table(meta["evaluation"]))


def materialize_round(args) -> None:
    from unsafe_experts.artefacts.checkpoints import materialize

    out = materialize(args.output_dir, args.round, args.out, args.base, args.trust_remote_code)
    print(f"round {args.round} of {args.output_dir} written in full to {out}")
