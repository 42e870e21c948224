"""The repair re-attacked as a Prefect flow: one task per attack, then the report (plots, the
table, the surgery's MLflow run). The models are loaded and every input checked by the caller
(tasks.robustness.register) before the flow starts."""
from __future__ import annotations

from prefect import flow

from tasks import robustness as steps


@flow(name="robustness")
def robustness_flow(key: str, names: list[str], out: str | None = None, plots_dir: str | None = None,
                    experiment: str | None = None, run_dir: str | None = None) -> dict:
    for name in names:
        steps.attack(key, name, out)
    return steps.report(key, out, plots_dir, experiment, run_dir)
