"""`unsafe-experts`: train (the surgery), tiny-model and flip-dataset (offline demo inputs)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .adapters import UnsupportedModelError
from .config import DTYPES, SCORE_MODES, ConfigError, TrainConfig
from .examples import ExampleError
from .records import DatasetError
from .router_kl import KL_TYPES

USER_ERRORS = (ConfigError, DatasetError, ExampleError, UnsupportedModelError, OSError)


def _train_parser(sub) -> None:
    d = TrainConfig("", "", "")
    p = sub.add_parser("train", help="identify unsafe experts by gradient and repair them")
    p.add_argument("--model_name", required=True, help="hub id or local directory")
    p.add_argument("--dataset_path", required=True, help="JSON list or JSONL of jailbreak records")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_rounds", type=int, default=d.num_rounds)
    p.add_argument("--top_k_experts", type=int, default=d.top_k_experts)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--expert_lr", type=float, default=d.expert_lr)
    p.add_argument("--router_lr", type=float, default=d.router_lr)
    p.add_argument("--max_samples", type=int, default=d.max_samples)
    p.add_argument("--skip_router_training", action="store_true")
    p.add_argument("--kl_type", choices=KL_TYPES, default=d.kl_type)
    p.add_argument("--score_mode", choices=SCORE_MODES, default=d.score_mode,
                   help="accumulate: one top-k from gradients summed over all batches, then "
                        "masked SFT; per_batch: a fresh top-k and step on every batch")
    p.add_argument("--sft_epochs", type=int, default=d.sft_epochs)
    p.add_argument("--router_epochs", type=int, default=d.router_epochs)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--max_length", type=int, default=d.max_length)
    p.add_argument("--truncation", choices=("middle", "left"), default=d.truncation,
                   help="where a too-long prompt is cut (the response never is)")
    p.add_argument("--refusal", action="append", dest="refusals", metavar="TEXT",
                   help="safe response; repeat to cycle several over the records")
    p.add_argument("--no_judge_filter", action="store_true",
                   help="keep records with judge_success_gpt4 == 0")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train(args) -> None:
    from transformers.utils import logging as hf_logging

    from .surgery import run_surgery

    if args.quiet:
        hf_logging.disable_progress_bar()
    options = {k: v for k, v in vars(args).items() if k not in ("command", "no_judge_filter", "quiet")}
    options["refusals"] = args.refusals or TrainConfig("", "", "").refusals
    cfg = TrainConfig(**options, require_judge_success=not args.no_judge_filter)
    meta = run_surgery(cfg, progress=not args.quiet)
    print(f"done: {cfg.output_dir}/final_model, {cfg.output_dir}/training_metadata.json "
          f"({meta['timings']['total_s']:.1f}s)")


def _tiny_model(args) -> None:
    from .advbench import advbench_goals
    from .tiny import save_tiny

    out = save_tiny(args.family, args.out, advbench_goals(), seed=args.seed)
    print(f"tiny {args.family} model and tokenizer written to {out}")


def _flip_dataset(args) -> None:
    from .advbench import advbench_goals
    from .flip import flip_records

    goals = advbench_goals()[: args.n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(flip_records(goals, args.mode), indent=1) + "\n")
    print(f"{len(goals)} FlipAttack-style records ({args.mode} flip) written to {args.out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unsafe-experts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    tiny = sub.add_parser("tiny-model", help="build a tiny random MoE + tokenizer offline")
    tiny.add_argument("out")
    tiny.add_argument("--family", default="olmoe")
    tiny.add_argument("--seed", type=int, default=0)
    flip = sub.add_parser("flip-dataset", help="FlipAttack-style records from AdvBench goals")
    flip.add_argument("out")
    flip.add_argument("--mode", default="chars", choices=("words", "chars", "sentence"))
    flip.add_argument("--n", type=int, default=None, help="first N goals (default all 520)")
    args = parser.parse_args(argv)
    handler = {"train": _train, "tiny-model": _tiny_model, "flip-dataset": _flip_dataset}[args.command]
    try:
        handler(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
