"""The side-by-side comparison of methods, read back from MLflow.

One row per (method, k, seed): the latest finished parent run of each, with its final
evaluation, identification time and peak memory. Random controls are also summarised as
mean and spread over seeds; the gradient and routing expert sets are compared per round
(Jaccard overlap, Spearman rank correlation of their scores).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from unsafe_experts.config import ConfigError

from . import tracking

# a parent run's evaluation figures are metrics whose latest value is after the last round;
# these come first, in this order, and any other attack family's asr_* / over_refusal_* after
SUMMARY = ["asr_flip_words", "asr_flip_chars", "plain_refusal", "over_refusal", "benign_loglik"]
OTHER = {"identification_s": "identify_s", "peak_memory_mb": "identify_peak_memory_mb"}
COLUMNS = ["method", "k", "seed", "rounds", *SUMMARY, *OTHER]


def evaluation_names(runs: pd.DataFrame) -> list[str]:
    """SUMMARY's names, then every other evaluation figure the runs have, sorted."""
    found = {c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")}
    extra = sorted(n for n in found if n.startswith(("asr_", "over_refusal")) and n not in SUMMARY
                   and not n.endswith(("_before", "_change")))
    return SUMMARY + extra


def latest_runs(experiment: str, wanted: list[dict] | None = None) -> pd.DataFrame:
    """Finished parent runs, newest per (method, k, seed); only `wanted` ones when given."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise ConfigError(f"no finished runs in MLflow experiment {experiment!r}")
    runs = runs[runs.get("tags.mlflow.parentRunId", pd.Series(index=runs.index)).isna()]
    asr = [c for c in runs.columns if c.startswith("metrics.asr_") and not c.endswith("_before")]
    runs = runs[runs[asr].notna().any(axis=1)] if asr else runs.iloc[:0]
    names = evaluation_names(runs)
    missing = pd.Series(np.nan, index=runs.index)
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        **{f"before_{m}": runs[f"metrics.{m}_before"] for m in names if f"metrics.{m}_before" in runs},
        "method": runs["tags.method"],
        "k": runs["params.top_k_experts"].astype(int), "seed": runs["params.seed"].astype(int),
        "rounds": runs["params.num_rounds"].astype(int),
        **{m: runs.get(f"metrics.{m}", missing) for m in names},
        **{col: runs.get(f"metrics.{key}", missing) for col, key in OTHER.items()},
    })
    # controls whose k means nothing are reported with the k they really trained
    table.loc[table["method"] == "router_only", "k"] = 0
    table = table.drop_duplicates(["method", "k", "seed"])
    if wanted:
        keys = {(w["method"], 0 if w["method"] == "router_only" else w["k"], w["seed"]) for w in wanted}
        table = table[[(m, k, s) in keys for m, k, s in zip(table["method"], table["k"], table["seed"])]]
    return table.sort_values(["method", "k", "seed"], ignore_index=True)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (method, k)."""
    figures = [c for c in columns(table)[4:] if c not in OTHER]
    grouped = table.groupby(["method", "k"])[figures]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_sd"))
    out["seeds"] = table.groupby(["method", "k"]).size()
    return out.reset_index()


def columns(table: pd.DataFrame) -> list[str]:
    """COLUMNS, with any further attack family's figures before the timings."""
    fixed = {"run_id", "method", "k", "seed", "rounds", *OTHER}
    figures = [c for c in table.columns if c not in fixed and not c.startswith("before_")]
    return ["method", "k", "seed", "rounds", *figures, *OTHER]


def _metadata(run_id: str) -> dict:
    path = tracking.client().download_artifacts(run_id, "training_metadata.json", tempfile.mkdtemp())
    return json.loads(Path(path).read_text())


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    keys = sorted(a)
    ra = pd.Series([a[k] for k in keys]).rank()
    rb = pd.Series([b[k] for k in keys]).rank()
    return float(np.corrcoef(ra, rb)[0, 1])


def overlap(table: pd.DataFrame) -> pd.DataFrame:
    """Per k and round: Jaccard of the gradient and routing expert sets, rank correlation of
    their scores over all experts (same seed; the first seed present when several)."""
    rows = []
    for k in sorted(set(table.loc[table.method == "gradient", "k"]) & set(table.loc[table.method == "routing", "k"])):
        grad = _metadata(table[(table.method == "gradient") & (table.k == k)].iloc[0]["run_id"])
        rout = _metadata(table[(table.method == "routing") & (table.k == k)].iloc[0]["run_id"])
        for r, g in grad["identified_experts_per_round"].items():
            o = rout["identified_experts_per_round"].get(r)
            if o:
                rows.append({"k": k, "round": int(r), "jaccard": tracking.jaccard(g["experts"], o["experts"]),
                             "spearman": spearman(g["scores"], o["scores"])})
    return pd.DataFrame(rows, columns=["k", "round", "jaccard", "spearman"])


def asr_plot(table: pd.DataFrame, path: Path) -> Path:
    families = [c for c in columns(table) if c.startswith("asr_")]
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.5), sharey=True, squeeze=False)
    axes = axes[0]
    ranked = table[~table.method.isin(["router_only", "all_experts"])]
    for ax, metric in zip(axes, families):
        for method, rows in ranked.groupby("method"):
            stats = rows.groupby("k")[metric].agg(["mean", "std"]).fillna(0)
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=method)
        for method, style in (("router_only", ":"), ("all_experts", "--")):
            value = table.loc[table.method == method, metric]
            if len(value):
                ax.axhline(value.mean(), linestyle=style, color="grey", label=method)
        ax.set(xlabel="k (experts repaired per round)", title=metric, xscale="log")
    axes[0].set_ylabel("attack success rate after surgery")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def before_line(table: pd.DataFrame) -> str:
    """The organism before surgery (every run evaluates the same model on the same prompts)."""
    cols = [c for c in table.columns if c.startswith("before_")]
    if not cols:
        return "(no evaluation before surgery recorded)"
    values = table[cols].mean()
    return "Before surgery: " + ", ".join(f"{c[7:]} {values[c]:.3f}" for c in cols)


