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

from .tables import (
    ASR_MEAN,
    BUDGET,
    FORMAT_MEAN,
    GROUP,
    add_family_means,
    budget,
    default_setting,
    run_row,
    share_interval,
)

COLUMNS = ["method", "organism_seed", "chosen", "validated", "meets_on_validation", "validation_asr_mean",
           "validation_format_refused", "test_seeds", "test_asr_mean", "test_format_refused",
           "test_surgery_asr", "test_plain_refusal", "default", "default_test_asr_mean",
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
    for _, part in means.groupby(["method", "organism_seed"], dropna=False):
        ranked = part.sort_values(["meets", "failed", ASR_MEAN], ascending=[False, True, True])
        out.append(ranked.assign(chosen=[True] + [False] * (len(ranked) - 1)))
    return pd.concat(out, ignore_index=True)


def tuned_table(chosen: pd.DataFrame, test_means: pd.DataFrame, surgery: str | None) -> pd.DataFrame:
    """Per method and build: the chosen setting, its validation figures, its test figures (the
    comparison's mean over seeds), and the untuned default's test figures beside it."""
    rows = []
    for _, pick in chosen[chosen["chosen"]].iterrows():
        same = (test_means["method"] == pick["method"]) & (test_means["organism_seed"] == pick["organism_seed"])
        test = test_means[same]
        mine = test[(test[GROUP].fillna(-1) == pick[GROUP].fillna(-1)).all(axis=1)]
        default = test[(test["data"] == pick["data"]) & (test["setting"] == default_setting(pick["method"]))
                       & (test[list(DEFAULT)] == pd.Series(DEFAULT)).all(axis=1)]
        rows.append({"method": pick["method"], "organism_seed": pick["organism_seed"], "chosen": _label(pick),
                     "validated": int(((chosen["method"] == pick["method"])
                                       & (chosen["organism_seed"] == pick["organism_seed"])).sum()),
                     "meets_on_validation": bool(pick["meets"]),
                     "validation_asr_mean": pick[ASR_MEAN], "validation_format_refused": pick[FORMAT_MEAN],
                     **_test(mine, surgery), **_default(default)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _shown(means: pd.DataFrame, metric: str) -> str:
    """A share's mean over seeds with its t interval cut at [0, 1] (none for one seed)."""
    if means.empty or f"{metric}_mean" not in means:
        return "-"
    low, high = share_interval(means.iloc[:1], metric)
    interval = "" if pd.isna(low.iloc[0]) else f" [{low.iloc[0]:.3f}, {high.iloc[0]:.3f}]"
    return f"{means.iloc[0][f'{metric}_mean']:.3f}{interval}"


def _test(means: pd.DataFrame, surgery: str | None) -> dict:
    return {"test_seeds": int(means.iloc[0]["seeds"]) if not means.empty else 0,
            "test_asr_mean": _shown(means, ASR_MEAN), "test_format_refused": _shown(means, FORMAT_MEAN),
            "test_surgery_asr": _shown(means, f"asr_{surgery}") if surgery else "-",
            "test_plain_refusal": _shown(means, "plain_refusal")}


def _default(means: pd.DataFrame) -> dict:
    if means.empty:
        return {"default": "not run", "default_test_asr_mean": "-", "default_test_format_refused": "-"}
    return {"default": _label(means.iloc[0]), "default_test_asr_mean": _shown(means, ASR_MEAN),
            "default_test_format_refused": _shown(means, FORMAT_MEAN)}


def markdown(tuned: pd.DataFrame, chosen: pd.DataFrame) -> str:
    criteria = ", ".join(f"{k} {'>=' if k == 'plain_refusal' else '<='} {v:g}" for k, v in BUDGET.items())
    if tuned.empty:
        return ("## Tuned on validation\n\nNo validation results were found (the compare_validate "
                "stages write them).\n")
    grid = chosen.assign(setting_label=[_label(r) for _, r in chosen.iterrows()])[
        ["method", "organism_seed", "setting_label", "seeds", ASR_MEAN, FORMAT_MEAN, "meets", "fails", "chosen"]]
    return ("## Tuned on validation\n\n"
            "Per method and build, the setting chosen on the validation split (prompts disjoint "
            f"from the test sample of every other table): among the settings meeting the budget ({criteria}) "
            "on validation, the lowest mean ASR over families; when none meets it, the fewest failed "
            "criteria first. Its figures on test (mean over seeds [95% t interval]) beside the "
            "untuned default's (k 4, plain retention, lr 0.001).\n\n"
            + tuned.to_markdown(index=False, floatfmt=".3f")
            + "\n\nEvery validated setting (validation figures, mean over its seeds):\n\n"
            + grid.to_markdown(index=False, floatfmt=".3f") + "\n")
