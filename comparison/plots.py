"""The comparison's plots: attack success against k per attack family, the frontier of mean
attack success against benign-in-format refusal, and the re-attacked runs' frontier (success of
the router attack against the same refusal)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from unsafe_experts.artefacts.atomic import write_bytes_atomic
from unsafe_experts.selection.methods import METHODS

from .robust_tables import BEFORE_SETTING
from .seed_stats import t_interval
from .tables import ASR_MEAN, FORMAT_MEAN, default_setting, main_setting, metric_columns, share_interval

# the methods k does not vary (they select none or all experts), drawn as horizontal reference
# lines, each in the style of what it selects: the no-expert line first
REFERENCE_STYLES = {m.name: style for selects, style in (("none", ":"), ("all", "--"))
                    for m in METHODS.values() if not m.ranks and m.selects == selects}


def _save(fig, path: Path) -> Path:
    """The figure as a PNG written whole (never half a file), then closed."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


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
    for (method, name, organism), part in runs.groupby(["method", "recipe", "organism_seed"], dropna=False):
        x, y = part[f"{FORMAT_MEAN}_mean"], part[f"{ASR_MEAN}_mean"]
        (x_low, x_high), (y_low, y_high) = share_interval(part, FORMAT_MEAN), share_interval(part, ASR_MEAN)
        xerr = np.abs(np.vstack([x - x_low, x_high - x]))
        yerr = np.abs(np.vstack([y - y_low, y_high - y]))
        label = f"{method} (organism {organism:g}" + (f", {name})" if isinstance(name, str) and name else ")")
        ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o",
                    linestyle="none", capsize=2, label=label)
        for (_, row), xi, yi in zip(part.iterrows(), x, y):
            note = f"k{row['k']}" + ("" if row["retention"] == usual[0] else f" {row['retention']}") + \
                   ("" if row["expert_lr"] == usual[1] else f" lr{row['expert_lr']:g}") + \
                   ("" if row.get("defence", "none") == "none" else f" {row['defence']}")
            ax.annotate(note, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="benign requests in attack formats refused (mean over families)",
           ylabel="attack success after surgery (mean over families)",
           title="Safety against format refusal (means over seeds, 95% t intervals)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def recipe_frontier_plot(each_build: pd.DataFrame, path: Path) -> Path:
    """One panel per organism recipe: each (method, k) at the usual retention, learning rate,
    defence, data and method setting, its mean over builds of the per-build seed means
    (over_builds.per_build) of benign-in-format refusal and ASR, 95% t intervals over builds:
    does the frontier move with the organism's capacity?"""
    runs = each_build
    if len(runs):
        usual = runs[["retention", "expert_lr", "defence", "data"]].value_counts().idxmax()
        runs = runs[(runs[["retention", "expert_lr", "defence", "data"]] == pd.Series(
            usual, index=["retention", "expert_lr", "defence", "data"])).all(axis=1)]
        runs = runs[[s == default_setting(m) if m in METHODS else True for m, s in zip(runs["method"], runs["setting"])]]
    recipes = sorted(set(runs["recipe"])) if len(runs) else [""]
    fig, axes = plt.subplots(1, len(recipes), figsize=(5.5 * len(recipes) + 2, 4.8), sharex=True, sharey=True,
                             squeeze=False)
    methods = sorted(set(runs["method"])) if len(runs) else []
    for ax, name in zip(axes[0], recipes):
        part = runs[runs["recipe"] == name] if len(runs) else runs
        for (method, k), points in part.groupby(["method", "k"]):
            x, y = points[FORMAT_MEAN], points[ASR_MEAN]
            (x_low, x_high), (y_low, y_high) = t_interval(x), t_interval(y)
            ax.errorbar(x.mean(), y.mean(), capsize=2, marker="o", linestyle="none",
                        color=f"C{methods.index(method) % 10}",
                        xerr=[[np.nan_to_num(x.mean() - x_low)], [np.nan_to_num(x_high - x.mean())]],
                        yerr=[[np.nan_to_num(y.mean() - y_low)], [np.nan_to_num(y_high - y.mean())]])
            ax.annotate(f"k{k} ({len(points)} builds)", (x.mean(), y.mean()), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(title=name or "no organism recipe", xlabel="benign requests in attack formats refused (mean)",
               xlim=(-0.03, 1.03), ylim=(-0.03, 1.03))
    axes[0][0].set_ylabel("attack success after surgery (mean over families)")
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="none", label=m)
               for i, m in enumerate(methods)]
    if handles:
        axes[0][-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        axes[0][0].text(0.5, 0.5, "no runs over builds found", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("The frontier per organism recipe (mean over builds, 95% t intervals over builds)", fontsize=10)
    return _save(fig, path)


# one marker shape per organism in the re-attack frontier
ORGANISM_MARKERS = "osD^vP<>"


def robust_frontier_plot(points: pd.DataFrame, path: Path) -> Path:
    """Each re-attacked run (robust_tables.frontier_points): ASR under the strongest router
    attack it faced against benign-in-format refusal with no attack, 95% Wilson intervals;
    colour per setting, shape per organism, the organisms attacked alone marked "before". A
    repair that the router attack undoes sits high whatever its cost."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    organisms = list(dict.fromkeys(points["organism"]))
    settings = sorted(s for s in set(points["setting"]) if s != BEFORE_SETTING)
    colours = {s: f"C{i % 10}" for i, s in enumerate(settings)}
    for _, p in points.iterrows():
        before = p["setting"] == BEFORE_SETTING
        xerr = np.nan_to_num([[p["x"] - p["x_low"]], [p["x_high"] - p["x"]]])
        yerr = np.nan_to_num([[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]])
        ax.errorbar(p["x"], p["y"], xerr=np.abs(xerr), yerr=np.abs(yerr), capsize=2, linestyle="none", alpha=0.8,
                    marker="*" if before else ORGANISM_MARKERS[organisms.index(p["organism"]) % len(ORGANISM_MARKERS)],
                    markersize=12 if before else 6, color="black" if before else colours[p["setting"]])
        if before:
            ax.annotate(f"before ({p['organism']})", (p["x"], p["y"]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="none", label=s) for s, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=ORGANISM_MARKERS[i % len(ORGANISM_MARKERS)], linestyle="none",
                           label=o) for i, o in enumerate(organisms)]
    if points.empty:
        ax.text(0.5, 0.5, "no re-attacked runs found", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="benign requests in attack formats refused, no attack",
           ylabel="ASR under the strongest router attack",
           title="Re-attacked repairs: router-attack ASR against format refusal\n(one point per run, 95% Wilson intervals)")
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)
