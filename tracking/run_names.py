"""A surgery run's name, the same for MLflow's run and Prefect's flow run:
`<method>-k<k>-s<seed>` and then whatever else differs from the defaults among the settings a
comparison varies (params.yaml `comparison.runs`: organism, retention, learning rate, defence)
and the few others that change what a run repairs. Before issue #26 a finished comparison had
seven runs named `gradient-k4-s42`, told apart only by their parameters."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from unsafe_experts.config import TrainConfig

# (field, label): the label and the value name the difference, e.g. `lr0.001`, `kl-reverse`
VARIANTS = [("num_rounds", "r"), ("expert_lr", "lr"), ("shared_weights", "shared"),
            ("expert_dropout", "drop"), ("skip_router_training", "no-router"), ("kl_type", "kl-"),
            ("score_mode", ""), ("score_memory", ""), ("sft_epochs", "sft"), ("max_samples", "n"),
            ("final_checkpoint", "final-")]
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
DEFAULT_ORGANISM_SEED = 0  # unsafe_experts/attacks/organism.py OrganismConfig.seed


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _organism_seed(model_name) -> int | None:
    """The seed in build.json beside an organism's model/ (None for any other model)."""
    try:
        seed = json.loads((Path(str(model_name)).parent / "build.json").read_text())["config"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) else None


def _label(label: str, value) -> str:
    if isinstance(value, bool):  # every boolean variant is off by default
        return label
    if value is None:  # max_samples: every record
        return f"{label}all"
    return f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}"


def run_name(cfg) -> str:
    """The configuration in a name; `cfg` is a TrainConfig or its dict."""
    parts = [str(_get(cfg, "method", DEFAULTS["method"])), f"k{_get(cfg, 'top_k_experts', '?')}",
             f"s{_get(cfg, 'seed', DEFAULTS['seed'])}"]
    seed = _organism_seed(_get(cfg, "model_name", ""))
    if seed is not None and seed != DEFAULT_ORGANISM_SEED:
        parts.append(f"org-s{seed}")
    # comparison.tables.retention_mode: a run without a retention file retains nothing
    retention = _get(cfg, "retention", "plain") if _get(cfg, "retention_path") else "none"
    if retention != "plain":
        parts.append(f"ret-{retention}")
    for key, label in VARIANTS:
        value = _get(cfg, key, DEFAULTS[key])
        if value != DEFAULTS[key]:
            parts.append(_label(label, value))
    return "-".join(parts)
