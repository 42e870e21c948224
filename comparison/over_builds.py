"""Claims over organism builds (issue 25): an organism built with another seed, or on another
CPU, is another organism, and a figure measured on one build says little about the next. Each
setting's seed mean is taken per build; the builds are then the sample: mean, 95% t interval
and range over builds, and each method paired with the gradient method build by build, with
whether the difference has one sign in every build (the claims that hold in every build)."""
from __future__ import annotations

import pandas as pd

from unsafe_experts.selection.methods import METHODS, PAIRED

from .seed_stats import sign_flip_p, t_interval
from .tables import ASR_MEAN, FORMAT_MEAN, UNSEEN_MEAN, default_setting

# what a build repeats (builds of another recipe are another sample); `data` last: data_pairs
# pairs over it
SETTING = ["recipe", "method", "k", "retention", "expert_lr", "defence", "setting", "data"]
BY = ["k", "recipe", "retention", "expert_lr", "defence", "data"]  # what a pair of methods shares
SUMMARY_COLUMNS = [*SETTING, "metric", "builds", "seeds_per_build", "mean", "ci_low", "ci_high", "min", "max"]
PAIRED_COLUMNS = [*BY, "metric", "comparison", "builds", "seeds_per_build", "per_build", "mean_diff",
                  "ci_low", "ci_high", "sign_flip_p", "every_build"]


def metrics(surgery: str | None) -> list[str]:
    """The issue's headline figures: surgery-family ASR, mean ASR and mean benign-in-format
    refusal over the families, plain refusal, benign log-likelihood."""
    return [*([f"asr_{surgery}"] if surgery else []), ASR_MEAN, UNSEEN_MEAN, FORMAT_MEAN, "plain_refusal",
            "benign_loglik"]


