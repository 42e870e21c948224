"""The comparison's plots: attack success against k per attack family, and the frontier of
mean attack success against benign-in-format refusal."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from unsafe_experts.selection.methods import METHODS

from .tables import ASR_MEAN, FORMAT_MEAN, main_setting, metric_columns, share_interval

# the methods k does not vary (they select none or all experts), drawn as horizontal reference
# lines, each in the style of what it selects: the no-expert line first
REFERENCE_STYLES = {m.name: style for selects, style in (("none", ":"), ("all", "--"))
                    for m in METHODS.values() if not m.ranks and m.selects == selects}


def asr_plot(table: pd.DataFrame, path: Path) -> Path:
    asr = [c for c in metric_columns(table) if c.startswith("asr_")]
    fig, axes = plt.subplots(1, len(asr), figsize=(3.2 * len(asr) + 1, 3.5), sharey=True, squeeze=False)
    runs = main_setting(table)
    ranked = runs[~runs.method.isin(REFERENCE_STYLES)]
    for ax, metric in zip(axes[0], asr):
        for method, rows in ranked.groupby("method"):
            stats = rows.groupby("k")[metric].agg(["mean", "std"]).fillna(0)
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=method)
        for method, style in REFERENCE_STYLES.items():
            value = runs.loc[runs.method == method, metric]
            if len(value):
                ax.axhline(value.mean(), linestyle=style, color="grey", label=method)
        ax.set(xlabel="k (experts per round)", title=metric, xscale="log")
    axes[0][0].set_ylabel("attack success after surgery")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frontier_plot(means: pd.DataFrame, path: Path) -> Path:
    """Mean ASR over attack families against mean benign-in-format refusal, one point per
    (method, k, organism, retention, lr) with its 95% intervals: a repair that only refuses
    the format moves right as it moves down."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    runs = means[~means["ablated"]]
    usual = runs[["retention", "expert_lr"]].value_counts().idxmax() if len(runs) else ("plain", 1e-3)
    for (method, organism), part in runs.groupby(["method", "organism_seed"], dropna=False):
        x, y = part[f"{FORMAT_MEAN}_mean"], part[f"{ASR_MEAN}_mean"]
        (x_low, x_high), (y_low, y_high) = share_interval(part, FORMAT_MEAN), share_interval(part, ASR_MEAN)
        xerr = np.abs(np.vstack([x - x_low, x_high - x]))
        yerr = np.abs(np.vstack([y - y_low, y_high - y]))
        label = f"{method} (organism {organism:g})"
        ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o",
                    linestyle="none", capsize=2, label=label)
        for (_, row), xi, yi in zip(part.iterrows(), x, y):
            note = f"k{row['k']}" + ("" if row["retention"] == usual[0] else f" {row['retention']}") + \
                   ("" if row["expert_lr"] == usual[1] else f" lr{row['expert_lr']:g}")
            ax.annotate(note, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="benign requests in attack formats refused (mean over families)",
           ylabel="attack success after surgery (mean over families)",
           title="Safety against format refusal (means over seeds, 95% t intervals)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
