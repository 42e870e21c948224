"""Which experts the contrastive score would pick at other weights, from the two score tables a
contrastive run records (its round 1: both sides measured on the unrepaired organism), with no
new surgery: per run and weight, the top k, how many of them the plain gradient score (weight 0)
also picks, and the picks' mean harm and benign-in-format signal (each over its mean over every
expert, so 1.0 is an average expert), and the rank correlation of the two sides.

    python scripts/contrast_weights.py outputs/compare/*/contrastive-k4-s42-plain-lr0.001
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unsafe_experts.artefacts.atomic import write_bytes_atomic  # noqa: E402
from unsafe_experts.selection.contrastive import contrast, normalised  # noqa: E402

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def weights_table(run: Path, weights=WEIGHTS, k: int | None = None) -> pd.DataFrame:
    meta = json.loads((run / "training_metadata.json").read_text())
    first = meta["identified_experts_per_round"]["1"]
    if "contrast_harm" not in first:
        raise ValueError(f"{run}: round 1 has no contrast_harm table (not a contrastive run)")
    harm = pd.Series(first["contrast_harm"])
    benign = pd.Series(first["contrast_benign"]).reindex(harm.index)
    k = k or len(first["experts"])
    # the surgery's own definition (contrastive.py), on the recorded tables
    as_tensor = lambda x: torch.tensor(x.to_numpy(), dtype=torch.float64)  # noqa: E731
    harm_n = pd.Series(normalised(as_tensor(harm)).numpy(), index=harm.index)
    benign_n = pd.Series(normalised(as_tensor(benign)).numpy(), index=harm.index)

    def pick(w):  # ties broken by name, so a weight's picks never depend on the table's order
        score = pd.Series(contrast(as_tensor(harm), as_tensor(benign), w).numpy(), index=harm.index)
        return list(score.sort_index().sort_values(ascending=False, kind="stable").index[:k])
    plain = set(pick(0.0))
    rho = spearmanr(harm, benign).correlation
    return pd.DataFrame([{"run": f"{run.parent.name}/{run.name}", "weight": w, "picks": " ".join(pick(w)),
                          "shared_with_gradient": len(plain & set(pick(w))),
                          "harm_of_picks": harm_n[pick(w)].mean(), "benign_of_picks": benign_n[pick(w)].mean(),
                          "spearman_harm_benign": rho} for w in weights])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="contrastive run folders")
    parser.add_argument("--out", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    try:
        table = pd.concat([weights_table(run) for run in args.runs], ignore_index=True)
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".2f"))
    if args.out:  # replaced whole, so a link at the path is replaced rather than written through
        write_bytes_atomic(args.out, table.to_csv(index=False).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
