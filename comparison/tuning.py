"""Tuning without peeking (issue 25): each method's setting (k, retention mode, learning rate, its
own parameters) chosen on the validation split of the held-out prompts, then reported on test.

The validation split (`unsafe-experts evaluate --eval_split validation`, stats.subset) draws its
prompts from those the test sample leaves out, so a choice made on it never sees a prompt the
other tables report. The compare_validate stages evaluate compared runs' final models on it
(<validation_dir>/<organism>/<run>.json) and each organism before surgery
(<validation_dir>/<organism>.json), the budget's "before".

The rule, per method and organism build: among the settings whose validation figures (the mean
over the setting's seeds) meet the harm-vs-format budget, the one that lets the fewest attacks
through (mean ASR over families); when none meets it, the one that fails the fewest criteria,
then the same. Its test figures come from the comparison's own groups, beside the untuned
default's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from unsafe_experts.artefacts.run_metadata import METADATA
from unsafe_experts.config import ConfigError

from . import over_builds
from .seed_stats import t_interval
from .tables import (
    ASR_MEAN,
    BUDGET,
    FORMAT_MEAN,
    GROUP,
    UNSEEN_MEAN,
    add_family_means,
    add_unseen_mean,
    budget,
    default_setting,
    run_row,
    share_interval,
)

COLUMNS = ["method", "recipe", "organism_seed", "chosen", "validated", "meets_on_validation", "validation_asr_mean",
           "validation_format_refused", "test_seeds", "test_asr_mean", "test_format_refused",
           "test_surgery_asr", "test_plain_refusal", "test_benign_loglik", "default", "default_test_asr_mean",
           "default_test_format_refused"]
BUILD = ["method", "recipe", "organism_seed"]  # what one choice is made for
# a setting, whatever the build (a choice over builds is made among these)
SETTING = [k for k in GROUP if k != "organism_seed"]
BUILDS_COLUMNS = ["method", "recipe", "chosen", "builds", "meets_on_validation_in", "validation_asr_mean",
                  "validation_unseen_asr",
                  "chosen_per_build", "same_every_build", "test_builds", "test_asr_mean", "test_format_refused",
                  "test_surgery_asr", "test_unseen_asr", "test_plain_refusal", "test_benign_loglik",
                  "default_test_asr_mean",
                  "default_test_format_refused"]
# the setting a method runs with when nothing is tuned: params.yaml's run_defaults, k = 4
DEFAULT = {"k": 4, "retention": "plain", "expert_lr": 1e-3, "defence": "none"}


def _metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not an `unsafe-experts evaluate --out` result ({type(e).__name__}: {e})") from None


def validation_runs(validation_dir: str | Path, runs_root: str | Path) -> pd.DataFrame:
    """One row per validated run, keyed as the comparison keys it (its training_metadata.json
    under runs_root), its validation figures as the run's final figures and its organism's own
    validation figures as `before_`; empty when nothing was validated."""
    rows = []
    for path in sorted(Path(validation_dir).glob("*/*.json")) if Path(validation_dir).is_dir() else []:
        organism, run = path.parent.name, path.stem
        before = path.parent.parent / f"{organism}.json"
        if not before.is_file():
            raise ConfigError(f"{before}: missing; the budget compares {path} with the organism before "
                              "surgery on the same prompts (the compare_validate_organism stage writes it)")
        meta_path = Path(runs_root) / organism / run / METADATA
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{meta_path}: the validated run's settings are not readable ({type(e).__name__})") from None
        row = run_row(f"{organism}/{run}", {**meta, "evaluation": {"final": _metrics(path), "before": _metrics(before)}})
        if row:
            rows.append(row)
    return add_family_means(pd.DataFrame(rows)) if rows else pd.DataFrame()


def _label(row) -> str:
    parts = [f"k{row['k']}", str(row["retention"]), f"lr{row['expert_lr']:g}"]
    return " ".join(parts + ([row["setting"]] if isinstance(row["setting"], str) and row["setting"] else []))


def choose(validated: pd.DataFrame, surgery: str | None) -> pd.DataFrame:
    """Per method and build, every validated setting (GROUP, averaged over its seeds) with its
    budget check on validation, the chosen one first (`chosen` true)."""
    if validated.empty:
        return pd.DataFrame()
    # each setting's ASR over the families no validated run's data saw, shown beside the
    # budget (which bounds the surgery family only)
    validated = add_unseen_mean(validated.copy(), surgery)
    numeric = [c for c in validated if c not in GROUP and pd.api.types.is_numeric_dtype(validated[c])
               and c not in ("seed", "ablated")]
    means = validated.groupby(GROUP, dropna=False)[numeric].mean().reset_index()
    means["seeds"] = validated.groupby(GROUP, dropna=False).size().values
    checks = budget(means.assign(seed=0), surgery)
    if checks.empty:
        raise ConfigError("the validation results hold no figures before surgery to check the budget against")
    means["meets"], means["fails"] = checks["meets"].values, checks["fails"].values
    means["failed"] = [len([f for f in fails.split(", ") if f]) for fails in means["fails"]]
    out = []
    for _, part in means.groupby(BUILD, dropna=False):
        ranked = part.sort_values(["meets", "failed", ASR_MEAN], ascending=[False, True, True])
        out.append(ranked.assign(chosen=[True] + [False] * (len(ranked) - 1)))
    return pd.concat(out, ignore_index=True)


def tuned_table(chosen: pd.DataFrame, test_means: pd.DataFrame, surgery: str | None) -> pd.DataFrame:
    """Per method and build: the chosen setting, its validation figures, its test figures (the
    comparison's mean over seeds), and the untuned default's test figures beside it."""
    rows = []
    for _, pick in chosen[chosen["chosen"]].iterrows():
        test = test_means[(test_means[BUILD] == pick[BUILD]).all(axis=1)]
        mine = _same(test, pick, GROUP)
        default = test[(test["data"] == pick["data"]) & (test["setting"] == default_setting(pick["method"]))
                       & (test[list(DEFAULT)] == pd.Series(DEFAULT)).all(axis=1)]
        rows.append({**pick[BUILD].to_dict(), "chosen": _label(pick),
                     "validated": int((chosen[BUILD] == pick[BUILD]).all(axis=1).sum()),
                     "meets_on_validation": bool(pick["meets"]),
                     "validation_asr_mean": pick[ASR_MEAN], "validation_format_refused": pick[FORMAT_MEAN],
                     **_test(mine, surgery), **_default(default)})
    return pd.DataFrame(rows, columns=COLUMNS)


def choose_over_builds(chosen: pd.DataFrame, test_builds: pd.DataFrame, surgery: str | None) -> pd.DataFrame:
    """Per method and recipe, one setting for every build: among the settings validated on at
    least two builds, the one meeting the budget on validation in the most builds, then failing
    the fewest criteria (mean over builds), then the lowest mean ASR; its test figures are the
    mean over builds of each build's seed mean [95% t interval over builds] (`test_builds`:
    over_builds.per_build), the untuned default's beside it, and each build's own choice (does
    tuning pick the same setting in every build?)."""
    if chosen.empty:
        return pd.DataFrame(columns=BUILDS_COLUMNS)
    rows = []
    for (method, recipe), part in chosen.groupby(["method", "recipe"], dropna=False):
        settings = part.groupby(SETTING, dropna=False).agg(
            builds=("organism_seed", "nunique"), meets_in=("meets", "sum"), failed=("failed", "mean"),
            asr=(ASR_MEAN, "mean"), unseen=(UNSEEN_MEAN if UNSEEN_MEAN in part else ASR_MEAN, "mean")).reset_index()
        settings = settings[settings["builds"] >= 2]
        if settings.empty:
            continue
        pick = settings.sort_values(["meets_in", "failed", "asr"], ascending=[False, True, True]).iloc[0]
        per_build = part[part["chosen"]].sort_values("organism_seed")
        test = _same(test_builds, pick, over_builds.SETTING)
        default = _same(test_builds, {**pick.to_dict(), **DEFAULT, "setting": default_setting(method)},
                        over_builds.SETTING)
        rows.append({"method": method, "recipe": recipe, "chosen": _label(pick), "builds": int(pick["builds"]),
                     "meets_on_validation_in": int(pick["meets_in"]), "validation_asr_mean": pick["asr"],
                     "validation_unseen_asr": pick["unseen"] if UNSEEN_MEAN in part else float("nan"),
                     "chosen_per_build": " | ".join(f"{b:g}: {_label(r)}" for b, r in
                                                    zip(per_build["organism_seed"], per_build.to_dict("records"))),
                     "same_every_build": per_build.apply(_label, axis=1).nunique() == 1,
                     "test_builds": len(test), "test_asr_mean": _over(test, ASR_MEAN),
                     "test_format_refused": _over(test, FORMAT_MEAN),
                     "test_surgery_asr": _over(test, f"asr_{surgery}") if surgery else "-",
                     "test_unseen_asr": _over(test, UNSEEN_MEAN), "test_plain_refusal": _over(test, "plain_refusal"),
                     "test_benign_loglik": _over(test, "benign_loglik", share=False),
                     "default_test_asr_mean": _over(default, ASR_MEAN),
                     "default_test_format_refused": _over(default, FORMAT_MEAN)})
    return pd.DataFrame(rows, columns=BUILDS_COLUMNS)


def _same(table: pd.DataFrame, setting, keys: list[str]) -> pd.DataFrame:
    """The rows of `table` with the setting's values in `keys` (NaN matching NaN)."""
    if table.empty:
        return table
    wanted = pd.Series({k: setting[k] for k in keys})
    return table[(table[keys].fillna(-1) == wanted.fillna(-1)).all(axis=1)]


