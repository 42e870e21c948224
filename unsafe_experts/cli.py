"""`unsafe-experts`: train, validate, evaluate, compare, serve, report, and the offline demo
inputs (organism, tiny-model, flip-dataset). The engine modules never import orchestration;
this entry point reaches the Prefect flows, MLflow and the schemas lazily."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .adapters import UnsupportedModelError
from .config import DTYPES, METHODS, SCORE_MODES, SHARDING, ConfigError, TrainConfig
from .distributed import launched_world
from .examples import ExampleError
from .outputs import OutputDirBusyError
from .phases import NonFiniteLossError
from .records import DatasetError
from .router_kl import KL_TYPES

USER_ERRORS = (ConfigError, DatasetError, ExampleError, UnsupportedModelError, OSError,
               NonFiniteLossError, OutputDirBusyError)


def _train_parser(sub) -> None:
    # defaults are not set here: they come from TrainConfig, then --params, then the flags given
    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="identify unsafe experts by gradient and repair them")
    p.add_argument("--params", help="a params.yaml whose `train` section gives the defaults")
    p.add_argument("--model_name", help="hub id or local directory")
    p.add_argument("--dataset_path", help="JSON list or JSONL of jailbreak records")
    p.add_argument("--output_dir")
    p.add_argument("--method", choices=METHODS, help="gradient (default), the routing-based "
                   "baseline, or a control: random, all_experts, router_only")
    for flag in ("num_rounds", "top_k_experts", "batch_size", "max_samples", "sft_epochs",
                 "router_epochs", "max_length", "seed"):
        p.add_argument(f"--{flag}", type=int)
    for flag in ("expert_lr", "router_lr", "weight_decay"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--skip_router_training", action="store_true")
    p.add_argument("--kl_type", choices=KL_TYPES, help="default forward")
    p.add_argument("--score_mode", choices=SCORE_MODES,
                   help="accumulate (default): one top-k from gradients summed over all batches, "
                        "then masked SFT; per_batch: a fresh top-k and step on every batch")
    p.add_argument("--score_memory", choices=("exact", "streamed"),
                   help="exact (default): |summed gradient|, all expert gradients held; streamed: "
                        "per-batch magnitudes reduced and freed layer by layer during backward")
    p.add_argument("--truncation", choices=("middle", "left"),
                   help="where a too-long prompt is cut (the response never is)")
    p.add_argument("--refusal", action="append", dest="refusals", metavar="TEXT",
                   help="safe response; repeat to cycle several over the records")
    p.add_argument("--no_judge_filter", action="store_false", dest="require_judge_success",
                   help="keep records with judge_success_gpt4 == 0")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    p.add_argument("--sharding", choices=SHARDING,
                   help="none (default): each torchrun rank holds the whole model; fsdp: experts "
                        "sharded across the ranks (models too big for one device)")
    p.add_argument("--experts_implementation", choices=("grouped_mm", "batched_mm", "eager"),
                   help="fused-experts kernel (default: transformers'); pick by `python -m bench`")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--engine_only", action="store_true",
                   help="run the engine directly: no Prefect flow, no MLflow tracking")
    p.add_argument("--metrics", help="also write the run's summary metrics here (JSON, for DVC)")
    p.add_argument("--eval_set", help="evaluate before surgery and after every round on this "
                   "eval_set.json (from `unsafe-experts organism`)")
    p.add_argument("--eval_limit", type=int, help="first N prompts of each evaluation set")
    p.add_argument("--evaluation_metrics", help="write the evaluation per round here (JSON, for DVC)")
    p.add_argument("--retention_path", help="JSON list of chat prompts answered by the model before "
                   "surgery and mixed into the masked SFT (see README)")
    p.add_argument("--retention_samples", type=int)
    p.add_argument("--local_tracking", action="store_true",
                   help="if the MLflow server is unreachable, track in ./mlflow.db instead of failing")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment or unsafe-experts)")
    p.add_argument("--log_model", action="store_true",
                   help="log the final model's bytes as an MLflow artifact (default: path and md5)")


def _train(args) -> None:
    from dataclasses import asdict

    from transformers.utils import logging as hf_logging

    options = vars(args)
    quiet, engine_only = options.pop("quiet", False), options.pop("engine_only", False)
    metrics, params_path = options.pop("metrics", None), options.pop("params", None)
    log_model_flag = options.pop("log_model", False)
    experiment_flag = options.pop("experiment", None)
    local_tracking = options.pop("local_tracking", False)
    evaluation = {"eval_set": options.pop("eval_set", None)}
    if "eval_limit" in options:
        evaluation["limit"] = options.pop("eval_limit")
    evaluation_path = options.pop("evaluation_metrics", None)
    options.pop("command")
    experiment, log_model = "unsafe-experts", False
    if params_path:
        from schemas.params import load_params

        params = load_params(params_path)
        options = {**params.train.model_dump(), **options}
        experiment, log_model = params.tracking.experiment, params.tracking.log_model
        evaluation = {**params.evaluation.model_dump(),
                      **{k: v for k, v in evaluation.items() if v is not None}}
    log_model = log_model or log_model_flag
    experiment = experiment_flag or experiment
    missing = [k for k in ("model_name", "dataset_path", "output_dir") if k not in options]
    if missing:
        raise ConfigError(f"{', '.join('--' + k for k in missing)} required (or --params FILE)")
    if options.get("retention_path") == "":
        options["retention_path"] = None  # --retention_path "" turns off a params file's retention
    cfg = TrainConfig(**options).validate()
    if quiet:
        hf_logging.disable_progress_bar()
    if evaluation.get("eval_set") and (engine_only or cfg.sharding == "fsdp"):
        why = "runs inside the pipeline; drop --engine_only" if engine_only else \
            "runs on rank 0 alone, which a sharded model cannot do"
        raise ConfigError(f"--eval_set {why} or run `unsafe-experts evaluate` on the checkpoints")
    if engine_only or launched_world() > 1 and int(os.environ.get("RANK", "0")) != 0:
        # under torchrun the pipeline runs on rank 0, which orchestrates and tracks; every other
        # rank runs the same engine phases in step with it
        from .surgery import run_surgery

        total = run_surgery(cfg, progress=not quiet)["timings"]["total_s"]
        if not engine_only:
            return
    else:
        from flows.surgery import surgery_flow
        from schemas.dataset import validate_file
        from tasks.tracking import ensure_reachable

        from .surgery import check_inputs

        report = validate_file(cfg.dataset_path)  # every bad record, before a flow starts
        if not report.ok:
            raise report.error()
        check_inputs(cfg)
        ensure_reachable(local_tracking)
        result = surgery_flow(asdict(cfg), experiment, log_model, metrics, not quiet,
                              evaluation, evaluation_path)
        total = result["total_s"]
        print(f"MLflow run {result['mlflow_run_id']}; browse with: "
              "mlflow ui --backend-store-uri sqlite:///mlflow.db")
    print(f"done: {cfg.output_dir}/final_model, {cfg.output_dir}/training_metadata.json ({total:.1f}s)")
    if not engine_only and result["evaluation"]:
        print(evaluation_table(result["evaluation"]))


def evaluation_table(evaluations: dict) -> str:
    """Stages as rows (before, round_1, ..., final), metrics as columns, with n and 95% CI."""
    names = list(next(iter(evaluations.values())))
    lines = [f"{'stage':<8} " + " ".join(f"{n:>24}" for n in names)]
    for stage, metrics in evaluations.items():
        cells = []
        for n in names:
            m = metrics[n]
            cells.append(f"{m['value']:.3f} [{m['ci95'][0]:.2f},{m['ci95'][1]:.2f}] n={m['n']}")
        lines.append(f"{stage:<8} " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _organism(args) -> None:
    from .organism import OrganismConfig, build_organism

    if args.params:
        from schemas.params import load_params

        cfg = OrganismConfig(**load_params(args.params).organism.model_dump())
    else:
        cfg = OrganismConfig.small(seed=args.seed) if args.small else OrganismConfig(seed=args.seed)
    out = build_organism(args.out, cfg, progress=not args.quiet)
    build = json.loads((out / "build.json").read_text())
    print(f"organism written to {out}: {build['examples']} examples, loss "
          f"{build['first_loss']:.3f} -> {build['last_loss']:.3f}, {build['seconds']:.0f}s")


def _evaluate(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate, load_eval_set
    from .outputs import write_json_atomic

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    result = evaluate(model, tokenizer, load_eval_set(args.eval_set), args.max_new_tokens,
                      args.batch_size, args.limit, progress=not args.quiet)
    print(evaluation_table({Path(args.model).name: result["metrics"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)


def _tiny_model(args) -> None:
    from .bundled import advbench_goals
    from .tiny import save_tiny

    out = save_tiny(args.family, args.out, advbench_goals(), seed=args.seed)
    print(f"tiny {args.family} model and tokenizer written to {out}")


def _flip_dataset(args) -> None:
    from .bundled import advbench_goals
    from .flip import flip_records

    goals = advbench_goals()[: args.n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(flip_records(goals, args.mode), indent=1) + "\n")
    print(f"{len(goals)} FlipAttack-style records ({args.mode} flip) written to {args.out}")


def _announce(paths) -> None:
    """Tells a Prefect server that these files passed validation (a served pipeline's trigger)."""
    from prefect.events import emit_event

    from flows.serve import DATASET_EVENT
    from .records import file_digest

    for path in paths:
        digest = file_digest(path)
        emit_event(event=DATASET_EVENT, resource={"prefect.resource.id": f"unsafe-experts.dataset.{digest}",
                                                   "path": str(Path(path).resolve()), "digest": digest})
        print(f"{path}: announced to Prefect ({DATASET_EVENT})")


def _serve(args) -> None:
    from flows.serve import serve

    serve(args.params)


def _validate(args) -> int:
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
        from .outputs import write_json_atomic

        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.metrics, summary[str(args.paths[0])] if len(args.paths) == 1 else summary)
    return 1 if failed else 0


