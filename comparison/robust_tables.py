"""The compared surgeries re-attacked (issue 24 part 3: is an expert-local repair more fragile
than a dense one?), read back from the robustness command's files.

`<robust_dir>/<organism>/<run>.json` is one compared run attacked (the runner's result, label
"after"), `<organism>/organism.json` the unrepaired organism attacked alone. A run's settings come
from its own training_metadata.json under the compare runs' root, never from its folder name.
One tidy row per (organism, run, attack, budget); per organism and setting the headline ASR
over seeds; the reference setting (PAIRED[0], undefended) minus each other one, paired on seeds.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from reporting.robustness_report import headline
from unsafe_experts.artefacts.run_metadata import METADATA
from unsafe_experts.config import ConfigError
from unsafe_experts.selection.methods import METHODS, PAIRED, trains_experts

from .seed_stats import group_summary, paired
from .tables import organism_seed, retention_mode

# where dvc.yaml's compare_run stage writes each surgery: outputs/compare/<organism>/<run>/
RUNS_ROOT = "outputs/compare"
BEFORE = "organism"  # the file stem of the unrepaired organism's result
BEFORE_SETTING = "before"
# a run's settings at these values go unnamed in its label (params.yaml's run_defaults, and the
# training defaults of the two defence keys, which older metadata lacks)
DEFAULTS = {"retention": "plain", "expert_lr": 1e-3, "shared_weights": False, "expert_dropout": 0.0}
SETTING = ["method", "k", "retention", "expert_lr", "shared_weights", "expert_dropout"]
COLUMNS = ["organism", "organism_seed", "run", *SETTING[:2], "seed", *SETTING[2:], "setting", "attack", "budget",
           "metric", "value", "n", "ci_low", "ci_high", "plain_refusal", "format_refusal_all",
           "format_refusal_all_ci_low", "format_refusal_all_ci_high", "benign_loglik", "skipped"]
# the robustness command's compact companion of each result (tasks/robustness.summary_paths:
# <run>_headline.json, the DVC metrics), beside it in the same folder: not a result
COMPANION = "_headline.json"
NO_ATTACK = "none"
COST = "format refusal (none)"  # the cost column: benign-in-format refusal with no attack
UTILITY = "benign loglik (none)"  # the utility column: mean log-likelihood of benign answers, no attack
ROUTER = "router_"  # the attacks on the router, the frontier's y axis


def _load(path: Path) -> dict:
    """A robustness result, checked as far as this module reads it (a bad file is named)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable as a robustness result ({e})") from None
    attacks = data.get("attacks") if isinstance(data, dict) else None
    if not isinstance(attacks, dict):
        raise ConfigError(f"{path}: not a robustness result (no 'attacks' mapping)")
    for attack, budgets in attacks.items():
        if not isinstance(budgets, dict) or not all(isinstance(row, dict) and isinstance(row.get("after"), dict)
                                                    for row in budgets.values()):
            raise ConfigError(f"{path}: attack {attack!r} is not budget -> {{'after': metrics}}")
    return data


def run_settings(meta_path: Path) -> dict:
    """The settings of one compared run from its training_metadata.json "parameters"."""
    try:
        meta = json.loads(meta_path.read_text())
        params = meta["parameters"]
        method = params.get("method", meta.get("method"))
        k = int(params["top_k_experts"]) if trains_experts(method) else 0
        return {"method": method, "k": k, "seed": params["seed"], "retention": retention_mode(params),
                "expert_lr": float(params["expert_lr"]), "shared_weights": bool(params.get("shared_weights", False)),
                "expert_dropout": float(params.get("expert_dropout", 0.0)),
                "organism_seed": organism_seed(params.get("model_name", ""))}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path}: the re-attacked run's settings are not readable ({type(e).__name__}: {e})") from None


def setting_label(row: dict) -> str:
    """The method, its k where it ranks experts (a name outside the table counts as ranking),
    and each setting away from DEFAULTS, e.g. `gradient k4 +shared drop0.5`."""
    method = row["method"]
    ranks = METHODS[method].ranks if method in METHODS else True
    parts = [method] + ([f"k{row['k']}"] if ranks else [])
    if row["retention"] != DEFAULTS["retention"]:
        parts.append(f"retention {row['retention']}")
    if not math.isclose(row["expert_lr"], DEFAULTS["expert_lr"]):
        parts.append(f"lr{row['expert_lr']:g}")
    if row["shared_weights"]:
        parts.append("+shared")
    if row["expert_dropout"] != DEFAULTS["expert_dropout"]:
        parts.append(f"drop{row['expert_dropout']:g}")
    return " ".join(parts)


