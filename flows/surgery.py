"""Unsafe-expert surgery (any method) as a Prefect flow, tracked in MLflow (one parent run, one nested
run per round) and versioned by DVC through `dvc.yaml`.

No `from __future__ import annotations` here: Prefect validates a flow's parameters with a
model built from its annotations, and a served deployment's run cannot resolve the string
"TrainConfig" (it failed with "Surgery_FlowModel is not fully defined")."""

import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

from prefect import flow, runtime, task

from tasks import surgery as steps
from tasks import tracking
from tasks.digests import dvc_md5, git_commit
from unsafe_experts.config import TrainConfig
from unsafe_experts.distributed import launched_world
from unsafe_experts.evaluation import EvaluationConfig
from unsafe_experts.model_card import write_model_card
from unsafe_experts.outputs import write_json_atomic
from unsafe_experts.run_records import ROUNDS, RunRecord

# retries only where they can help: the tracking server may blip; model steps are deterministic
track = task(tracking.log_round, name="track-round", retries=2, retry_delay_seconds=2)


def _summary(metadata: dict, final: dict) -> dict[str, float]:
    """The run's figures from its metadata (so a resumed run counts the rounds done before)."""
    per_round = metadata[ROUNDS]
    rounds = sorted(per_round, key=int)
    timings = [metadata["timings"][f"round_{r}"] for r in rounds]
    last = per_round[rounds[-1]]
    out = {"rounds": len(rounds), "total_s": final["total_s"],
           "identify_s": sum(t["identify_s"] for t in timings),
           "identify_peak_memory_mb": max(t["identify_peak_memory_mb"] for t in timings),
           "peak_memory_mb": max(t["peak_memory_mb"] for t in timings)}
    sft = [x["loss"] for x in metadata["training_logs"]
           if x["kind"] == "sft" and x["round"] == int(rounds[-1])]
    if sft:
        out["final_sft_loss"] = sft[-1]
    if len(rounds) > 1:
        out["jaccard_last_two_rounds"] = tracking.jaccard(last["experts"], per_round[rounds[-2]]["experts"])
    if "router_kl_before_after" in last:
        out["final_router_kl"] = last["router_kl_before_after"][1]
    return out


def _evaluate(key, stage, evaluation, run_ids, step, evaluations):
    result = steps.evaluate_stage(key, stage, evaluation)
    for run_id in run_ids:
        tracking.log_evaluation(run_id, result, step, stage)
    evaluations[stage] = result["metrics"]


def _write_evaluations(run_id, evaluations, evaluation_path):
    evaluations["final"] = evaluations[list(evaluations)[-1]]
    tracking.write_and_log_metrics(run_id, evaluations, evaluation_path)
    rows = tracking.safety_rows(evaluations)
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_file(run_id, tracking.safety_plot(rows, Path(tmp) / "safety_per_round.png"))
    if evaluation_path:
        write_json_atomic(Path(evaluation_path).with_name("evaluation_rounds.json"), rows)


def _round(cfg, key, r, experiment, run_id, tags, previous, evaluation, evaluations) -> list:
    """One round's tasks under its nested MLflow run; returns the round's experts."""
    round_run = tracking.start_run(experiment, f"round-{r}", {"round": r}, tags, parent=run_id)
    steps.identify(key, r)
    steps.repair(key, r)
    if not cfg.skip_router_training:
        steps.align(key, r)
    done = steps.checkpoint(key, r)
    track.with_options(task_run_name=f"track-round-{r}")(
        round_run, r, done["identified"], done["timings"], done["logs"], previous)
    tracking.log_tags(round_run, {"checkpoint": done["path"],
                                  "checkpoint_dvc_md5": dvc_md5(done["path"])})
    if evaluation.eval_set:
        _evaluate(key, f"round_{r}", evaluation, [run_id, round_run], r, evaluations)
    tracking.end_run(round_run)
    return done["identified"]["experts"]