def _compare(args) -> None:
    from flows.compare import compare_flow

    experiment, runs = args.experiment, None
    if args.params:
        from schemas.params import load_params

        comparison = load_params(args.params).comparison
        experiment, runs = experiment or comparison.experiment, [r.model_dump() for r in comparison.runs]
    result = compare_flow(experiment or "unsafe-experts", args.out, runs)
    print(Path(result["markdown"]).read_text())
    print(f"{result['runs']} runs compared: {result['csv']}, {result['markdown']}; "
          f"MLflow run {result['mlflow_run_id']}")


def _report(args) -> None:
    meta_path = Path(args.output_dir) / "training_metadata.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path}: no such file; run `unsafe-experts train` (or `dvc repro`) first")
    meta = json.loads(meta_path.read_text())
    print(f"{meta_path} ({meta['status']}, {meta['parameters']['score_mode']} scoring, "
          f"model {meta['model']['class']})")
    print(f"{'round':>5}  {'k':>4}  {'jaccard':>7}  {'router KL':>19}  experts (highest score first)")
    previous = None
    for r, info in meta["identified_experts_per_round"].items():
        experts = {tuple(x) for x in info["experts"]}
        jaccard = f"{len(experts & previous) / len(experts | previous):.2f}" if previous else "-"
        kl = info.get("router_kl_before_after")
        kl = f"{kl[0]:.2e} -> {kl[1]:.2e}" if kl else "-"
        names = " ".join(f"L{l}_E{e}" for l, e in info["experts"])
        print(f"{r:>5}  {len(experts):>4}  {jaccard:>7}  {kl:>19}  {names}")
        previous = experts
    if meta.get("evaluation"):
        print()
        print(evaluation_table(meta["evaluation"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unsafe-experts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    tiny = sub.add_parser("tiny-model", help="build a tiny random MoE + tokenizer offline")
    tiny.add_argument("out")
    tiny.add_argument("--family", default="olmoe")
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
    organism.add_argument("--seed", type=int, default=0)
    organism.add_argument("--params", help="take the `organism` section of this params.yaml")
    organism.add_argument("--quiet", action="store_true")
    ev = sub.add_parser("evaluate", help="ASR, refusal, over-refusal and benign log-likelihood")
    ev.add_argument("--model", required=True)
    ev.add_argument("--eval_set", required=True, help="eval_set.json from `unsafe-experts organism`")
    ev.add_argument("--max_new_tokens", type=int, default=48)
    ev.add_argument("--batch_size", type=int, default=16)
    ev.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
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
    args = parser.parse_args(argv)
    handler = {"report": _report, "serve": _serve, "compare": _compare, "organism": _organism, "evaluate": _evaluate, "train": _train, "tiny-model": _tiny_model, "flip-dataset": _flip_dataset,
               "validate": _validate}[args.command]
    try:
        return handler(args) or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