def defended(row) -> bool:
    return bool(row["shared_weights"]) or row["expert_dropout"] != DEFAULTS["expert_dropout"]


def _cell(metrics: dict) -> dict:
    """One attacked model's cell: its headline share, plain and benign-in-format refusal."""
    if "skipped" in metrics:
        return {"skipped": str(metrics["skipped"])}
    found = headline(metrics)
    out = {}
    if found:
        name, m = found
        (low, high) = m.get("ci95") or (np.nan, np.nan)
        out.update(metric=name, value=m["value"], n=m.get("n"), ci_low=low, ci_high=high)
    if "plain_refusal" in metrics:
        out["plain_refusal"] = metrics["plain_refusal"]["value"]
    if "format_refusal_all" in metrics:
        m = metrics["format_refusal_all"]
        low, high = m.get("ci95") or (np.nan, np.nan)
        out.update(format_refusal_all=m["value"], format_refusal_all_ci_low=low, format_refusal_all_ci_high=high)
    if "benign_loglik" in metrics:
        out["benign_loglik"] = metrics["benign_loglik"]["value"]
    return out


def result_rows(robust_dir: str | Path, runs_root: str | Path = RUNS_ROOT) -> pd.DataFrame:
    """One row per (organism, run, attack, budget) of every result in `robust_dir` (COLUMNS;
    empty when there is none): each `<organism>/<run>.json` but the COMPANION files. A skipped
    cell keeps its row, value NaN, the reason in `skipped`."""
    rows = []
    for folder in sorted(p for p in Path(robust_dir).iterdir() if p.is_dir()):
        # nor is a dot file (an atomic write's temporary, an editor's)
        for path in sorted(p for p in folder.glob("*.json") if not p.name.startswith(".") and not p.name.endswith(COMPANION)):
            data = _load(path)
            if path.stem == BEFORE:
                settings = {"setting": BEFORE_SETTING}
            else:
                settings = run_settings(Path(runs_root) / folder.name / path.stem / METADATA)
                settings["setting"] = setting_label(settings)
            for attack, budgets in data["attacks"].items():
                for budget, row in budgets.items():
                    try:
                        cell = _cell(row["after"])
                    except (KeyError, TypeError, ValueError) as e:
                        raise ConfigError(f"{path}: {attack} {budget}: a metric without value and ci95 ({e!r})") from None
                    rows.append({"organism": folder.name, "run": path.stem, **settings, "attack": attack,
                                 "budget": str(budget), **cell})
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    # the organism's own rows: the seed its runs' build.json gives (every run of one organism
    # starts from the same model), else the build folder's
    for organism, part in table.groupby("organism"):
        seeds = part["organism_seed"].dropna()
        seed = seeds.iloc[0] if len(seeds) else organism_seed(f"build/{organism}/model")
        table.loc[(table["organism"] == organism) & (table["run"] == BEFORE), "organism_seed"] = seed
    return table


