"""What `make demo` prints last: where each of its results can be opened, with the MLflow
address of the surgery's saved runs view (its experiment's id read from the store, so the link
is this store's) and the command that shows the Prefect flow runs the demo kept.

    python scripts/where_to_look.py [--experiment unsafe-experts]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tracking import mlflow_runs  # noqa: E402

MLFLOW_ADDRESS = "http://127.0.0.1:5000/"  # `mlflow ui`'s default
PREFECT_ADDRESS = "http://127.0.0.1:4200/runs"  # `prefect server start`'s default


def lines(experiment: str, bin_dir: str = ".venv/bin") -> list[str]:
    found = mlflow_runs.client().get_experiment_by_name(experiment)
    view = (MLFLOW_ADDRESS + mlflow_runs.run_table_url(found.experiment_id) if found
            else f"(no MLflow experiment {experiment!r} in {mlflow_runs.tracking_uri()} yet)")
    return [
        "Where to look:",
        "  the re-attack    metrics/robustness.md (plots: metrics/robustness/)",
        f"  the surgery      {bin_dir}/unsafe-experts report outputs/gradient",
        f"  DVC metrics      {bin_dir}/dvc metrics show   (the headline, before and after surgery;",
        f"                   a variant beside it: {bin_dir}/dvc exp run --temp -S train.top_k_experts=6,",
        f"                   then {bin_dir}/dvc exp show)",
        f"  MLflow           {bin_dir}/mlflow ui --backend-store-uri {mlflow_runs.tracking_uri()}",
        f"                   then open {view}",
        f"  Prefect          {bin_dir}/prefect server start   (the demo's flow runs are kept in its",
        f"                   local database), then open {PREFECT_ADDRESS}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="unsafe-experts", help="the surgery's MLflow experiment")
    args = parser.parse_args(argv)
    print("\n".join(lines(args.experiment)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
