"""python -m bench.score_agreement: how far `--score_memory streamed` reorders the experts.

    python -m bench.score_agreement --model build/organism/model \
        --records build/organism/surgery_records.json --params params.yaml [--seeds 42 43 44]

`exact` and `offload` score |sum of the batches' gradients|, `streamed` the sum of per-batch
|gradients| (an upper bound, equal for one batch). For each seed this runs the round-1 scoring
pass the surgery runs (the same record sample, SFT batches and `score_pass`) once per mode on
the unmodified model and compares each mode's [layers, experts] scores with exact's: Spearman
rank correlation over every expert, the share of exact's top-k the mode also selects, and the
per-expert ratio mode/exact. Settings come from `--params`' train section (the demo's batch
size, sample size, refusals, seed), then the flags. A measurement, not a test: the figures go
in docs/scale.md and bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from scipy.stats import spearmanr

from unsafe_experts.artefacts.checkpoints import load_base, load_tokenizer
from unsafe_experts.config import TrainConfig
from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.models.distributed import local_device
from unsafe_experts.records import load_records
from unsafe_experts.safe_yaml import load_yaml
from unsafe_experts.selection.methods import METHODS
from unsafe_experts.selection.score_pass import score_pass
from unsafe_experts.selection.scoring import top_k
from unsafe_experts.surgery import prepare_data

MODES = ("exact", "streamed", "offload")
KS = (2, 4, 8)


def mode_scores(model, layers, batches, method: str = "gradient") -> dict[str, torch.Tensor]:
    """[layers, experts] scores of one scoring pass per --score_memory mode, on the same
    batches and weights (scoring leaves the weights as they were)."""
    return {mode: score_pass(model, layers, batches, lambda *a: None, progress=False,
                             streamed=mode == "streamed", offload=mode == "offload",
                             score=method).cpu()
            for mode in MODES}


def agreement(reference: torch.Tensor, other: torch.Tensor, layers, ks=KS) -> dict:
    """How `other`'s [layers, experts] scores agree with `reference`'s: Spearman's rho over
    every expert; per k, |top-k of both| / k, the top-k taken as the surgery selects them
    (scoring.top_k, its tie order included); and other/reference per expert, over the experts
    the reference scores above 0 (an expert no token reached scores 0 in every mode)."""
    ref, oth = reference.flatten().double(), other.flatten().double()
    rho = float(spearmanr(ref.numpy(), oth.numpy()).statistic)
    overlap = {k: len(set(top_k(reference, k, layers)) & set(top_k(other, k, layers))) / k for k in ks}
    scored = ref > 0
    ratio = (oth[scored] / ref[scored]).tolist()
    return {"spearman": rho, "top_k_overlap": overlap, "experts": ref.numel(), "ratio_n": len(ratio),
            "ratio_min": min(ratio), "ratio_median": statistics.median(ratio), "ratio_max": max(ratio)}


def demo_config(params: str | None, **overrides) -> TrainConfig:
    """The surgery's config from a params file's train section (known keys only), then the
    given overrides; output_dir is never written (only the data preparation reads the config)."""
    train = load_yaml(Path(params).read_text()).get("train", {}) if params else {}
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in train.items() if k in known}
    values.update(output_dir=values.get("output_dir") or "unused",
                  **{k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate()


def measure(cfg: TrainConfig, seeds: list[int], model=None) -> list[dict]:
    """Per seed: the round-1 batches the surgery would build with that seed, each mode's
    scores and their agreement with exact's. The model is loaded once (as the surgery loads it,
    in eval mode) unless given: scoring does not change it."""
    if model is None:
        model = load_base(cfg.model_name, cfg.dtype, cfg.trust_remote_code,
                          cfg.experts_implementation).to(local_device(cfg.device)).eval()
    layers = moe_layers(model)
    tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
    loaded = load_records(cfg.dataset_path)
    rows = []
    for seed in seeds:
        seeded = replace(cfg, seed=seed)
        data = prepare_data(seeded, tokenizer, loaded)
        torch.manual_seed(seed)  # as Surgery.start: nothing in a scoring pass draws, but cheap
        t0 = time.time()
        scores = mode_scores(model, layers, data["sft"], cfg.method)
        rows.append({"seed": seed, "records": data["summary"]["records_used"],
                     "batches": len(data["sft"]), "seconds": time.time() - t0,
                     "top4": {m: top_k(s, 4, layers) for m, s in scores.items()},
                     **{m: agreement(scores["exact"], scores[m], layers) for m in MODES[1:]}})
    return rows


def table(rows: list[dict], ks=KS) -> str:
    head = (f"{'seed':>5} {'mode':>9} {'spearman':>9} "
            + " ".join(f"{'top' + str(k):>6}" for k in ks)
            + f" {'ratio min':>10} {'median':>8} {'max':>8}")
    lines = [head]
    for row in rows:
        for mode in MODES[1:]:
            a = row[mode]
            lines.append(f"{row['seed']:>5} {mode:>9} {a['spearman']:>9.4f} "
                         + " ".join(f"{a['top_k_overlap'][k]:>6.3f}" for k in ks)
                         + f" {a['ratio_min']:>10.4f} {a['ratio_median']:>8.4f} {a['ratio_max']:>8.4f}")
    return "\n".join(lines)


def figures(rows: list[dict], ks=KS) -> dict[str, float]:
    """Over the seeds: the mean and the worst of each agreement figure, the ratios' extremes."""
    out = {}
    for mode in MODES[1:]:
        rho = [r[mode]["spearman"] for r in rows]
        out[f"{mode}_spearman_mean"] = statistics.fmean(rho)
        out[f"{mode}_spearman_min"] = min(rho)
        for k in ks:
            share = [r[mode]["top_k_overlap"][k] for r in rows]
            out[f"{mode}_top{k}_overlap_mean"] = statistics.fmean(share)
            out[f"{mode}_top{k}_overlap_min"] = min(share)
        out[f"{mode}_ratio_min"] = min(r[mode]["ratio_min"] for r in rows)
        out[f"{mode}_ratio_median_mean"] = statistics.fmean(r[mode]["ratio_median"] for r in rows)
        out[f"{mode}_ratio_max"] = max(r[mode]["ratio_max"] for r in rows)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.score_agreement",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model directory (the demo organism's model/)")
    p.add_argument("--records", required=True, help="the surgery records")
    p.add_argument("--params", help="a params.yaml whose train section sets the run (default: the "
                   "engine's defaults)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--method", choices=[m for m, row in METHODS.items() if row.from_gradients])
    p.add_argument("--batch_size", type=int)
    p.add_argument("--max_samples", type=int)
    p.add_argument("--device")
    args = p.parse_args(argv)
    for name in ("model", "records"):
        if not Path(getattr(args, name)).exists():
            print(f"error: --{name}: {getattr(args, name)} does not exist", file=sys.stderr)
            sys.exit(2)
    cfg = demo_config(args.params, model_name=args.model, dataset_path=args.records,
                      method=args.method, batch_size=args.batch_size,
                      max_samples=args.max_samples, device=args.device)
    rows = measure(cfg, args.seeds)
    first = rows[0]["streamed"]
    print(f"round-1 {cfg.method} scores of {first['experts']} experts ({first['ratio_n']} scored "
          f"above 0), each mode vs exact; {len(rows)} seeds, batch_size {cfg.batch_size}, "
          f"max_samples {cfg.max_samples}, torch threads {torch.get_num_threads()}")
    for row in rows:
        print(f"seed {row['seed']}: {row['records']} records in {row['batches']} batches, "
              f"{row['seconds']:.1f} s for the {len(MODES)} passes; top-4 "
              + "; ".join(f"{m} " + " ".join(f"L{l}_E{e}" for l, e in row["top4"][m]) for m in MODES))
    print(table(rows))
    for name, value in figures(rows).items():
        print(f"{name} {value:.6f}")


if __name__ == "__main__":
    main()
