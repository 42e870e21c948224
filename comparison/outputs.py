"""The comparison's files: the tables, the statistics over seeds and the plots, written beside
the CSV and logged to an MLflow run named `comparison`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tracking import mlflow_runs
from unsafe_experts.config import ConfigError
from unsafe_experts.selection.methods import PAIRED

from .plots import asr_plot, frontier_plot
from .seed_stats import group_summary, paired
from .tables import (
    GROUP,
    KEYS,
    ablation_rows,
    add_family_means,
    budget,
    latest_runs,
    markdown,
    metric_columns,
    overlap,
    retention_families,
    surgery_family,
)


def write_comparison(experiment: str, out_csv: str | Path, wanted: list[dict] | None = None,
                     ablation_dir: str | Path | None = None) -> dict:
    """comparison.csv, comparison.md, comparison_summary.csv, paired.csv, overlap.csv,
    asr_vs_k.png and frontier.png beside `out_csv`, and the same files on an MLflow run named `comparison`."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([latest_runs(experiment, wanted), ablation_rows(ablation_dir)], ignore_index=True)
    if table.empty or table["ablated"].all():
        raise ConfigError(f"no evaluated runs to compare in MLflow experiment {experiment!r}")
    table["ablated"] = table["ablated"].astype(bool)
    table = add_family_means(table.sort_values(KEYS, ignore_index=True))
    metrics = metric_columns(table)
    columns = [*KEYS, "rounds", *metrics, "identify_s"]
    table = table.reindex(columns=list(dict.fromkeys([*columns, *table.columns])))
    means = group_summary(table, GROUP, metrics)
    tests = paired(table, *PAIRED, metrics)
    overlaps = overlap(table)
    files = {"csv": out_csv, "summary": out_csv.with_name("comparison_summary.csv"),
             "paired": out_csv.with_name("paired.csv"), "overlap": out_csv.with_name("overlap.csv"),
             "markdown": out_csv.with_suffix(".md")}
    table[columns].to_csv(files["csv"], index=False)
    means.to_csv(files["summary"], index=False)
    tests.to_csv(files["paired"], index=False)
    overlaps.to_csv(files["overlap"], index=False)
    surgery = surgery_family(table)
    files["markdown"].write_text(markdown(table, columns, means, tests, overlaps, retention_families(table, surgery),
                                          budget(table, surgery), surgery))
    files["plot"] = asr_plot(table, out_csv.with_name("asr_vs_k.png"))
    files["frontier"] = frontier_plot(means, out_csv.with_name("frontier.png"))
    run_id = mlflow_runs.start_run(experiment, "comparison", {"runs": len(table)}, {"method": "comparison"})
    for path in files.values():
        mlflow_runs.log_file(run_id, path)
    mlflow_runs.end_run(run_id)
    return {"runs": len(table), "mlflow_run_id": run_id, **{k: str(v) for k, v in files.items()}}
