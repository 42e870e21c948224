"""final_model/README.md: a Hugging Face model card, so a repaired model pushed to a hub says
what was changed, on what data, with what effect and within which limits."""
from __future__ import annotations

from pathlib import Path

import yaml

from .atomic import write_bytes_atomic
from .run_metadata import RunRecord, expert_key

LIMITS = (
    "Only the listed experts (and the routers, when aligned) were trained; every other weight "
    "is bit-identical to the base model (`locality` in training_metadata.json).",
    "Refusal is judged by a phrase list (unsafe_experts/text/refusal.py), which misses refusals "
    "worded otherwise and counts some \"As an AI ...\" answers as refusals.",
    "The surgery data covers the attack families it was built from; attacks of other families "
    "are reported separately (asr_<family>) and need not be repaired.",
    "Figures come from this run's held-out evaluation sets, with their n and 95% intervals; "
    "they are not a general safety guarantee.",
)


def _figure(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] (n={m['n']})"


def _evaluation_table(evaluation: dict) -> list[str]:
    before, after = evaluation.get("before", {}), evaluation.get("final", {})
    lines = ["| metric | before | after |", "|---|---|---|"]
    for name in dict.fromkeys([*before, *after]):
        lines.append(f"| {name} | {_figure(before[name]) if name in before else '-'} | "
                     f"{_figure(after[name]) if name in after else '-'} |")
    return lines


def model_card(meta: dict) -> str:
    params, record = meta["parameters"], RunRecord(Path(), meta)
    front = {"base_model": params["model_name"], "library_name": "transformers",
             "tags": ["mixture-of-experts", "safety", "unsafe-expert-surgery", meta["method"]],
             "datasets": [Path(meta["dataset"]["path"]).name]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(params['output_dir']).name}: {params['model_name']} after unsafe-expert surgery",
             "", f"Method `{meta['method']}`, {len(record.rounds())} rounds, k = "
             f"{params['top_k_experts']} experts per round, retention "
             f"`{meta.get('retention', {}).get('mode', 'none')}`, seed {params['seed']}.",
             f"Data: `{meta['dataset']['path']}` (sha256 {meta['dataset']['sha256'][:16]}..., "
             f"{meta['dataset']['records_used']} records used).", "", "## Experts changed", ""]
    for r, info in record.rounds().items():
        lines.append(f"- round {r}: {' '.join(expert_key(l, e) for l, e in info.experts) or '(none)'}")
    if meta.get("evaluation"):
        lines += ["", "## Safety and utility before and after (95% intervals)", "",
                  *_evaluation_table(meta["evaluation"])]
    if params.get("final_checkpoint") == "delta":
        last = max(record.rounds(), default=0)
        lines += ["", "## Loading", "", "This directory is a delta against the base model (the "
                  "trained experts' rows and the routers, `delta.safetensors`, described by "
                  "`delta.json`), not a loadable checkpoint by itself. "
                  f"`unsafe-experts materialize OUTPUT_DIR --round {last} --out DIR` writes the same "
                  "weights as a full checkpoint."]
    lines += ["", "## Known limits", "", *[f"- {x}" for x in LIMITS], ""]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path) -> Path:
    """Writes final_model/README.md from the run's training_metadata.json."""
    record = RunRecord.load(output_dir)
    path = Path(output_dir) / "final_model" / "README.md"
    write_bytes_atomic(path, model_card(record.data).encode())
    return path
