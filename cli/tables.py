"""Plain-text tables for the terminal: every line under WIDTH characters, every figure in one
format (`unsafe_experts.stats.shown`: `0.146 [0.07, 0.27]`)."""
from __future__ import annotations

import re

from unsafe_experts.stats import shown

# lines stay under this many characters: a terminal of 120 columns shows them unwrapped
WIDTH = 119

# One line per metric family: the metric names the tables print, in the words the README uses
# for them (README "Metrics: what the names mean" holds the same lines; a test keeps them equal).
LEGEND = (
    ("asr_<family>", "attack success rate: harmful requests in attack <family> answered"),
    ("over_refusal_<family>", "benign in family refused: benign requests in <family>'s format refused"),
    ("plain_refusal", "plain refusal: harmful requests asked plainly, without an attack, refused"),
    ("over_refusal", "XSTest over-refusal: XSTest's safe prompts refused"),
    ("benign_loglik", "benign loglik: mean per-token log-likelihood of AlpacaEval reference answers"),
    ("own_benign_loglik", "the same, of the organism's own answers to benign requests"),
    ("refusal_<set>", "a suite's harmful set measured by refusal: its requests refused"),
    ("answered_<set>", "a suite's benign set measured by compliance: its requests answered"),
    ("loglik_<set>", "a suite's reference set: mean per-token log-likelihood of its answers"),
    ("strongreject_<set>", "StrongREJECT judge score of a suite's set (0 refused .. 1 fully harmful)"),
)


def _matches(pattern: str, name: str) -> bool:
    # `<family>` and `<set>` stand for any name part; the rest must match exactly
    regex = re.escape(pattern).replace(re.escape("<family>"), ".+").replace(re.escape("<set>"), ".+")
    return re.fullmatch(regex, name) is not None


def legend(names=None) -> str:
    """The legend lines, each `name  meaning`; with `names`, only the families among them (a
    name is read by its first matching pattern, so `over_refusal` is not `over_refusal_<family>`)."""
    entries = LEGEND
    if names is not None:
        used = {next((p for p, _ in sorted(LEGEND, key=lambda e: "<" in e[0]) if _matches(p, n)), None)
                for n in names}
        entries = [e for e in LEGEND if e[0] in used]
    width = max(len(p) for p, _ in LEGEND)
    return "\n".join(f"{p:<{width}}  {meaning}" for p, meaning in entries)


def _shown_stages(evaluations: dict) -> list[str]:
    """The stages to print: `final` repeats the last evaluated round (the flow keeps it so that
    readers need not know the round count), so it is a column only where it differs."""
    stages = list(evaluations)
    if "final" in stages and len(stages) > 1:
        previous = stages[stages.index("final") - 1] if stages.index("final") else None
        if previous is not None and evaluations[previous] == evaluations["final"]:
            stages.remove("final")
    return stages


def _blocks(lead: list[str], columns: list[list[str]], width: int = WIDTH) -> list[str]:
    """Rows of `lead` beside as many `columns` (header first, cells below) as fit in `width`
    characters, the rest in blocks below, each with `lead` again; the columns are spread evenly
    over the fewest blocks (four stages: two and two, not three and one)."""
    columns = [[c.rjust(max(map(len, column))) for c in column] for column in columns]
    widest = max(len(c[0]) for c in columns)
    per_block = max(1, (width - len(lead[0])) // (2 + widest))
    count = -(-len(columns) // per_block)
    per_block = -(-len(columns) // count)
    blocks = [columns[i:i + per_block] for i in range(0, len(columns), per_block)]
    return ["\n".join("  ".join([lead[i], *(c[i] for c in block)]).rstrip() for i in range(len(lead)))
            for block in blocks]


def evaluation_table(evaluations: dict) -> str:
    """Metrics as rows (ASR and benign refusal per attack family included), stages as columns
    (before, round_1, ...): each cell the value and its 95% interval, n once per metric; as
    many stage columns side by side as fit in WIDTH, the rest below."""
    stages = _shown_stages(evaluations)
    names = list(dict.fromkeys(n for s in stages for n in evaluations[s]))
    counts = []
    for n in names:
        found = sorted({evaluations[s][n]["n"] for s in stages if n in evaluations[s]})
        counts.append("/".join(map(str, found)))
    first = ["metric", *names]
    columns = [["n", *counts]]
    columns += [[stage, *(shown(evaluations[stage][n]) if n in evaluations[stage] else "-" for n in names)]
                for stage in stages]
    # n stays beside the names in every block: each block reads alone
    lead = [f"{a:<{max(map(len, first))}}  {b:>{max(map(len, columns[0]))}}" for a, b in zip(first, columns[0])]
    return "\n\n".join(_blocks(lead, columns[1:]))


def metrics_table(metrics: dict) -> str:
    """One model's metrics as rows: value with its 95% interval, n (and unparsed judge replies)."""
    width = max(len(name) for name in metrics)
    cells = {name: shown(m) for name, m in metrics.items()}
    size = max(len(c) for c in cells.values())
    lines = [f"{'metric':<{width}}  {'value [95% interval]':<{size}}  {'n':>5}"]
    for name, m in metrics.items():
        unparsed = f"  ({m['unparsed']} unparsed)" if m.get("unparsed") else ""
        lines.append(f"{name:<{width}}  {cells[name]:<{size}}  {m['n']:>5}{unparsed}")
    return "\n".join(lines)


def robustness_table(result: dict) -> str:
    """The re-attack's headline per attack and budget, each attacked model's figure side by
    side (after, before), for the terminal; <out>.md keeps every figure (plain and format
    refusal, benign log-likelihood) in a table too wide for one."""
    from reporting.robustness_report import headline

    labels = sorted({label for t in result["attacks"].values() for row in t.values() for label in row},
                    key=lambda x: x != "after")
    rows = [["attack", "budget", "metric", "n", *labels]]
    for attack, budgets in result["attacks"].items():
        for budget, row in budgets.items():
            found = {label: headline(metrics) for label, metrics in row.items() if "skipped" not in metrics}
            names = sorted({f[0] for f in found.values() if f})
            counts = sorted({f[1]["n"] for f in found.values() if f})
            rows.append([attack, budget, "/".join(names) or "-", "/".join(map(str, counts)) or "-",
                         *(shown(found[label][1]) if found.get(label) else
                           "skipped" if label in row else "-" for label in labels)])
    sizes = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(s) if i < 3 else c.rjust(s) for i, (c, s) in enumerate(zip(r, sizes))).rstrip()
                     for r in rows)
