"""Unsafe-expert surgery (any method) as a Prefect flow, tracked in MLflow (one parent run, one nested
run per round) and versioned by DVC through `dvc.yaml`.

No `from __future__ import annotations` here: Prefect validates a flow's parameters with a
model built from its annotations, and a served deployment's run cannot resolve the string
"TrainConfig" (it failed with "Surgery_FlowModel is not fully defined")."""

import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

from prefect import flow, runtime, task

from tasks import surgery as steps
from tracking import mlflow_runs, registry
from tracking.digests import dvc_md5, git_commit
from tracking.metric_names import mlflow_names
from tracking.run_names import run_name as _run_name
from unsafe_experts.artefacts.atomic import write_json_atomic
from unsafe_experts.artefacts.model_card import write_model_card
from unsafe_experts.artefacts.run_metadata import ROUNDS, RunRecord
from unsafe_experts.config import TrainConfig
from unsafe_experts.evaluation.evaluate import EvaluationConfig, evaluation_suite
from unsafe_experts.evaluation.headline import surgery_family
from unsafe_experts.models.distributed import launched_world
from unsafe_experts.selection.methods import METHODS

# retries only where they can help: the tracking server may blip; model steps are deterministic
track = task(mlflow_runs.log_round, name="track-round", retries=2, retry_delay_seconds=2)


def _summary(metadata: dict, final: dict) -> dict[str, float]:
    """The run's figures from its metadata (so a resumed run counts the rounds done before)."""
    per_round = metadata[ROUNDS]
    rounds = sorted(per_round, key=int)
    timings = [metadata["timings"][f"round_{r}"] for r in rounds]
    last = per_round[rounds[-1]]
    # each round run carries its own peak_memory_mb; the parent keeps identification's, so that
    # with eight attack families the parent stays within about 40 metrics
    out = {"rounds": len(rounds), "total_s": final["total_s"],
           "identify_s": sum(t["identify_s"] for t in timings),
           "identify_peak_memory_mb": max(t["identify_peak_memory_mb"] for t in timings)}
    sft = [x["loss"] for x in metadata["training_logs"]
           if x["kind"] == "sft" and x["round"] == int(rounds[-1])]
    if sft:
        out["final_sft_loss"] = sft[-1]
    if len(rounds) > 1:
        out["jaccard_last_two_rounds"] = mlflow_runs.jaccard(last["experts"], per_round[rounds[-2]]["experts"])
    if "router_kl_before_after" in last:
        out["final_router_kl"] = last["router_kl_before_after"][1]
    return out


def _evaluate(key, stage, evaluation, run_ids, step, evaluations, logged, family=None):
    result = steps.evaluate_stage(key, stage, evaluation)
    for run_id in run_ids:
        mlflow_runs.log_evaluation(run_id, result, step, stage, family)
    if len(run_ids) > 1:  # a round run: its samples in full, as text
        mlflow_runs.log_samples_text(run_ids[-1], [{"stage": stage, **x} for x in result["samples"]])
    logged.add(stage)
    evaluations[stage] = result["metrics"]


def _write_evaluations(run_id, evaluations, evaluation_path, logged, plots_dir, family=None):
    """The per-round figures the parent run lacks (the rounds of an interrupted run), the
    safety plot, and the DVC files: before.json and after.json (the six
    headline figures, for `dvc metrics show`: one row each), evaluation.json (every value
    before and after), evaluation_detail.json (every stage with n and 95% interval) and
    evaluation_rounds.json (one row per round)."""
    for stage, metrics in evaluations.items():
        if stage not in logged:  # evaluated by the interrupted run this one resumes
            mlflow_runs.log_evaluation(run_id, {"metrics": metrics, "samples": []},
                                    mlflow_runs.stage_step(stage), stage, family)
    detail = {**evaluations, "final": evaluations[list(evaluations)[-1]]}
    rows = mlflow_runs.safety_rows(evaluations)
    mlflow_runs.log_file(run_id, mlflow_runs.safety_plot(rows, plots_dir / "safety_per_round.png"))
    if evaluation_path:
        compact = mlflow_runs.compact_evaluation(evaluations)
        mlflow_runs.write_json(evaluation_path, compact)
        mlflow_runs.write_headline_files(Path(evaluation_path).parent, compact, family)
        mlflow_runs.write_json(Path(evaluation_path).with_name("evaluation_detail.json"), detail)
        mlflow_runs.write_json(Path(evaluation_path).with_name("evaluation_rounds.json"), rows)
    return detail