def _over(builds: pd.DataFrame, metric: str, share: bool = True) -> str:
    """A figure's mean over builds [95% t interval over builds, a share's cut at [0, 1]] (n = 1:
    no interval)."""
    if builds.empty or metric not in builds:
        return "-"
    low, high = t_interval(builds[metric])
    if share:
        low, high = max(low, 0), min(high, 1)
    return f"{builds[metric].mean():.3f}" + ("" if pd.isna(low) else f" [{low:.3f}, {high:.3f}]")


def _shown(means: pd.DataFrame, metric: str, share: bool = True) -> str:
    """A figure's mean over seeds with its t interval, a share's cut at [0, 1] (none for one seed)."""
    if means.empty or f"{metric}_mean" not in means:
        return "-"
    low, high = (share_interval(means.iloc[:1], metric) if share
                 else (means.iloc[:1][f"{metric}_ci_low"], means.iloc[:1][f"{metric}_ci_high"]))
    interval = "" if pd.isna(low.iloc[0]) else f" [{low.iloc[0]:.3f}, {high.iloc[0]:.3f}]"
    return f"{means.iloc[0][f'{metric}_mean']:.3f}{interval}"


def _test(means: pd.DataFrame, surgery: str | None) -> dict:
    return {"test_seeds": int(means.iloc[0]["seeds"]) if not means.empty else 0,
            "test_asr_mean": _shown(means, ASR_MEAN), "test_format_refused": _shown(means, FORMAT_MEAN),
            "test_surgery_asr": _shown(means, f"asr_{surgery}") if surgery else "-",
            "test_plain_refusal": _shown(means, "plain_refusal"),
            # utility: the reference answers' mean log-likelihood (not a share: no cut)
            "test_benign_loglik": _shown(means, "benign_loglik", share=False)}


