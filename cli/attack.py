"""`unsafe-experts attack`: goals x attack families -> the target model's responses, judged,
as FlipAttack-format records for `validate` and `train` (engine: unsafe_experts/attacks/attack_model.py)."""
from __future__ import annotations

from pathlib import Path

from unsafe_experts.attacks.families import FAMILIES
from unsafe_experts.evaluation.evaluate import EvaluationConfig

from .flags import add_fields, field_values
from .loading import ENDPOINT_FIELDS


def add_parser(sub) -> None:
    p = sub.add_parser("attack", help="attack a model with attack families and write judged "
                       "surgery records")
    p.add_argument("--model", required=True, help="the target model (directory or hub id)")
    p.add_argument("--goals", required=True, help="harmful goals: .txt (one a line), .csv with a "
                   "`goal` column, or JSON / JSONL (strings, or objects with `goal`)")
    p.add_argument("--family", action="append", required=True, metavar="FAMILY",
                   help=f"attack family, repeatable or comma-separated: {', '.join(FAMILIES)}")
    p.add_argument("--out", required=True, help="records file to write (JSON)")
    p.add_argument("--judge", default="refusal", help="refusal (default), an inline YAML judge "
                   "such as '{llm: DIR, template: strongreject}' or "
                   "'{classifier: DIR, labels: {LABEL_1: complied, LABEL_0: refused}}', or a YAML "
                   "file holding one")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per attack "
                   "(default: 256)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts generated at once (default: 16)")
    p.add_argument("--limit", type=int, help="first N goals (default: all)")
    # the evaluation's own --endpoint / --served_model, so both commands document them alike
    add_fields(p, EvaluationConfig, dest="eval__", skip=tuple(
        f for f in EvaluationConfig.__dataclass_fields__ if f not in ENDPOINT_FIELDS))
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--quiet", action="store_true")


def run(args) -> None:
    from unsafe_experts.artefacts.atomic import write_json_atomic
    from unsafe_experts.attacks.attack_model import read_goals, run_attack
    from unsafe_experts.attacks.families import check_families
    from unsafe_experts.config import ConfigError
    from unsafe_experts.evaluation.evaluate import connect
    from unsafe_experts.evaluation.judges import judge_from_text, judge_name, load_judge
    from unsafe_experts.stats import shown

    from .loading import load_target

    for key in ("max_new_tokens", "batch_size", "limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key}: must be at least 1, got {getattr(args, key)}")
    # everything the user can get wrong is checked before a model loads
    families = check_families([f.strip() for given in args.family for f in given.split(",")])
    goals = read_goals(args.goals)[:args.limit]
    spec = judge_from_text(args.judge)
    given = field_values(args, EvaluationConfig, "eval__")
    endpoint = connect(EvaluationConfig(batch_size=args.batch_size, **given).validate())
    model, tokenizer = load_target(args.model, args.trust_remote_code, endpoint)
    judge = load_judge(spec, args.batch_size)
    records, summary = run_attack(model, tokenizer, goals, families, judge, judge_name(spec),
                                  args.max_new_tokens, args.batch_size, progress=not args.quiet,
                                  endpoint=endpoint)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, records)
    print(f"{'family':<20} {'ASR [95% interval]':<21} {'n':>5}  unparsed   (judge: {judge_name(spec)})")
    for family, m in summary.items():
        print(f"{family:<20} {shown(m):<21} {m['n']:>5}  {m['unparsed']:>8}")
    print(f"{len(records)} records written to {args.out}")