def _conclude(cfg, final, run_id, evaluations, evaluation_path, metrics_path, log_model) -> dict:
    """After the last round: locality, the evaluation files, summary metrics and tags."""
    record = RunRecord.load(final["output_dir"])
    metadata, selected = record.data, [list(x) for x in record.selected()]
    locality = steps.check_locality(cfg.model_name, final["final_model"], selected,
                                    not cfg.skip_router_training)
    if evaluations is not None:
        _write_evaluations(run_id, evaluations, evaluation_path)
    if evaluations is not None or locality:
        metadata.update({"evaluation": evaluations} if evaluations is not None else {})
        metadata["locality"] = locality
        write_json_atomic(final["metadata"], metadata)
        write_model_card(final["output_dir"])  # now with the before/after figures
    tracking.log_file(run_id, final["metadata"])
    tracking.log_tags(run_id, {"final_model": final["final_model"],
                               "final_model_dvc_md5": dvc_md5(final["final_model"])})
    if log_model:
        tracking.log_file(run_id, final["final_model"], "final_model")
    metrics = _summary(metadata, final)
    if locality:
        metrics.update(locality_ok=int(locality["ok"]), experts_changed=len(locality["experts"]),
                       routers_changed=len(locality["routers"]))
    tracking.write_and_log_metrics(run_id, metrics, metrics_path)
    return {**final, "mlflow_run_id": run_id, "metrics": metrics, "evaluation": evaluations or {},
            "experts_per_round": [r.experts for r in record.rounds().values()]}


@flow(name="unsafe-expert-surgery")
def surgery_flow(cfg: TrainConfig, experiment: str = "unsafe-experts", log_model: bool = False,
                 metrics_path: str | None = None, progress: bool = True,
                 evaluation: EvaluationConfig | None = None, evaluation_path: str | None = None) -> dict:
    """validate -> [evaluate before] -> per round: score -> masked SFT -> router alignment ->
    checkpoint [-> evaluate] -> final model. `cfg` and `evaluation` come resolved and validated
    (schemas.params.resolve_run); an `evaluation.eval_set` turns on the safety evaluation,
    whose results go to `evaluation_path` (DVC) and MLflow."""
    cfg.validate()  # a no-op for a resolved config; a deployment's parameters arrive rebuilt
    evaluation = (evaluation or EvaluationConfig()).validate()
    evaluating = bool(evaluation.eval_set)
    tags = {"method": cfg.method, "git_commit": git_commit(), "data_dvc_md5": dvc_md5(cfg.dataset_path),
            "prefect_flow_run_id": runtime.flow_run.id or "none",
            "world_size": launched_world()}  # processes under torchrun; 1 alone
    run_id = tracking.start_run(experiment, f"{cfg.method}-{Path(cfg.output_dir).name}",
                                {**asdict(cfg), **({"evaluation": asdict(evaluation)} if evaluating else {})}, tags)
    key = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                steps.validate_dataset(cfg.dataset_path, str(Path(tmp) / "validation_failures.csv"))
            except steps.DatasetValidationError as e:
                tracking.log_file(run_id, e.failures_csv, "validation")
                raise
        prepared = steps.prepare(cfg, progress)
        key = prepared["key"]
        tracking.log_dataset(run_id, cfg.dataset_path, prepared["records"], tags["data_dvc_md5"])
        tracking.log_tags(run_id, {f"dataset_{k}": v for k, v in prepared["dataset"].items()})
        first = prepared["first_round"]
        if first > 1:  # the rounds before were completed by an interrupted run of this command
            tracking.log_tags(run_id, {"resumed_after_round": first - 1})
        evaluations: dict = dict(prepared["evaluation"])
        if evaluating and "before" not in evaluations:
            _evaluate(key, "before", evaluation, [run_id], 0, evaluations)
        previous = prepared["previous_experts"]
        for r in range(first, cfg.num_rounds + 1):
            previous = _round(cfg, key, r, experiment, run_id, tags, previous, evaluation, evaluations)
        final = steps.finish(key)
        key = None
        result = _conclude(cfg, final, run_id, evaluations if evaluating else None,
                           evaluation_path, metrics_path, log_model)
        tracking.end_run(run_id)
        return result
    except BaseException as error:
        if key:  # first the run's own record: a tracking outage must not leave it "running"
            steps.discard(key, error)
        try:
            tracking.end_run(run_id, "FAILED")
        except Exception as tracking_error:  # the tracking server may be what failed
            warnings.warn(f"could not mark MLflow run {run_id} failed: {tracking_error}")
        raise
