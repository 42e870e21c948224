"""Scheduled and triggered pipeline runs (Prefect deployments).

`unsafe-experts serve` serves `pipeline-run` with the cron schedule of params.yaml and a
trigger on the event `unsafe-experts.dataset.validated`, which `unsafe-experts validate` emits
for every file that passes (with the file's path and digest), so new jailbreak data is
repaired against as soon as it is validated. Runs are serialized (a global concurrency limit
of 1): two never fight over an output directory or DVC's lock.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, runtime
from prefect.events import DeploymentEventTrigger

from flows.surgery import surgery_flow
from schemas.params import load_params, resolve_run

DATASET_EVENT = "unsafe-experts.dataset.validated"
DEPLOYMENT = "unsafe-experts"


def _run_name() -> str:
    """`pipeline-dataset-<digest>` for a triggered run, `pipeline-scheduled` otherwise."""
    try:
        digest = runtime.flow_run.parameters.get("dataset_digest")
    except Exception:  # a name is never worth failing a run over
        digest = None
    return f"pipeline-dataset-{digest[:12]}" if digest else "pipeline-scheduled"


@flow(name="pipeline-run", flow_run_name=_run_name)
def pipeline_run(params_path: str, dataset_path: str | None = None,
                 dataset_digest: str | None = None) -> dict:
    """The surgery with the parameters of a params.yaml; a triggered run takes the new dataset
    and writes to `<train.output_dir>-<digest>` so runs on different data never collide."""
    overrides = {}
    if dataset_path:
        base = load_params(params_path, check=False).train.output_dir
        overrides = {"dataset_path": dataset_path,
                     "output_dir": f"{base}-{(dataset_digest or 'new')[:12]}"}
    run = resolve_run(params_path, overrides)
    return surgery_flow(run.train, run.experiment, run.log_model, evaluation=run.evaluation,
                        progress=False, register_model=run.register_model)


def serve(params_path: str) -> None:
    params_path = str(Path(params_path).resolve())
    cron = load_params(params_path).schedule.cron
    trigger = DeploymentEventTrigger(
        expect={DATASET_EVENT},
        parameters={"params_path": params_path,
                    "dataset_path": "{{ event.resource['path'] }}",
                    "dataset_digest": "{{ event.resource['digest'] }}"},
    )
    pipeline_run.serve(name=DEPLOYMENT, cron=cron, triggers=[trigger], global_limit=1,
                       parameters={"params_path": params_path})
