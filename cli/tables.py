"""Plain-text tables for the terminal."""
from __future__ import annotations


def evaluation_table(evaluations: dict) -> str:
    """Metrics as rows (ASR and benign refusal per attack family included), stages as columns
    (before, round_1, ..., final): each cell the value, its 95% interval and n."""
    stages = list(evaluations)
    names = list(dict.fromkeys(n for metrics in evaluations.values() for n in metrics))
    width = max(len(n) for n in names)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{s:>26}" for s in stages)]
    for n in names:
        cells = []
        for stage in stages:
            m = evaluations[stage].get(n)
            cells.append(f"{m['value']:.3f} [{m['ci95'][0]:.2f},{m['ci95'][1]:.2f}] n={m['n']}"
                          if m else "-")
        lines.append(f"{n:<{width}}  " + "  ".join(f"{c:>26}" for c in cells))
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
