"""python -m bench.families: the organism per attack family, and the surgery's effect on it.

    python -m bench.families organism OUT [--params params.yaml | --small]
    python -m bench.families evaluate MODEL EVAL_SET [--limit N] [--out metrics.json]
    python -m bench.families surgery ORGANISM OUT --retention none|plain|contrastive \
        [--params params.yaml] [--limit N] [--before METRICS.json]

`organism` builds one and prints its build time; `evaluate` prints per family ASR and benign
refusal (each with n and 95% interval); `surgery` runs the engine (no Prefect, no MLflow) with
params.yaml's train section on ORGANISM's files and the given retention mode, then evaluates
the final model (beside the organism's figures from an earlier `evaluate --out`, with
`--before`). A measurement, not a test: the numbers go in the README.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from unsafe_experts.artefacts.checkpoints import load_checkpoint
from unsafe_experts.attacks.organism import OrganismConfig, build_organism
from unsafe_experts.config import TrainConfig
from unsafe_experts.evaluation.evaluate import EvaluationConfig, evaluate
from unsafe_experts.evaluation.suites import load_eval_set
from unsafe_experts.safe_yaml import load_yaml
from unsafe_experts.surgery import run_surgery


def _cell(m: dict) -> str:
    return f"{m['value']:.3f} [{m['ci95'][0]:.2f},{m['ci95'][1]:.2f}] n={m['n']}"


def table(columns: dict[str, dict]) -> str:
    """Families as rows; for each model, ASR and benign-in-family refusal."""
    first = next(iter(columns.values()))
    families = [k[4:] for k in first if k.startswith("asr_")]
    head = "family".ljust(20) + "".join(f"{name + ' ' + kind:>36}" for name in columns
                                        for kind in ("asr", "benign refused"))
    rows = [head]
    for f in families:
        rows.append(f.ljust(20) + "".join(
            f"{_cell(m[key]):>36}" for m in columns.values()
            for key in (f"asr_{f}", f"over_refusal_{f}") if key in m) )
    for key in ("plain_refusal", "over_refusal"):
        rows.append(key.ljust(20) + "".join(f"{_cell(m[key]):>36}{'':>36}" for m in columns.values()))
    return "\n".join(rows)


def _evaluate(model_dir, eval_set, limit):
    model, tokenizer = load_checkpoint(model_dir)  # a delta final_model/ too
    t0 = time.time()
    metrics = evaluate(model, tokenizer, load_eval_set(eval_set), EvaluationConfig(limit=limit))["metrics"]
    print(f"evaluated {model_dir} in {time.time() - t0:.0f}s")
    return metrics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.families")
    p.add_argument("command", choices=("organism", "evaluate", "surgery"))
    p.add_argument("paths", nargs="+")
    p.add_argument("--params")
    p.add_argument("--small", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument("--retention", default="plain")
    p.add_argument("--out")
    p.add_argument("--before", help="the organism's metrics, from `evaluate --out`")
    p.add_argument("--retention_path", help="instead of ORGANISM/retention.json")
    args = p.parse_args(argv)
    params = load_yaml(Path(args.params).read_text()) if args.params else {}
    if args.command == "organism":
        cfg = (OrganismConfig.small() if args.small
               else OrganismConfig(**params.get("organism", {})))
        out = build_organism(args.paths[0], cfg, progress=False)
        build = json.loads((out / "build.json").read_text())
        print(f"built {out}: {build['examples']} examples, training {build['train_seconds']:.0f}s, "
              f"total {build['seconds']:.0f}s wall, {build['cpu_seconds']:.0f}s CPU")
        return
    if args.command == "evaluate":
        results = {"model": _evaluate(args.paths[0], args.paths[1], args.limit)}
    else:
        org, out = Path(args.paths[0]), Path(args.paths[1])
        known = {f.name for f in fields(TrainConfig)}
        train = {k: v for k, v in params.get("train", {}).items() if k in known}
        train.update(model_name=str(org / "model"), dataset_path=str(org / "surgery_records.json"),
                     output_dir=str(out), retention=args.retention, overwrite=True,
                     retention_path=None if args.retention == "none"
                     else args.retention_path or str(org / "retention.json"))
        t0 = time.time()
        meta = run_surgery(TrainConfig(**train), progress=False)
        print(f"surgery ({args.retention}) in {time.time() - t0:.0f}s; retention {meta.get('retention')}")
        eval_set = org / "eval_set.json"
        results = json.loads(Path(args.before).read_text()) if args.before else {}
        results = {"before": results["model"]} if results else {}
        results[args.retention] = _evaluate(out / "final_model", eval_set, args.limit)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
