"""Statistics of the comparison over seeds: mean, spread and a 95% t interval per group, and a
paired test of two methods on the same seeds (an exact sign-flip permutation test: with 3
seeds its smallest two-sided p is 0.25, which the table shows rather than hides)."""
from __future__ import annotations

import itertools
import math

import pandas as pd
from scipy import stats


def t_interval(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return (values.mean() - half, values.mean() + half)


def group_summary(table: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: n, and for each metric its mean, sd (n-1) and 95% t interval over seeds."""
    rows = []
    for group, part in table.groupby(keys, dropna=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)), seeds=len(part))
        for m in metrics:
            low, high = t_interval(part[m])
            row.update({f"{m}_mean": part[m].mean(), f"{m}_sd": part[m].std(ddof=1),
                        f"{m}_ci_low": low, f"{m}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided p of the mean paired difference under random signs."""
    observed = abs(sum(diffs))
    flips = [abs(sum(s * d for s, d in zip(signs, diffs)))
             for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def paired(table: pd.DataFrame, a: str, b: str, metrics: list[str],
           by: tuple[str, ...] = ("k", "recipe", "organism_seed", "retention", "expert_lr", "defence")) -> pd.DataFrame:
    """Method a minus method b on the seeds both ran, per (k, organism recipe and build,
    retention, learning rate, defence): mean difference, its
    95% t interval, and the sign-flip p."""
    rows = []
    runs = table[~table["ablated"]] if "ablated" in table else table
    for group, part in runs.groupby(list(by), dropna=False):
        left = part[part.method == a].set_index("seed")
        right = part[part.method == b].set_index("seed")
        seeds = sorted(set(left.index) & set(right.index))
        if len(seeds) < 2:
            continue
        for m in metrics:
            diffs = (left.loc[seeds, m] - right.loc[seeds, m]).dropna()
            if len(diffs) < 2:
                continue
            low, high = t_interval(diffs)
            rows.append({**dict(zip(by, group)), "metric": m, "comparison": f"{a} - {b}",
                         "seeds": len(diffs), "mean_diff": diffs.mean(), "ci_low": low,
                         "ci_high": high, "sign_flip_p": sign_flip_p(list(diffs))})
    return pd.DataFrame(rows, columns=[*by, "metric", "comparison", "seeds", "mean_diff",
                                       "ci_low", "ci_high", "sign_flip_p"])
