"""`unsafe-experts report OUTPUT_DIR`: the identified experts per round of a finished run (with
the rounds' overlap and router KL), its evaluation and a legend of the metric names, from its
training_metadata.json."""
from __future__ import annotations

from .tables import evaluation_table, legend


def add_parser(sub) -> None:
    report = sub.add_parser("report", help="the identified experts per round of a finished run")
    report.add_argument("output_dir")


def run(args) -> None:
    from unsafe_experts.artefacts.run_metadata import RunRecord, expert_key

    record = RunRecord.load(args.output_dir)
    meta = record.data
    # the path on a line of its own: a long one pushed the rest past the terminal's width
    print(record.path)
    print(f"{meta['status']}, {meta['parameters']['score_mode']} scoring, model {meta['model']['class']}")
    print(f"{'round':>5}  {'k':>4}  {'jaccard':>7}  {'router KL':>19}  experts (highest score first)")
    previous = None
    for r, info in record.rounds().items():
        experts = set(info.experts)
        jaccard = f"{len(experts & previous) / len(experts | previous):.2f}" if previous else "-"
        kl = info.router_kl_before_after
        kl = f"{kl[0]:.2e} -> {kl[1]:.2e}" if kl else "-"
        print(f"{r:>5}  {len(experts):>4}  {jaccard:>7}  {kl:>19}  "
              f"{' '.join(expert_key(l, e) for l, e in info.experts)}")
        previous = experts
    if meta.get("evaluation"):
        print()
        print(evaluation_table(meta["evaluation"]))
        print()
        print("what the names mean (README: Metrics):")
        # the README's words for each figure next to the names the table prints
        print(legend(n for stage in meta["evaluation"].values() for n in stage))
