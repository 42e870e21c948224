"""The comparison of methods as a Prefect flow: read the runs back from MLflow, write the
table, the overlap of expert sets and the ASR-against-k plot, the compared runs re-attacked
(`robust_dir`, each run's settings under `runs_root`) and each method tuned on the validation
split (`validation_dir`)."""
from __future__ import annotations

from prefect import flow, task

from comparison.outputs import write_comparison
from comparison.robust_tables import RUNS_ROOT

compare_task = task(write_comparison, name="compare-methods", retries=2, retry_delay_seconds=2)


@flow(name="compare-methods")
def compare_flow(experiment: str, out_csv: str = "metrics/comparison.csv",
                 runs: list[dict] | None = None, ablation_dir: str | None = None,
                 robust_dir: str | None = None, runs_root: str = RUNS_ROOT,
                 validation_dir: str | None = None) -> dict:
    return compare_task(experiment, out_csv, runs, ablation_dir, robust_dir, runs_root, validation_dir)
