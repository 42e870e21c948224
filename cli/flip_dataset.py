"""`unsafe-experts flip-dataset OUT`: FlipAttack-style records from the bundled AdvBench goals,
built offline (a test input for `validate` and `train`)."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    flip = sub.add_parser("flip-dataset", help="FlipAttack-style records from AdvBench goals")
    flip.add_argument("out")
    flip.add_argument("--mode", default="chars", choices=("words", "chars", "sentence"))
    flip.add_argument("--n", type=int, default=None, help="first N goals (default all 520)")


def run(args) -> None:
    from unsafe_experts.attacks.flip import flip_records
    from unsafe_experts.data.bundled import advbench_goals

    goals = advbench_goals()[: args.n]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(flip_records(goals, args.mode), indent=1) + "\n")
    print(f"{len(goals)} FlipAttack-style records ({args.mode} flip) written to {args.out}")