def headline_budget(budgets: list[str]) -> str:
    """The budget an attack's column shows: every expert the run published ("all"), else the
    largest numeric budget, else the last listed."""
    if "all" in budgets:
        return "all"
    numeric = [b for b in budgets if _number(b) is not None]
    return max(numeric, key=_number) if numeric else budgets[-1]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def attack_columns(table: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """"attack budget" -> (attack, budget): one column per attack, in the order they ran."""
    attacks = dict.fromkeys(table["attack"])
    chosen = {a: headline_budget(list(dict.fromkeys(table.loc[table["attack"] == a, "budget"]))) for a in attacks}
    return {a if b == "-" else f"{a} {b}": (a, b) for a, b in chosen.items()}


def wide(table: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """One row per run: its settings, each attack column's headline value and the cost column."""
    keys = ["organism", "run"]
    settings = table.drop_duplicates(keys).set_index(keys)[["organism_seed", *SETTING, "seed", "setting"]]
    cells = table.set_index([*keys, "attack", "budget"])
    out = settings.copy()
    for name, (attack, budget) in columns.items():
        out[name] = _pick(cells, attack, budget, "value", settings.index)
    out[COST] = _pick(cells, NO_ATTACK, "-", "format_refusal_all", settings.index)
    out[UTILITY] = _pick(cells, NO_ATTACK, "-", "benign_loglik", settings.index)
    return out.reset_index()


def _pick(cells: pd.DataFrame, attack: str, budget: str, field: str, index) -> pd.Series:
    """One field of one (attack, budget) per run; NaN for a run that lacks the cell."""
    try:
        found = cells.xs((attack, budget), level=("attack", "budget"))[field]
    except KeyError:
        return pd.Series(np.nan, index=index)
    return found.reindex(index)


def _interval_of(table: pd.DataFrame, organism: str, setting: str, column: str, columns) -> tuple:
    """The Wilson interval a single run's file gives for a column's cell (none for utility, a
    log-likelihood rather than a share)."""
    if column == UTILITY:
        return (np.nan, np.nan)
    attack, budget = columns.get(column, (NO_ATTACK, "-"))
    field = "ci" if column in columns else "format_refusal_all_ci"
    rows = table[(table["organism"] == organism) & (table["setting"] == setting) & (table["attack"] == attack)
                 & (table["budget"] == budget) & table["value" if column in columns else "format_refusal_all"].notna()]
    return (rows[f"{field}_low"].iloc[0], rows[f"{field}_high"].iloc[0]) if len(rows) else (np.nan, np.nan)


def _skipped(table: pd.DataFrame, organism: str, setting: str, cell: tuple[str, str] | None) -> bool:
    if cell is None:
        return False
    rows = table[(table["organism"] == organism) & (table["setting"] == setting) & (table["attack"] == cell[0])
                 & (table["budget"] == cell[1])]
    return bool(rows["skipped"].notna().any())


def _fmt(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.3f}" + ("" if pd.isna(low) else f" [{low:.3f}, {high:.3f}]")


def order_settings(settings: list[str], reference: str | None) -> list[str]:
    return sorted(settings, key=lambda s: (s != BEFORE_SETTING, s != reference, s))


def reference_setting(runs: pd.DataFrame) -> str | None:
    """The setting the others are paired against: PAIRED[0] (the user's method) at the default
    retention, learning rate and no defence, the one with most runs (ties: the first label)."""
    plain = runs[(runs["method"] == PAIRED[0]) & ~runs.apply(defended, axis=1)
                 & (runs["retention"] == DEFAULTS["retention"]) & np.isclose(runs["expert_lr"], DEFAULTS["expert_lr"])]
    if plain.empty:
        return None
    counts = plain["setting"].value_counts()
    return min(counts.index, key=lambda s: (-counts[s], s))


def summary(table: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Per organism and setting: seeds, then per attack column and the cost column the mean over
    seeds [95% t interval, cut at 0 and 1]; where one run has the cell, its value [Wilson
    interval]; where fewer runs than seeds have it (skipped), "(n = m)" after it."""
    runs = wide(table[table["run"] != BEFORE], columns)
    metrics = [*columns, COST, UTILITY]
    means = group_summary(runs, ["organism", "setting"], metrics) if len(runs) else pd.DataFrame()
    counts = runs.groupby(["organism", "setting"])[metrics].count() if len(runs) else pd.DataFrame()
    out = []
    for _, g in means.iterrows():
        row = {"organism": g["organism"], "setting": g["setting"], "seeds": int(g["seeds"])}
        for m in metrics:
            count = counts.loc[(g["organism"], g["setting"]), m]
            if count == 0:
                row[m] = "skipped" if _skipped(table, g["organism"], g["setting"], columns.get(m)) else "-"
                continue
            if count == 1:
                low, high = _interval_of(table, g["organism"], g["setting"], m, columns)
            else:
                low, high = g[f"{m}_ci_low"], g[f"{m}_ci_high"]
                if m != UTILITY:  # shares: the t interval cut at 0 and 1
                    low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
            row[m] = _fmt(g[f"{m}_mean"], low, high) + (f" (n = {count})" if count < g["seeds"] else "")
        out.append(row)
    for organism, part in table[table["run"] == BEFORE].groupby("organism"):
        row, values = {"organism": organism, "setting": BEFORE_SETTING, "seeds": 1}, wide(part, columns).iloc[0]
        for m in metrics:
            skipped = pd.isna(values[m]) and _skipped(table, organism, BEFORE_SETTING, columns.get(m))
            row[m] = "skipped" if skipped else _fmt(values[m], *_interval_of(table, organism, BEFORE_SETTING, m, columns))
        out.append(row)
    frame = pd.DataFrame(out, columns=["organism", "setting", "seeds", *metrics])
    references = {o: reference_setting(p) for o, p in runs.groupby("organism")} if len(runs) else {}
    frame["_order"] = [order_settings(list(frame.loc[frame.organism == o, "setting"]), references.get(o)).index(s)
                       for o, s in zip(frame["organism"], frame["setting"])]
    return frame.sort_values(["organism", "_order"]).drop(columns="_order").reset_index(drop=True)


PAIRED_COLUMNS = ["organism", "organism_seed", "metric", "comparison", "seeds", "mean_diff", "ci_low", "ci_high",
                  "sign_flip_p"]


def paired_differences(table: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> tuple[pd.DataFrame, list[str]]:
    """Per organism, the reference setting minus each other setting on the seeds both ran, for
    each attack column's ASR and the cost column (seed_stats.paired: mean, 95% t interval,
    sign-flip p); and the comparisons left out for fewer than two shared seeds."""
    runs = wide(table[table["run"] != BEFORE], columns)
    frames, left_out = [], []
    for organism, part in runs.groupby("organism"):
        reference = reference_setting(part)
        if reference is None:
            continue
        # seed_stats.paired pairs "method" a with b on "seed": here a setting is the method
        part = part.assign(method=part["setting"])
        for other in order_settings(list(dict.fromkeys(part["setting"])), reference):
            if other == reference:
                continue
            found = paired(part, reference, other, [*columns, COST, UTILITY], by=("organism", "organism_seed"))
            if found.empty:
                left_out.append(f"{organism}: {reference} - {other}")
            else:
                frames.append(found)
    out = pd.concat(frames, ignore_index=True)[PAIRED_COLUMNS] if frames else pd.DataFrame(columns=PAIRED_COLUMNS)
    return out, left_out


def frontier_points(table: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Per run (and organism before surgery): x = benign-in-format refusal with no attack, y =
    the highest headline ASR over the router attacks' columns it was not skipped in, each with
    its Wilson interval; `attack` names the column y came from."""
    rows = []
    for (organism, run), part in table.groupby(["organism", "run"], sort=False):
        cost = part[(part["attack"] == NO_ATTACK) & part["format_refusal_all"].notna()]
        shown = set(columns.values())
        router = part[[(a, b) in shown and a.startswith(ROUTER) and pd.notna(v)  # NaN: skipped
                       for a, b, v in zip(part["attack"], part["budget"], part["value"])]]
        if cost.empty or router.empty:
            continue
        top, x = router.loc[router["value"].idxmax()], cost.iloc[0]
        rows.append({"organism": organism, "run": run, "setting": x["setting"],
                     "x": x["format_refusal_all"], "x_low": x["format_refusal_all_ci_low"],
                     "x_high": x["format_refusal_all_ci_high"], "y": top["value"], "y_low": top["ci_low"],
                     "y_high": top["ci_high"], "attack": f"{top['attack']} {top['budget']}"})
    return pd.DataFrame(rows, columns=["organism", "run", "setting", "x", "x_low", "x_high", "y", "y_low", "y_high",
                                       "attack"])


def markdown(table: pd.DataFrame, columns, means: pd.DataFrame, tests: pd.DataFrame, left_out: list[str]) -> str:
    """The comparison's re-attack section: per organism the summary, then the paired tests."""
    limits = [str(n) for n in sorted(set(table["n"].dropna().astype(int)))]
    parts = ["## Re-attacked: headline ASR per setting under each attack (mean over seeds [95% t interval]; "
             "one run: its own 95% Wilson interval over prompts; `before`: the organism attacked alone)",
             f"Each attack at one budget (every budget in robustness_comparison.csv); headline ASR pooled over the "
             f"attack families, or over plain requests for prompt attacks; n per cell: {', '.join(limits) or '-'}; "
             f"`{COST}`: benign requests in attack formats refused with no attack, the repair's cost; "
             f"`{UTILITY}`: mean log-likelihood of the reference answers to benign requests (higher is better)."]
    for organism, part in means.groupby("organism", sort=False):
        seed = table.loc[table["organism"] == organism, "organism_seed"].iloc[0]
        parts += [f"### {organism}" + ("" if pd.isna(seed) else f" (organism seed {seed:g})"),
                  part.drop(columns="organism").to_markdown(index=False)]
    parts.append(f"### Re-attacked, paired on seeds: {PAIRED[0]} (undefended, default retention and learning rate) "
                 "minus each other setting of its organism (mean difference, 95% t interval, sign-flip p)")
    if len(tests):
        parts.append(tests.to_markdown(index=False, floatfmt=["g" if c == "organism_seed" else ".3f" for c in tests.columns]))
    else:
        parts.append(f"(no setting shares two seeds with an undefended {PAIRED[0]} setting)")
    if left_out:
        parts.append("Not paired (fewer than two seeds in common): " + "; ".join(left_out) + ".")
    return "\n\n".join(parts)