def per_build(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per setting and build: the mean over that build's seeds of each metric."""
    runs = table[~table["ablated"]] if "ablated" in table else table
    runs = runs[runs["organism_seed"].notna()]
    names = [m for m in names if m in runs]
    rows = []
    for key, part in runs.groupby([*SETTING, "organism_seed"], dropna=False):
        rows.append({**dict(zip([*SETTING, "organism_seed"], key)), "seeds": tuple(sorted(part["seed"])),
                     **{m: part[m].mean() for m in names}})
    return pd.DataFrame(rows, columns=[*SETTING, "organism_seed", "seeds", *names])


def summary(builds: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per setting seen on at least two builds and metric: the builds' mean, t interval, range."""
    rows = []
    for key, part in builds.groupby(SETTING, dropna=False):
        if len(part) < 2:
            continue
        for m in (m for m in names if m in part):
            low, high = t_interval(part[m])
            rows.append({**dict(zip(SETTING, key)), "metric": m, "builds": len(part),
                         "seeds_per_build": ",".join(str(len(s)) for s in part["seeds"]),
                         "mean": part[m].mean(), "ci_low": low, "ci_high": high,
                         "min": part[m].min(), "max": part[m].max()})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def paired(table: pd.DataFrame, names: list[str], ours: str = PAIRED[0]) -> pd.DataFrame:
    """`ours` minus every other method of the same retention, learning rate and defence, build
    by build: per build the difference of the two seed means there (the build is the pairing
    unit: a random draw's seed and a surgery seed are not the same thing); a ranking method is
    matched at the same k, a control that ranks nothing (all experts, all weights) at its own.
    Over the builds both ran (at least two): mean, t interval, sign-flip p, and whether every
    build's difference has the same sign (none zero)."""
    runs = table[~table["ablated"]] if "ablated" in table else table
    runs = runs[runs["organism_seed"].notna()]
    rows = []
    for key, part in runs.groupby(BY[1:], dropna=False):
        for k in sorted(set(part.loc[part.method == ours, "k"])):
            mine = part[(part.method == ours) & (part.k == k) & (part.setting == default_setting(ours))]
            for other, setting in sorted(set(zip(part.method, part.setting)) - {(ours, default_setting(ours))}):
                ranks = other not in METHODS or METHODS[other].ranks
                theirs = part[(part.method == other) & (part.setting == setting) & ((part.k == k) if ranks else True)]
                # a method at its default setting is named alone, as before the setting column
                named = other if setting == default_setting(other) else f"{other} ({setting})"
                label = f"{ours} - {named}" if ranks else f"{ours} k{k} - {named}"
                for m in (m for m in names if m in part):
                    rows += _pair(mine, theirs, m, {"k": k, **dict(zip(BY[1:], key))}, label)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def data_pairs(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Each setting run on other surgery data minus the same setting on the fewest families
    (the organism's own records), build by build, as `paired` does for methods."""
    runs = table[~table["ablated"]] if "ablated" in table else table
    runs = runs[runs["organism_seed"].notna()]
    rows = []
    for key, part in runs.groupby(SETTING[:-1], dropna=False):
        setting = dict(zip(SETTING[:-1], key))
        data = sorted(set(part["data"]), key=lambda d: (len(d.split("+")), d))
        for other in data[1:]:
            label = f"{setting['method']} on {other} - on {data[0]}"
            for m in (m for m in names if m in part):
                rows += _pair(part[part["data"] == other], part[part["data"] == data[0]], m,
                              {**{b: setting[b] for b in BY if b in setting}, "data": other}, label)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _pair(mine: pd.DataFrame, theirs: pd.DataFrame, metric: str, keys: dict, label: str) -> list[dict]:
    diffs, seeds = {}, {}
    for build in sorted(set(mine.organism_seed) & set(theirs.organism_seed)):
        a, b = mine[mine.organism_seed == build], theirs[theirs.organism_seed == build]
        diffs[build] = a[metric].mean() - b[metric].mean()
        seeds[build] = f"{len(a)}/{len(b)}"
    if len(diffs) < 2:
        return []
    values = pd.Series(diffs)
    low, high = t_interval(values)
    return [{**keys, "metric": metric, "comparison": label, "builds": len(values),
             "seeds_per_build": ",".join(seeds.values()), "per_build": " ".join(f"{v:+.3f}" for v in values),
             "mean_diff": values.mean(), "ci_low": low, "ci_high": high, "sign_flip_p": sign_flip_p(list(values)),
             "every_build": bool((values > 0).all() or (values < 0).all())}]


def markdown(means: pd.DataFrame, tests: pd.DataFrame) -> str:
    """The comparison.md section: settings over builds, then the pairs with their per-build
    differences; '-' where a setting ran on one build only."""
    if means.empty and tests.empty:
        return "## Over organism builds\n\nNo setting ran on two or more organism builds.\n"
    shown = means.assign(**{"mean [95% over builds]": [
        f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for _, r in means.iterrows()],
        "range": [f"{r['min']:.3f} to {r['max']:.3f}" for _, r in means.iterrows()]})
    pairs = tests.assign(**{"mean diff [95% over builds]": [
        f"{r['mean_diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" for _, r in tests.iterrows()],
        "holds in every build": ["yes" if v else "no" for v in tests["every_build"]]})
    return ("## Over organism builds\n\n"
            "Each setting's mean over its seeds, per organism build; the builds are the sample "
            "(seeds per build listed). An interval over builds is what a new build (another seed, "
            "another CPU) should expect; the within-build intervals above are narrower.\n\n"
            + shown[[*SETTING, "metric", "builds", "seeds_per_build", "mean [95% over builds]", "range"]]
            .to_markdown(index=False)
            + "\n\nPaired build by build (per build, the difference of the two seed means; "
              "`per_build`: each build's difference, in organism-seed order; sign-flip p over builds):\n\n"
            + pairs[[*BY, "metric", "comparison", "builds", "per_build", "mean diff [95% over builds]",
                     "sign_flip_p", "holds in every build"]].to_markdown(index=False, floatfmt=".3f") + "\n")
