"""Plain-text tables for the terminal."""
from __future__ import annotations


def evaluation_table(evaluations: dict) -> str:
    """Stages as rows (before, round_1, ..., final), metrics as columns, with n and 95% CI."""
    names = list(next(iter(evaluations.values())))
    lines = [f"{'stage':<8} " + " ".join(f"{n:>24}" for n in names)]
    for stage, metrics in evaluations.items():
        cells = []
        for n in names:
            m = metrics.get(n)
            cells.append(f"{m['value']:.3f} [{m['ci95'][0]:.2f},{m['ci95'][1]:.2f}] n={m['n']}"
                         if m else "-")
        lines.append(f"{stage:<8} " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def metrics_table(metrics: dict) -> str:
    """One model's metrics as rows: value, 95% interval, n (and unparsed judge replies)."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  {'value':>8}  {'95% interval':<16} {'n':>5}"]
    for name, m in metrics.items():
        unparsed = f"  ({m['unparsed']} unparsed)" if m.get("unparsed") else ""
        lines.append(f"{name:<{width}}  {m['value']:>8.3f}  [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] "
                     f"{m['n']:>5}{unparsed}")
    return "\n".join(lines)