def _default(means: pd.DataFrame) -> dict:
    if means.empty:
        return {"default": "not run", "default_test_asr_mean": "-", "default_test_format_refused": "-"}
    return {"default": _label(means.iloc[0]), "default_test_asr_mean": _shown(means, ASR_MEAN),
            "default_test_format_refused": _shown(means, FORMAT_MEAN)}


def markdown(tuned: pd.DataFrame, chosen: pd.DataFrame, tuned_builds: pd.DataFrame | None = None) -> str:
    criteria = ", ".join(f"{k} {'>=' if k == 'plain_refusal' else '<='} {v:g}" for k, v in BUDGET.items())
    if tuned.empty:
        return ("## Tuned on validation\n\nNo validation results were found (the compare_validate "
                "stages write them).\n")
    grid = chosen.assign(setting_label=[_label(r) for _, r in chosen.iterrows()])[
        ["method", "recipe", "organism_seed", "setting_label", "seeds", ASR_MEAN,
         *([UNSEEN_MEAN] if UNSEEN_MEAN in chosen else []), FORMAT_MEAN, "meets", "fails", "chosen"]]
    over = ("(no setting was validated on two or more builds)" if tuned_builds is None or tuned_builds.empty
            else tuned_builds.to_markdown(index=False, floatfmt=".3f"))
    return ("## Tuned on validation\n\n"
            "Per method, one setting for every build, chosen on the validation split (prompts "
            f"disjoint from the test sample of every other table): among the settings validated on two "
            f"or more builds, the one meeting the budget ({criteria}) on validation in the most builds, "
            "then failing the fewest criteria, then the lowest mean ASR over families. Its figures on "
            "test are the mean over builds of each build's seed mean [95% t interval over builds], "
            "beside the untuned default's (k 4, plain retention, lr 0.001); `chosen_per_build`: what "
            "each build alone would pick.\n\n" + over
            + "\n\n### Per build\n\nPer method and build, the setting chosen on that build's validation "
            "split by the same rule, with its test figures (mean over seeds [95% t interval]).\n\n"
            + tuned.to_markdown(index=False, floatfmt=".3f")
            + "\n\nEvery validated setting (validation figures, mean over its seeds):\n\n"
            + grid.to_markdown(index=False, floatfmt=".3f") + "\n")
