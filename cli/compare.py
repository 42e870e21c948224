"""`unsafe-experts compare`: one table of methods, k and seeds from the MLflow runs, through the
comparison flow (the runs, ablation files and re-attack results a params file names, or every
finished run)."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    compare = sub.add_parser("compare", help="one table of methods, k and seeds from MLflow runs")
    compare.add_argument("--params", help="take the experiment and the runs from this params.yaml")
    compare.add_argument("--experiment", help="MLflow experiment (default: unsafe-experts)")
    compare.add_argument("--out", default="metrics/comparison.csv")


def robust_inputs(comparison) -> dict:
    """The re-attack's folder and the compared runs' root from the params' comparison section,
    read with defaults: a params schema without these keys means no re-attack section."""
    from comparison.robust_tables import RUNS_ROOT

    return {"robust_dir": getattr(comparison, "robust_dir", None),
            "runs_root": getattr(comparison, "robust_runs_root", None) or RUNS_ROOT}


def run(args) -> None:
    from flows.compare import compare_flow
    from flows.temporary_server import start_temporary_server

    experiment, runs, ablation_dir, robust = args.experiment, None, None, {}
    if args.params:
        from schemas.params import load_params

        comparison = load_params(args.params).comparison
        experiment, runs = experiment or comparison.experiment, [r.model_dump() for r in comparison.runs]
        ablation_dir = comparison.ablation_dir
        robust = {**robust_inputs(comparison), "validation_dir": getattr(comparison, "validation_dir", None)}
    start_temporary_server()
    result = compare_flow(experiment or "unsafe-experts", args.out, runs, ablation_dir, **robust)
    print(Path(result["markdown"]).read_text())
    print(f"{result['runs']} runs compared: {result['csv']}, {result['markdown']}; "
          f"MLflow run {result['mlflow_run_id']}")
