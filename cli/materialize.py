"""`unsafe-experts materialize OUTPUT_DIR --round N --out DIR`: a round's delta checkpoint
written out as a full checkpoint (config, tokenizer, safetensors)."""
from __future__ import annotations


def add_parser(sub) -> None:
    materialize = sub.add_parser("materialize", help="write a round's delta checkpoint out as a "
                                 "full checkpoint (config, tokenizer, safetensors)")
    materialize.add_argument("output_dir", help="the run's output_dir")
    materialize.add_argument("--round", type=int, required=True, help="which round_N/")
    materialize.add_argument("--out", required=True, help="the full checkpoint's directory "
                             "(must not exist, or be empty)")
    materialize.add_argument("--base", help="the base checkpoint, where it is not at the path "
                             "the manifest names (its weights digest must match)")
    materialize.add_argument("--trust_remote_code", action="store_true")


def run(args) -> None:
    from unsafe_experts.artefacts.checkpoints import materialize

    out = materialize(args.output_dir, args.round, args.out, args.base, args.trust_remote_code)
    print(f"round {args.round} of {args.output_dir} written in full to {out}")