def markdown(table: pd.DataFrame, means: pd.DataFrame, overlaps: pd.DataFrame) -> str:
    def fmt(df):
        return df.to_markdown(index=False, floatfmt=".3f")
    return "\n\n".join([
        before_line(table),
        "## Every run (latest per method, k, seed)", fmt(table[columns(table)]),
        "## Mean and spread over seeds", fmt(means),
        "## Gradient vs routing expert sets", fmt(overlaps) if len(overlaps) else "(no pair)",
    ]) + "\n"


def write_comparison(experiment: str, out_csv: str | Path, wanted: list[dict] | None = None) -> dict:
    """comparison.csv, comparison.md, overlap.csv and asr_vs_k.png beside `out_csv`, and the
    same files on an MLflow run named `comparison`."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table = latest_runs(experiment, wanted)
    if table.empty:
        raise ConfigError(f"no evaluated runs to compare in MLflow experiment {experiment!r}")
    means, overlaps = summary(table), overlap(table)
    table[columns(table)].to_csv(out_csv, index=False)
    md = out_csv.with_suffix(".md")
    md.write_text(markdown(table, means, overlaps))
    overlaps.to_csv(out_csv.with_name("overlap.csv"), index=False)
    plot = asr_plot(table, out_csv.with_name("asr_vs_k.png"))
    run_id = tracking.start_run(experiment, "comparison", {"runs": len(table)}, {"method": "comparison"})
    for path in (out_csv, md, out_csv.with_name("overlap.csv"), plot):
        tracking.log_file(run_id, path)
    tracking.end_run(run_id)
    return {"runs": len(table), "csv": str(out_csv), "markdown": str(md), "mlflow_run_id": run_id}
