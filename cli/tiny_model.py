"""`unsafe-experts tiny-model OUT`: a tiny random MoE of one architecture and its tokenizer,
built offline (a test input)."""
from __future__ import annotations


def add_parser(sub) -> None:
    tiny = sub.add_parser("tiny-model", help="build a tiny random MoE + tokenizer offline")
    tiny.add_argument("out")
    # --family: the flag's first name, kept for the scripts and docs that use it
    tiny.add_argument("--architecture", "--family", dest="architecture", default="olmoe",
                      help="MoE architecture, the model_type of a transformers config")
    tiny.add_argument("--seed", type=int, default=0)


def run(args) -> None:
    from unsafe_experts.attacks.corpus import save_tiny
    from unsafe_experts.data.bundled import advbench_goals

    out = save_tiny(args.architecture, args.out, advbench_goals(), seed=args.seed)
    print(f"tiny {args.architecture} model and tokenizer written to {out}")
