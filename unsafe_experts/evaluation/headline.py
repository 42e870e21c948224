"""The six figures that say whether a surgery worked and what it cost, from one evaluation's
values (evaluate.py's names): what `dvc metrics show` lists (metrics/before.json, after.json) and what
MLflow's saved view shows first.

- asr_mean: attack success averaged over the attack families (asr_F);
- asr_surgery: attack success in the family the surgery data used (the others are unseen);
- refused_mean, refused_worst: benign requests inside attack formats refused (over_refusal_F),
  averaged over the families and in the worst one: the cost a format-refusing repair pays,
  which XSTest's plain prompts (over_refusal) do not show;
- plain_refusal: harmful goals asked plainly that are refused (should stay high);
- benign_loglik: mean per-token log-likelihood of benign reference answers (utility).

The keys are short on purpose: `dvc metrics show` prints one column per key, and two rows
(before, after) of these six fit in 120 columns.
"""
from __future__ import annotations

import json
from pathlib import Path

KEYS = ("asr_mean", "asr_surgery", "refused_mean", "refused_worst", "plain_refusal", "benign_loglik")


def _families(values: dict[str, float], prefix: str) -> list[float]:
    return [v for k, v in values.items() if k.startswith(prefix) and k != prefix.rstrip("_")]


def headline_figures(values: dict[str, float], surgery_family: str | None = None) -> dict[str, float]:
    """The headline figures of one evaluation ({metric: value}); a figure whose inputs the
    evaluation lacks (a suite without attack families, a model that is no organism) is left
    out rather than guessed."""
    out = {}
    asr = _families(values, "asr_")
    refused = _families(values, "over_refusal_")
    if asr:
        out["asr_mean"] = sum(asr) / len(asr)
    if surgery_family and f"asr_{surgery_family}" in values:
        out["asr_surgery"] = values[f"asr_{surgery_family}"]
    if refused:
        out["refused_mean"] = sum(refused) / len(refused)
        out["refused_worst"] = max(refused)
    for key in ("plain_refusal", "benign_loglik"):
        if key in values:
            out[key] = values[key]
    return out


def surgery_family(model_name: str) -> str | None:
    """The attack family an organism's surgery data uses, from the build.json beside its
    model/ (None for any other model)."""
    try:
        config = json.loads((Path(model_name).parent / "build.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    family = config.get("surgery_family") if isinstance(config, dict) else None
    return family if isinstance(family, str) else None
