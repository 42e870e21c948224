"""`unsafe-experts compare`: one table of methods, k and seeds from the MLflow runs, through the
comparison flow (the runs and ablation files a params file names, or every finished run)."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    compare = sub.add_parser("compare", help="one table of methods, k and seeds from MLflow runs")
    compare.add_argument("--params", help="take the experiment and the runs from this params.yaml")
    compare.add_argument("--experiment", help="MLflow experiment (default: unsafe-experts)")
    compare.add_argument("--out", default="metrics/comparison.csv")


def run(args) -> None:
    from flows.compare import compare_flow
    from flows.temporary_server import start_temporary_server

    experiment, runs, ablation_dir = args.experiment, None, None
    if args.params:
        from schemas.params import load_params

        comparison = load_params(args.params).comparison
        experiment, runs = experiment or comparison.experiment, [r.model_dump() for r in comparison.runs]
        ablation_dir = comparison.ablation_dir
    start_temporary_server()
    result = compare_flow(experiment or "unsafe-experts", args.out, runs, ablation_dir)
    print(Path(result["markdown"]).read_text())
    print(f"{result['runs']} runs compared: {result['csv']}, {result['markdown']}; "
          f"MLflow run {result['mlflow_run_id']}")