def _round(cfg, key, r, experiment, run_id, tags, previous, evaluation, evaluations, logged) -> list:
    """One round's tasks under its nested MLflow run; returns the round's experts."""
    round_run = mlflow_runs.start_run(experiment, f"round-{r}", {"round": r}, tags, parent=run_id,
                                   description=f"Round {r} of {_run_name(cfg)}.")
    steps.identify(key, r)
    steps.repair(key, r)
    if not cfg.skip_router_training:
        steps.align(key, r)
    done = steps.checkpoint(key, r)
    track.with_options(task_run_name=f"track-round-{r}")(
        round_run, r, done["identified"], done["timings"], done["logs"], previous)
    # round_N/ is a delta: its md5 names the delta's bytes, the base digest what it applies to
    mlflow_runs.log_tags(round_run, {"checkpoint": done["path"], "checkpoint_kind": "delta",
                                  "checkpoint_dvc_md5": dvc_md5(done["path"]),
                                  "checkpoint_bytes": done["bytes"],
                                  "checkpoint_base_sha256": done["base_sha256"]})
    mlflow_runs.log_tags(run_id, {f"experts_round_{r}": mlflow_runs.expert_names(done["identified"]["experts"])})
    if (evaluation.eval_set or evaluation.suite) and (evaluation.rounds == "every" or r == cfg.num_rounds):
        _evaluate(key, f"round_{r}", evaluation, [run_id, round_run], r, evaluations, logged,
                  surgery_family(cfg.model_name))
    mlflow_runs.end_run(round_run)
    return done["identified"]["experts"]


def _flow_run_name() -> str:
    try:
        return _run_name(runtime.flow_run.parameters["cfg"])
    except Exception:  # a name is never worth failing a run over
        return "unsafe-expert-surgery"


def _description(name: str, rounds: dict, evaluations: dict | None, metrics: dict) -> str:
    """One paragraph: which experts, did it work, at what cost."""
    parts = [f"{name}: " + "; ".join(f"round {r} repaired {mlflow_runs.expert_names(x['experts'])}"
                                     for r, x in sorted(rounds.items(), key=lambda x: int(x[0]))) + "."]
    if evaluations:
        compact = mlflow_runs.compact_evaluation(evaluations)
        before, after = compact["before"], compact["after"]
        asr = [f"{n} {before[n]:.2f} -> {after[n]:.2f}" for n in sorted(after) if n.startswith("asr_") and n in before]
        cost = [f"{n} {before[n]:.2f} -> {after[n]:.2f}" for n in sorted(after)
                if (n.startswith(("over_refusal", "refusal_")) or n == "plain_refusal") and n in before]
        if asr:
            parts.append("Attack success (before -> after): " + ", ".join(asr) + ".")
        if cost:
            parts.append("Refusal (before -> after): " + ", ".join(cost) + ".")
        if "benign_loglik_change" in metrics:
            parts.append(f"Benign log-likelihood change per token: {metrics['benign_loglik_change']:+.3f}.")
        suite_loglik = [f"{n[:-len('_change')]} {metrics[n]:+.3f}" for n in sorted(metrics)
                        if n.startswith("loglik_") and n.endswith("_change")]
        if suite_loglik:  # a suite's reference sets
            parts.append("Log-likelihood change per token: " + ", ".join(suite_loglik) + ".")
    if "locality_ok" in metrics:
        parts.append(f"Locality: {metrics['experts_changed']} experts and {metrics['routers_changed']} "
                     f"routers changed, {'nothing else' if metrics['locality_ok'] else 'OTHER WEIGHTS TOO'}.")
    return " ".join(parts)


def _markdown(name, run_id, experiment, rounds, evaluations, metrics, description) -> str:
    lines = [f"# {name}", "", description, "", "## Experts repaired per round", "",
             "| round | experts |", "|---|---|"]
    lines += [f"| {r} | {mlflow_runs.expert_names(x['experts'])} |"
              for r, x in sorted(rounds.items(), key=lambda x: int(x[0]))]
    if evaluations:
        compact = mlflow_runs.compact_evaluation(evaluations)
        lines += ["", "## Evaluation before and after surgery", "", "| metric | before | after |",
                  "|---|---|---|"]
        lines += [f"| {n} | {compact['before'].get(n, float('nan')):.3f} | {v:.3f} |"
                  for n, v in compact["after"].items()]
    lines += ["", "## MLflow", "", f"Run `{run_id}` in experiment `{experiment}` "
              f"({mlflow_runs.tracking_uri()}); open it with", "",
              f"    mlflow ui --backend-store-uri {mlflow_runs.tracking_uri()}", "",
              f"and go to `#/experiments/{mlflow_runs.experiment_id(experiment)}/runs/{run_id}"
              "?workflowType=machine_learning` (MLflow's model-training view); every run of the "
              f"experiment, side by side: `{mlflow_runs.run_table_url(mlflow_runs.experiment_id(experiment))}`."]
    return "\n".join(lines)


