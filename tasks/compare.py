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

COLUMNS = ["method", "k", "seed", "rounds", "asr_flip_words", "asr_flip_chars", "plain_refusal",
           "over_refusal", "benign_loglik", "identification_s", "peak_memory_mb"]
METRICS = {"asr_flip_words": "final/asr_flip_words", "asr_flip_chars": "final/asr_flip_chars",
           "plain_refusal": "final/plain_refusal", "over_refusal": "final/over_refusal",
           "benign_loglik": "final/benign_loglik", "identification_s": "identify_s",
           "peak_memory_mb": "identify_peak_memory_mb"}
SUMMARY = ["asr_flip_words", "asr_flip_chars", "plain_refusal", "over_refusal", "benign_loglik"]


def latest_runs(experiment: str, wanted: list[dict] | None = None) -> pd.DataFrame:
    """Finished parent runs, newest per (method, k, seed); only `wanted` ones when given."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise ConfigError(f"no finished runs in MLflow experiment {experiment!r}")
    runs = runs[runs.get("tags.mlflow.parentRunId", pd.Series(index=runs.index)).isna()]
    runs = runs[runs["metrics.final/asr_flip_words"].notna()] if "metrics.final/asr_flip_words" in runs else runs.iloc[:0]
    before = {m: runs.get(f"metrics.before/{m}") for m in SUMMARY}
    table = pd.DataFrame({
        "run_id": runs["run_id"], **{f"before_{m}": v for m, v in before.items() if v is not None}, "method": runs["tags.method"],
        "k": runs["params.top_k_experts"].astype(int), "seed": runs["params.seed"].astype(int),
        "rounds": runs["params.num_rounds"].astype(int),
        **{col: runs[f"metrics.{key}"] for col, key in METRICS.items()},
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
    grouped = table.groupby(["method", "k"])[SUMMARY]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_sd"))
    out["seeds"] = table.groupby(["method", "k"]).size()
    return out.reset_index()


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
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    ranked = table[~table.method.isin(["router_only", "all_experts"])]
    for ax, metric in zip(axes, ("asr_flip_words", "asr_flip_chars")):
        for method, rows in ranked.groupby("method"):
            stats = rows.groupby("k")[metric].agg(["mean", "std"]).fillna(0)
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=method)
        for method, style in (("router_only", ":"), ("all_experts", "--")):
            value = table.loc[table.method == method, metric]
            if len(value):
                ax.axhline(value.mean(), linestyle=style, color="grey", label=method)
        ax.set(xlabel="k (experts repaired per round)", title=metric, xscale="log")
    axes[0].set_ylabel("attack success rate after surgery")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def before_line(table: pd.DataFrame) -> str:
    """The organism before surgery (every run evaluates the same model on the same prompts)."""
    cols = [f"before_{m}" for m in SUMMARY if f"before_{m}" in table]
    if not cols:
        return "(no evaluation before surgery recorded)"
    values = table[cols].mean()
    return "Before surgery: " + ", ".join(f"{c[7:]} {values[c]:.3f}" for c in cols)


def markdown(table: pd.DataFrame, means: pd.DataFrame, overlaps: pd.DataFrame) -> str:
    def fmt(df):
        return df.to_markdown(index=False, floatfmt=".3f")
    return "\n\n".join([
        before_line(table),
        "## Every run (latest per method, k, seed)", fmt(table[COLUMNS]),
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
    table[COLUMNS].to_csv(out_csv, index=False)
    md = out_csv.with_suffix(".md")
    md.write_text(markdown(table, means, overlaps))
    overlaps.to_csv(out_csv.with_name("overlap.csv"), index=False)
    plot = asr_plot(table, out_csv.with_name("asr_vs_k.png"))
    run_id = tracking.start_run(experiment, "comparison", {"runs": len(table)}, {"method": "comparison"})
    for path in (out_csv, md, out_csv.with_name("overlap.csv"), plot):
        tracking.log_file(run_id, path)
    tracking.end_run(run_id)
    return {"runs": len(table), "csv": str(out_csv), "markdown": str(md), "mlflow_run_id": run_id}
