"""Prefect tasks over the engine's Surgery phases.

Tasks exchange a run key, round numbers, paths and small dicts. The live model stays in this
process's registry between tasks (Prefect would otherwise pickle it); checkpoints on disk are
the durable state.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from schemas.dataset import validate_file
from unsafe_experts.artefacts.locality import locality_report
from unsafe_experts.artefacts.result_cache import cached, model_digest
from unsafe_experts.artefacts.run_metadata import METADATA, ROUNDS, RoundRecord, expert_key
from unsafe_experts.config import TrainConfig
from unsafe_experts.evaluation.evaluate import EvaluationConfig, evaluate, evaluation_suite, is_evaluation_result
from unsafe_experts.evaluation.suites import suite_digest
from unsafe_experts.records import DatasetError
from unsafe_experts.surgery import Surgery

_RUNS: dict[str, Surgery] = {}


class DatasetValidationError(DatasetError):
    def __init__(self, message: str, failures_csv: str):
        super().__init__(message)
        self.failures_csv = failures_csv


@task(name="validate-dataset")
def validate_dataset(path: str, failures_csv: str) -> dict:
    """pandera over every record; on failure the full table goes to `failures_csv`."""
    report = validate_file(path)
    if not report.ok:
        Path(failures_csv).parent.mkdir(parents=True, exist_ok=True)
        report.failures.to_csv(failures_csv, index=False)
        raise DatasetValidationError(str(report.error()), failures_csv)
    return {"path": path, "rows": report.rows}


@task(name="prepare")
def prepare(cfg: TrainConfig, progress: bool = True) -> dict:
    """Checks the model and parameters, tokenizes the data, loads the model. Returns a run key."""
    surgery = Surgery(cfg, progress=progress)
    try:
        surgery.start()
    except BaseException as error:  # a long-lived (served) process must not keep the lock
        surgery.fail(error)
        raise
    key = str(Path(cfg.output_dir).resolve())
    _RUNS[key] = surgery
    done = surgery.meta[ROUNDS]
    return {"key": key, "dataset": surgery.data["summary"], "model": surgery.meta["model"],
            "records": [{"goal": r.get("goal")} for r in surgery.data["loaded"]], "first_round": surgery.first_round,
            "previous_experts": done[str(surgery.first_round - 1)]["experts"] if done else None,
            "evaluation": surgery.meta.get("evaluation", {})}


def _losses(surgery: Surgery, r: int, kind: str) -> list[float]:
    return [x["loss"] for x in surgery.meta["training_logs"] if x["round"] == r and x["kind"] == kind]


@task(task_run_name="score-round-{r}")
def identify(key: str, r: int) -> list[list[int]]:
    surgery = _RUNS[key]
    experts = [list(x) for x in surgery.identify(r)]
    names = ",".join(expert_key(l, e) for l, e in experts[:32]) + (" ..." if len(experts) > 32 else "")
    get_run_logger().info("round %d: %d experts chosen by %s: %s", r, len(experts), surgery.cfg.method, names)
    return experts


@task(task_run_name="sft-round-{r}")
def repair(key: str, r: int) -> None:
    surgery = _RUNS[key]
    surgery.repair(r)
    sft = _losses(surgery, r, "sft")
    if sft:
        get_run_logger().info("round %d: masked SFT loss %.4f -> %.4f over %d batches", r, sft[0], sft[-1], len(sft))
    else:
        get_run_logger().info("round %d: no separate SFT (score_mode %s)", r, surgery.cfg.score_mode)


@task(task_run_name="router-round-{r}")
def align(key: str, r: int) -> list[float]:
    kl = _RUNS[key].align(r)
    if len(kl) >= 2:
        get_run_logger().info("round %d: router KL %.3e -> %.3e", r, kl[0], kl[-1])
    return kl


@task(task_run_name="checkpoint-round-{r}")
def checkpoint(key: str, r: int) -> dict:
    """Saves round_r (a delta checkpoint); returns its path, size and base digest and what the
    round recorded (read back from disk)."""
    surgery = _RUNS[key]
    path = surgery.checkpoint(r)
    meta = json.loads((surgery.out / METADATA).read_text())
    identified = meta[ROUNDS][str(r)]
    record = RoundRecord.from_dict(r, identified)
    create_table_artifact(
        key=f"experts-round-{r}",
        table=[{"rank": i + 1, "layer": l, "expert": e, "score": record.scores[expert_key(l, e)]}
               for i, (l, e) in enumerate(record.experts)],
        description=f"Unsafe experts identified in round {r} by the {surgery.cfg.method} method",
    )
    # relative to the working directory where it lies below it: the absolute path made the
    # line longer than a terminal (issue #26)
    shown = os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else path
    get_run_logger().info("round %d: checkpoint saved to %s", r, shown)
    return {"round": r, "path": str(path), "identified": identified, "timings": meta["timings"][f"round_{r}"],
            "logs": [x for x in meta["training_logs"] if x["round"] == r],
            "base_sha256": meta["base"]["sha256"],
            "bytes": sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())}


@task(task_run_name="evaluate-{stage}")
def evaluate_stage(key: str, stage: str, evaluation: EvaluationConfig) -> dict:
    """Safety and utility of the live model now, on evaluation.suite or the organism suite of
    evaluation.eval_set, through `evaluate()` as `unsafe-experts evaluate` runs it:
    {"suite", "metrics": {...}, "samples": [...], "left_out": [...]}"""
    surgery = _RUNS[key]
    suite = evaluation_suite(evaluation)

    def run() -> dict:
        return evaluate(surgery.model, surgery.tokenizer, suite, evaluation, progress=surgery.progress)

    cache_key = None
    if stage == "before" and (digest := model_digest(surgery.cfg.model_name)):
        # the unrepaired model: the same for every run of a comparison on one organism
        cache_key = {"model": digest, "suite": suite_digest(suite),
                     "evaluation": {**asdict(evaluation), "rounds": None}, "dtype": str(surgery.model.dtype),
                     "device": surgery.model.device.type}
    used: dict = {}
    result = cached(surgery.cfg.cache_dir, "evaluation_before", cache_key, run, is_evaluation_result, used)
    for kind, entry in used.items():  # which cache entry the figures came from
        surgery.record("cache", kind, entry)
    surgery.record("evaluation", stage, result["metrics"])  # kept if the run is resumed
    # one short line: every figure here made a 600-character log line; `unsafe-experts report`
    # prints them all as a table
    asr = [m["value"] for name, m in result["metrics"].items() if name.startswith("asr_")]
    mean_asr = f", mean ASR {sum(asr) / len(asr):.3f} over {len(asr)} sets" if asr else ""
    get_run_logger().info("evaluation %s: %d metrics%s", stage, len(result["metrics"]), mean_asr)
    return result


@task(name="check-locality")
def check_locality(original: str, final_model: str, selected: list, routers_may_change: bool,
                   others_may_change: bool = False) -> dict | None:
    """Only the selected experts (and routers, when aligned; and the weights outside the experts,
    when the run trained them) may differ from the original.
    None when the original is not a local safetensors checkpoint (a hub id). A delta
    final_model is compared on what it materializes to (unsafe_experts/artefacts/locality.py)."""
    if not list(Path(original).glob("*.safetensors")):
        return None
    return locality_report(original, final_model, selected, routers_may_change, others_may_change)


@task(name="finish")
def finish(key: str) -> dict:
    surgery = _RUNS.pop(key)
    meta = surgery.finish()
    return {"output_dir": str(surgery.out), "metadata": str(surgery.out / METADATA),
            "final_model": str(surgery.out / "final_model"), "total_s": meta["timings"]["total_s"]}


def discard(key: str, error: BaseException) -> None:
    """Drops a failed run's model, recording the failure in its metadata."""
    surgery = _RUNS.pop(key, None)
    if surgery is not None:
        surgery.fail(error)
