"""The robustness result (unsafe_experts/robustness/runner.py) as a table and one plot per
attack: the headline share with its 95% interval, before and after the repair, per budget."""
from __future__ import annotations

from pathlib import Path

from unsafe_experts.stats import shown

# the figure each row leads with: pooled family ASR where the model was evaluated whole,
# the plain-request ASR where only those were attacked (prefill, GCG)
HEADLINES = ("asr_all_families", "asr_plain")
COLUMNS = (("ASR", None), ("plain refusal", "plain_refusal"), ("format refusal", "format_refusal_all"),
           ("benign loglik", "benign_loglik"))


def headline(metrics: dict) -> tuple[str, dict] | None:
    return next(((k, metrics[k]) for k in HEADLINES if k in metrics), None)


def _cell(m: dict | None, share: bool = True) -> str:
    if not m:
        return "-"
    return shown(m) if share else f"{m['value']:.3f}"


def table(result: dict) -> str:
    """Markdown: one row per attack and budget, each model's figures side by side."""
    labels = sorted({label for t in result["attacks"].values() for row in t.values() for label in row},
                    key=lambda x: x != "after")
    head = ["attack", "budget"] + [f"{label}: {name}" for label in labels for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for attack, budgets in result["attacks"].items():
        for budget, row in budgets.items():
            cells = [attack, budget]
            for label in labels:
                metrics = row.get(label, {})
                if "skipped" in metrics:
                    cells += [f"skipped: {metrics['skipped']}"] + ["-"] * (len(COLUMNS) - 1)
                    continue
                found = headline(metrics)
                cells.append(f"{_cell(found[1])} ({found[0]}, n={found[1]['n']})" if found else "-")
                cells += [_cell(metrics.get(key), share=key != "benign_loglik") for _, key in COLUMNS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    n = result["setup"]["limit"]
    lines += ["", f"{n} prompts per set under each attack (a seeded sample; the attacker's own split "
                  f"is the rest), 95% Wilson intervals. Seconds per attack: "
              + ", ".join(f"{k} {v}" for k, v in result["setup"]["seconds"].items())]
    return "\n".join(lines)


def plot_path(folder: str | Path, attack: str) -> Path:
    return Path(folder) / f"robustness_{attack}.png"


def plots(result: dict, folder: str | Path) -> list[Path]:
    """robustness_<attack>.png per attack: the headline share against the budget, one line per
    model, with 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for attack, budgets in result["attacks"].items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = list(budgets)
        for label, style in (("before", "o--"), ("after", "s-")):
            points = [(i, found[1]) for i, b in enumerate(names)
                      if (found := headline(budgets[b].get(label, {})))]
            if not points:
                continue
            xs = [i for i, _ in points]
            ys = [m["value"] for _, m in points]
            err = [[y - m["ci95"][0] for (_, m), y in zip(points, ys)],
                   [m["ci95"][1] - y for (_, m), y in zip(points, ys)]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"{label} surgery")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("budget")
        ax.set_ylabel("attack success rate")
        ax.set_title(attack)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_path(folder, attack)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
