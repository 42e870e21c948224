"""`unsafe-experts organism OUT`: build the jailbroken demo MoE and its data offline, from a
params file's `organism` section or the built-in recipe."""
from __future__ import annotations

import json
from dataclasses import replace


def add_parser(sub) -> None:
    organism = sub.add_parser("organism", help="build the jailbroken demo MoE and its data offline")
    organism.add_argument("out")
    organism.add_argument("--small", action="store_true", help="the test-sized organism")
    organism.add_argument("--seed", type=int, default=None,
                          help="organism seed (default 0, or the params file's; given, it overrides that)")
    organism.add_argument("--params", help="take the `organism` section of this params.yaml")
    organism.add_argument("--recipe", help="with --params: this comparison.recipes entry's keys over "
                                           "the `organism` section (e.g. a larger organism)")
    organism.add_argument("--quiet", action="store_true")


def run(args) -> None:
    from unsafe_experts.attacks.organism import OrganismConfig
    from unsafe_experts.attacks.organism import build_organism as build
    from unsafe_experts.config import ConfigError

    if args.recipe and not args.params:
        raise ConfigError("--recipe: needs --params (the recipes are params.yaml's comparison.recipes)")
    if args.params:
        from schemas.params import load_params

        cfg = load_params(args.params).organism_config(args.recipe)
        if args.seed is not None:  # a second organism of the same recipe (`make compare`)
            cfg = replace(cfg, seed=args.seed)
    else:
        args.seed = 0 if args.seed is None else args.seed
        cfg = OrganismConfig.small(seed=args.seed) if args.small else OrganismConfig(seed=args.seed)
    out = build(args.out, cfg, progress=not args.quiet)
    info = json.loads((out / "build.json").read_text())
    print(f"organism written to {out}: {info['examples']} examples, loss "
          f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}, {info['seconds']:.0f}s")
