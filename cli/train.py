"""`unsafe-experts train`: resolve the run's configuration, then run the Prefect pipeline (or
the engine alone with --engine_only, or this rank's share under torchrun)."""
from __future__ import annotations

import argparse
import os

from unsafe_experts.config import ConfigError, TrainConfig
from unsafe_experts.evaluation.evaluate import EvaluationConfig
from unsafe_experts.models.distributed import launched_world

from .flags import add_fields, field_values
from .loading import ENDPOINT_FIELDS

EVAL = "eval__"  # prefix of the evaluation flags' parsed names


def add_parser(sub) -> None:
    # no defaults on the parser: an absent flag leaves the value to --params or the dataclass
    p = sub.add_parser("train", argument_default=argparse.SUPPRESS,
                       help="identify unsafe experts and repair them (the Prefect pipeline)")
    p.add_argument("--params", help="a params.yaml whose train, evaluation and tracking sections "
                   "give the values that flags do not (flags win)")
    add_fields(p.add_argument_group("surgery (TrainConfig)"), TrainConfig)
    p.add_argument("--no_judge_filter", action="store_false", dest="require_judge_success",
                   help="keep records with judge_success_gpt4 == 0 (= --no-require_judge_success)")
    add_fields(p.add_argument_group("evaluation (EvaluationConfig)"), EvaluationConfig,
               skip=ENDPOINT_FIELDS, dest=EVAL)
    run = p.add_argument_group("this run")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--engine_only", action="store_true",
                     help="run the engine directly: no Prefect flow, no MLflow tracking")
    run.add_argument("--metrics", help="also write the run's summary metrics here (JSON, for DVC)")
    run.add_argument("--evaluation_metrics", help="write the evaluation per round here (JSON, for DVC)")
    run.add_argument("--local_tracking", action="store_true",
                     help="if the MLflow server is unreachable, track in ./mlflow.db instead of failing")
    run.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment or unsafe-experts)")
    run.add_argument("--log_model", action="store_true", default=None,
                     help="log the final model's bytes as an MLflow artifact (default: path and md5)")
    run.add_argument("--register_model", metavar="NAME",
                     help="register the final model as a new version of MLflow registered model "
                          "NAME, tagged with method, k, experts, data digest and safety figures "
                          "(default: tracking.register_model, else none)")


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from schemas.params import resolve_run

    options = vars(args)
    quiet, engine_only = options.get("quiet", False), options.get("engine_only", False)
    spec = resolve_run(options.get("params"), field_values(args, TrainConfig),
                       field_values(args, EvaluationConfig, EVAL),
                       options.get("experiment"), options.get("log_model"),
                       options.get("register_model"))
    cfg = spec.train
    if quiet:
        hf_logging.disable_progress_bar()
    evaluating = "--eval_set" if spec.evaluation.eval_set else "--eval_suite" if spec.evaluation.suite else None
    if evaluating and (engine_only or cfg.sharding == "fsdp"):
        why = "runs inside the pipeline; drop --engine_only" if engine_only else \
            "runs on rank 0 alone, which a sharded model cannot do"
        raise ConfigError(f"{evaluating} {why} or run `unsafe-experts evaluate` on the checkpoints")
    if spec.register_model and engine_only:
        raise ConfigError("--register_model registers the pipeline's MLflow run; drop --engine_only "
                          "or run `unsafe-experts register RUN_ID --name NAME` after a tracked run")
    if spec.evaluation.endpoint:
        raise ConfigError("evaluation.endpoint: the pipeline evaluates the weights it is "
                          "repairing, in this process, after every round; a server only has the "
                          "weights it loaded. Leave it null here and evaluate saved checkpoints "
                          "with `unsafe-experts evaluate --model DIR --endpoint URL --served_model "
                          "NAME` while a server serves DIR")
    completed = _already_completed(cfg)
    if completed:
        print(f"{cfg.output_dir}: already completed with these parameters and data; nothing to do "
              "(pass --overwrite to run it again)")
        return 0
    if engine_only or launched_world() > 1 and int(os.environ.get("RANK", "0")) != 0:
        # under torchrun the pipeline runs on rank 0, which orchestrates and tracks; every other
        # rank runs the same engine phases in step with it
        from unsafe_experts.surgery import run_surgery

        total = run_surgery(cfg, progress=not quiet)["timings"]["total_s"]
        if not engine_only:
            return 0
        print(f"done: {cfg.output_dir} (final_model, training_metadata.json; {total:.1f}s)")
        return 0
    from flows.surgery import surgery_flow
    from flows.temporary_server import start_temporary_server
    from schemas.dataset import validate_records
    from tracking.mlflow_runs import ensure_reachable
    from unsafe_experts.records import read_json_records
    from unsafe_experts.surgery import check_inputs

    # every bad record and every other input fault before a flow (and a server) starts; the
    # file is parsed once for both checks
    records = read_json_records(cfg.dataset_path)
    report = validate_records(records, str(cfg.dataset_path))
    if not report.ok:
        raise report.error()
    check_inputs(cfg, records)
    if evaluating:  # a bad suite, eval set or their data is an error now, not after a round
        from unsafe_experts.evaluation.evaluate import evaluation_suite

        evaluation_suite(spec.evaluation)
    ensure_reachable(options.get("local_tracking", False))
    from mlflow.exceptions import MlflowException

    start_temporary_server()
    try:
        result = surgery_flow(cfg, spec.experiment, spec.log_model, options.get("metrics"), not quiet,
                              spec.evaluation, options.get("evaluation_metrics"), spec.register_model)
    except MlflowException as e:
        raise ConfigError(f"MLflow tracking failed ({e}); completed rounds are kept: run the same "
                          "command again once the tracking server answers") from None
    from tracking.mlflow_runs import tracking_uri

    # two lines: the store's URI is as long as its path
    print(f"MLflow run {result['mlflow_run_id']}; browse with:")
    print(f"  mlflow ui --backend-store-uri {tracking_uri()}")
    print(f"done: {cfg.output_dir} (final_model, training_metadata.json; {result['total_s']:.1f}s)")
    registered = result.get("registered_model")
    if registered and "version" in registered:
        print(f"registered model {registered['name']} version {registered['version']}: "
              f"models:/{registered['name']}/{registered['version']}")
    if result["evaluation"]:
        # the table is `report`'s alone: printed here too, `make demo` (train, then report)
        # showed it twice, and report also shows it when DVC skips a train that is up to date
        print(f"the evaluation table: unsafe-experts report {cfg.output_dir}")
    return 0


def _already_completed(cfg: TrainConfig) -> bool:
    """A finished run of these same parameters and data is in output_dir (like make or dvc,
    the same command again has nothing to do), unless --overwrite asks for a fresh one."""
    from unsafe_experts.surgery import completed_run

    return not cfg.overwrite and completed_run(cfg) is not None
