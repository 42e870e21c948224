"""The comparison's files: the tables, the statistics over seeds and the plots (the re-attacked
runs' too, where there are any), written beside the CSV and logged to an MLflow run named
`comparison`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tracking import mlflow_runs
from unsafe_experts.artefacts.atomic import write_bytes_atomic
from unsafe_experts.config import ConfigError
from unsafe_experts.selection.methods import PAIRED

from . import over_builds, robust_tables, tuning
from .plots import asr_plot, frontier_plot, recipe_frontier_plot, robust_frontier_plot
from .seed_stats import group_summary, paired
from .tables import (
    GROUP,
    KEYS,
    ablation_rows,
    add_family_means,
    add_unseen_mean,
    budget,
    latest_runs,
    markdown,
    metric_columns,
    overlap,
    retention_families,
    surgery_family,
)

# the re-attack's files beside comparison.csv (robust_tables)
ROBUST_FILES = {"robust_csv": "robustness_comparison.csv", "robust_paired": "robustness_paired.csv",
                "robust_frontier": "robust_frontier.png"}


def write_robustness(robust_dir: str | Path | None, folder: Path,
                     runs_root: str | Path = robust_tables.RUNS_ROOT) -> tuple[str, dict[str, Path]]:
    """The re-attacked runs' section of comparison.md and ROBUST_FILES in `folder`. Without a
    robust_dir, one line and no file; with one that holds no result, the line and the files
    empty (header-only tables, a plot that says so), so a pipeline that expects them finds them."""
    if robust_dir is None:
        return "No re-attacked runs were found (no comparison.robust_dir set).", {}
    table = robust_tables.result_rows(robust_dir, runs_root) if Path(robust_dir).is_dir() else None
    files = {key: folder / name for key, name in ROBUST_FILES.items()}
    if table is None or table.empty:
        table, text = pd.DataFrame(columns=robust_tables.COLUMNS), f"No re-attacked runs were found in {robust_dir}."
        tests, points = pd.DataFrame(columns=robust_tables.PAIRED_COLUMNS), robust_tables.frontier_points(table, {})
    else:
        columns = robust_tables.attack_columns(table)
        tests, left_out = robust_tables.paired_differences(table, columns)
        points = robust_tables.frontier_points(table, columns)
        text = robust_tables.markdown(table, columns, robust_tables.summary(table, columns), tests, left_out)
    write_bytes_atomic(files["robust_csv"], table.to_csv(index=False).encode())
    write_bytes_atomic(files["robust_paired"], tests.to_csv(index=False).encode())
    robust_frontier_plot(points, files["robust_frontier"])
    return text, files


def write_comparison(experiment: str, out_csv: str | Path, wanted: list[dict] | None = None,
                     ablation_dir: str | Path | None = None, robust_dir: str | Path | None = None,
                     runs_root: str | Path = robust_tables.RUNS_ROOT,
                     validation_dir: str | Path | None = None) -> dict:
    """comparison.csv, comparison.md, comparison_summary.csv, paired.csv, overlap.csv,
    builds.csv, builds_paired.csv (over_builds), tuned.csv and tuned_builds.csv (tuning: with
    `validation_dir`, each method's setting chosen on the validation split per build and over
    builds; empty without), asr_vs_k.png, frontier.png and frontier_by_recipe.png beside
    `out_csv` (and, with `robust_dir`, ROBUST_FILES: the compared runs re-attacked, their
    settings read under `runs_root`), and the same files on an MLflow run named `comparison`."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([latest_runs(experiment, wanted), ablation_rows(ablation_dir)], ignore_index=True)
    if table.empty or table["ablated"].all():
        raise ConfigError(f"no evaluated runs to compare in MLflow experiment {experiment!r}")
    table["ablated"] = table["ablated"].astype(bool)
    table = add_family_means(table.sort_values(KEYS, ignore_index=True))
    surgery = surgery_family(table)
    table = add_unseen_mean(table, surgery)
    metrics = metric_columns(table)
    columns = [*KEYS, "rounds", *metrics, "identify_s"]
    table = table.reindex(columns=list(dict.fromkeys([*columns, *table.columns])))
    means = group_summary(table, GROUP, metrics)
    tests = paired(table, *PAIRED, metrics)
    overlaps = overlap(table)
    build_metrics = over_builds.metrics(surgery)
    each_build = over_builds.per_build(table, build_metrics)
    builds = over_builds.summary(each_build, build_metrics)
    build_tests = pd.concat([over_builds.paired(table, build_metrics), over_builds.data_pairs(table, build_metrics)],
                            ignore_index=True)
    # the headline: each method's setting chosen on the validation split, reported on test
    validated = tuning.validation_runs(validation_dir, runs_root) if validation_dir else pd.DataFrame()
    chosen = tuning.choose(validated, surgery)
    tuned = tuning.tuned_table(chosen, means, surgery) if not chosen.empty else pd.DataFrame(columns=tuning.COLUMNS)
    tuned_builds = tuning.choose_over_builds(chosen, each_build, surgery)
    # first: a bad re-attack result stops the comparison before it writes its own files
    robust_text, robust_files = write_robustness(robust_dir, out_csv.parent, runs_root)
    files = {"csv": out_csv, "summary": out_csv.with_name("comparison_summary.csv"),
             "paired": out_csv.with_name("paired.csv"), "overlap": out_csv.with_name("overlap.csv"),
             "markdown": out_csv.with_suffix(".md"), "builds": out_csv.with_name("builds.csv"),
             "builds_paired": out_csv.with_name("builds_paired.csv"), "tuned": out_csv.with_name("tuned.csv"),
             "tuned_builds": out_csv.with_name("tuned_builds.csv"),
             **robust_files}
    table[columns].to_csv(files["csv"], index=False)
    means.to_csv(files["summary"], index=False)
    tests.to_csv(files["paired"], index=False)
    overlaps.to_csv(files["overlap"], index=False)
    write_bytes_atomic(files["builds"], builds.to_csv(index=False).encode())
    write_bytes_atomic(files["builds_paired"], build_tests.to_csv(index=False).encode())
    write_bytes_atomic(files["tuned"], tuned.to_csv(index=False).encode())
    write_bytes_atomic(files["tuned_builds"], tuned_builds.to_csv(index=False).encode())
    files["markdown"].write_text(tuning.markdown(tuned, chosen, tuned_builds) + "\n"
                                 + markdown(table, columns, means, tests, overlaps, retention_families(table, surgery),
                                          budget(table, surgery), surgery) + "\n" + over_builds.markdown(builds, build_tests)
                                 + "\n" + robust_text + "\n")
    files["plot"] = asr_plot(table, out_csv.with_name("asr_vs_k.png"))
    files["frontier"] = frontier_plot(means, out_csv.with_name("frontier.png"))
    files["recipe_frontier"] = recipe_frontier_plot(each_build, out_csv.with_name("frontier_by_recipe.png"))
    run_id = mlflow_runs.start_run(experiment, "comparison", {"runs": len(table)}, {"method": "comparison"})
    for path in files.values():
        mlflow_runs.log_file(run_id, path)
    mlflow_runs.end_run(run_id)
    return {"runs": len(table), "mlflow_run_id": run_id, **{k: str(v) for k, v in files.items()}}