def _conclude(cfg, final, run_id, evaluations, evaluation_path, metrics_path, log_model,
              logged, experiment, register_model=None) -> dict:
    """After the last round: locality, the evaluation files, summary metrics, tags, plots,
    the run's description, the registered model version and the Prefect summary."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    record = RunRecord.load(final["output_dir"])
    metadata, selected = record.data, [list(x) for x in record.selected()]
    dense = METHODS[cfg.method].trains_all_weights
    locality = steps.check_locality(cfg.model_name, final["final_model"], selected,
                                    dense or not cfg.skip_router_training, dense or cfg.shared_weights)
    # the plots go beside the DVC metrics (dvc.yaml's image plots), else only to MLflow
    plots_dir = Path(evaluation_path or metrics_path).parent if (evaluation_path or metrics_path) else None
    with tempfile.TemporaryDirectory() as tmp:
        where = plots_dir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        detail = None
        if evaluations is not None:
            detail = _write_evaluations(run_id, evaluations, evaluation_path, logged, where,
                                        surgery_family(cfg.model_name))
        mlflow_runs.log_experts(run_id, metadata[ROUNDS], where)
    if evaluations is not None or locality:
        metadata.update({"evaluation": detail} if detail is not None else {})
        metadata["locality"] = locality
        write_json_atomic(final["metadata"], metadata)
        write_model_card(final["output_dir"])  # now with the before/after figures
    mlflow_runs.log_file(run_id, final["metadata"])
    mlflow_runs.log_tags(run_id, {"final_model": final["final_model"], "final_model_kind": cfg.final_checkpoint,
                               "final_model_dvc_md5": dvc_md5(final["final_model"])})
    if log_model:
        mlflow_runs.log_dir(run_id, final["final_model"], "final_model")
    metrics = _summary(metadata, final)
    if locality:
        metrics.update(locality_ok=int(locality["ok"]), experts_changed=len(locality["experts"]),
                       routers_changed=len(locality["routers"]))
    before = {}
    if evaluations:
        metrics.update(mlflow_runs.headline(evaluations))
        before = mlflow_runs.headline_before(evaluations, surgery_family(cfg.model_name))
    # MLflow's names have sections (tracking/metric_names.py); the files keep the evaluation's
    mlflow_runs.log_metrics(run_id, {**mlflow_names(metrics), **before})
    # for `dvc metrics show`: the before values are in evaluation.json beside the after values
    mlflow_runs.write_json(metrics_path, {k: v for k, v in metrics.items() if not k.endswith("_before")})
    name = _run_name(cfg)
    description = _description(name, metadata[ROUNDS], evaluations, metrics)
    mlflow_runs.log_tags(run_id, {"mlflow.note.content": description})
    mlflow_runs.save_run_table_view(mlflow_runs.experiment_id(experiment), run_id)
    # last, from what the run now holds; a registry failure is reported, never the run's
    registered = registry.register_after_run(register_model, run_id) if register_model else None
    create_markdown_artifact(_markdown(name, run_id, experiment, metadata[ROUNDS], evaluations,
                                       metrics, description),
                             key="surgery-summary", description=f"{name}: experts, before/after, MLflow run")
    # the description itself (experts per round, before/after) ran to 974 characters on one log
    # line; it is the MLflow run's note and the artifact, and `unsafe-experts report` prints it
    get_run_logger().info("summary: the surgery-summary artifact and the MLflow run's note")
    return {**final, "mlflow_run_id": run_id, "metrics": metrics, "evaluation": detail or {},
            "experts_per_round": [r.experts for r in record.rounds().values()],
            "registered_model": registered}


@flow(name="unsafe-expert-surgery", flow_run_name=_flow_run_name)
def surgery_flow(cfg: TrainConfig, experiment: str = "unsafe-experts", log_model: bool = False,
                 metrics_path: str | None = None, progress: bool = True,
                 evaluation: EvaluationConfig | None = None, evaluation_path: str | None = None,
                 register_model: str | None = None) -> dict:
    """validate -> [evaluate before] -> per round: score -> masked SFT -> router alignment ->
    checkpoint [-> evaluate] -> final model. `cfg` and `evaluation` come resolved and validated
    (schemas.params.resolve_run); an `evaluation.eval_set` or `evaluation.suite` turns on the
    safety evaluation, whose results go to `evaluation_path` (DVC) and MLflow; `register_model` names the
    registered model the final model becomes a version of."""
    cfg.validate()  # a no-op for a resolved config; a deployment's parameters arrive rebuilt
    evaluation = (evaluation or EvaluationConfig()).validate()
    evaluating = bool(evaluation.eval_set or evaluation.suite)
    commit = git_commit()  # the working directory's (DVC) repository, else the code's
    commit = commit if commit != "unknown" else git_commit(Path(__file__).resolve().parents[1])
    tags = {"method": cfg.method, "git_commit": commit, "data_dvc_md5": dvc_md5(cfg.dataset_path),
            "prefect_flow_run_id": runtime.flow_run.id or "none", "output_dir": cfg.output_dir,
            "world_size": launched_world()}  # processes under torchrun; 1 alone
    run_id = mlflow_runs.start_run(experiment, _run_name(cfg),
                                {**asdict(cfg), **({"evaluation": asdict(evaluation)} if evaluating else {})}, tags,
                                description=f"{_run_name(cfg)}: running ({cfg.num_rounds} rounds of "
                                            f"{cfg.top_k_experts} experts by {cfg.method}).")
    monitor = mlflow_runs.system_metrics(run_id)
    key, logged = None, set()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                steps.validate_dataset(cfg.dataset_path, str(Path(tmp) / "validation_failures.csv"))
            except steps.DatasetValidationError as e:
                mlflow_runs.log_file(run_id, e.failures_csv, "validation")
                raise
        prepared = steps.prepare(cfg, progress)
        key = prepared["key"]
        mlflow_runs.log_dataset(run_id, cfg.dataset_path, prepared["records"], tags["data_dvc_md5"])
        if evaluating:
            mlflow_runs.log_eval_suite(run_id, evaluation_suite(evaluation))
        mlflow_runs.log_tags(run_id, {f"dataset_{k}": ", ".join(v) if isinstance(v, list) else
                                      json.dumps(v) if isinstance(v, dict) else v
                                      for k, v in prepared["dataset"].items()})
        first = prepared["first_round"]
        if first > 1:  # the rounds before were completed by an interrupted run of this command
            mlflow_runs.log_tags(run_id, {"resumed_after_round": first - 1})
        evaluations: dict = dict(prepared["evaluation"])
        if evaluating and "before" not in evaluations:
            _evaluate(key, "before", evaluation, [run_id], 0, evaluations, logged,
                      surgery_family(cfg.model_name))
        previous = prepared["previous_experts"]
        for r in range(first, cfg.num_rounds + 1):
            previous = _round(cfg, key, r, experiment, run_id, tags, previous, evaluation, evaluations,
                              logged)
        final = steps.finish(key)
        key = None
        result = _conclude(cfg, final, run_id, evaluations if evaluating else None,
                           evaluation_path, metrics_path, log_model, logged, experiment,
                           register_model)
        _stop(monitor)
        mlflow_runs.end_run(run_id)
        return result
    except BaseException as error:
        if key:  # first the run's own record: a tracking outage must not leave it "running"
            steps.discard(key, error)
        _stop(monitor)
        try:
            mlflow_runs.end_run(run_id, "FAILED")
        except Exception as tracking_error:  # the tracking server may be what failed
            warnings.warn(f"could not mark MLflow run {run_id} failed: {tracking_error}", stacklevel=2)
        raise


def _stop(monitor, wait_s: float = 10) -> None:
    """Stops MLflow's system-metrics thread; never waits long on a tracking server that is down."""
    if monitor is None:
        return
    import threading

    def finish():
        try:
            monitor.finish()
        except Exception as e:  # system metrics are a nicety, never a failure
            warnings.warn(f"stopping MLflow system metrics: {e}", stacklevel=2)

    stopper = threading.Thread(target=finish, daemon=True, name="stop-system-metrics")
    stopper.start()
    stopper.join(wait_s)
