"""Attack a model: wrap goals in attack families, generate, judge, and write surgery records.

The records are in the FlipAttack result format that `unsafe-experts validate` checks and
`train` reads: `id`, `goal`, `all_prompt`, `attack_family` (and a flip family's `flip_mode` /
`flip_attack`), plus the model's `response`, the judge's name in `judge` and its verdict in
`judge_success` (1 complied, 0 refused, null when an LLM judge's reply could not be parsed).
`judge_success_gpt4` repeats `judge_success` so the seed's filter (`--judge_filter`) keeps
exactly the successful attacks: it was judged by this project's judge, not by GPT-4.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..models.modes import eval_mode
from ..records import DatasetError, goal_problem, read_json_records
from ..stats import proportion
from ..text.generation import generate
from .families import attack_records, check_families


def read_goals(path: str | Path) -> list[str]:
    """Goals from a .txt (one a line), a .csv with a `goal` column, or JSON / JSONL: a list of
    strings or of objects with `goal`. Blank and non-text goals are skipped; none left is an
    error."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".txt":
        rows = path.read_text(encoding="utf-8").splitlines()
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "goal" not in (reader.fieldnames or []):
                raise DatasetError(f"{path}: no `goal` column (columns: {', '.join(reader.fieldnames or [])})")
            rows = [row["goal"] for row in reader]
    else:
        rows = [r.get("goal") if isinstance(r, dict) else r for r in read_json_records(path)]
    goals = [g.strip() for g in rows if goal_problem(g) is None]
    if not goals:
        raise DatasetError(f"{path}: no usable goal (expected non-empty text: lines of a .txt, a "
                           "`goal` column, or a JSON list of strings or of objects with `goal`)")
    return goals


def run_attack(model, tokenizer, goals: list[str], families: list[str], judge, judge_name: str,
               max_new_tokens: int = 256, batch_size: int = 16, progress: bool = False,
               endpoint=None) -> tuple[list[dict], dict]:
    """(records, {family: proportion of attacks judged successful, with `unparsed`}). With an
    `endpoint` (endpoint.Endpoint) a server generates the responses and `model` may be None."""
    families = check_families(families)
    records, summary = [], {}
    with eval_mode(model):
        for family in families:
            batch = attack_records(goals, family, start_id=len(records))
            responses = generate(model, tokenizer, [r["all_prompt"] for r in batch], max_new_tokens,
                                 batch_size, desc=family, progress=progress, endpoint=endpoint)
            verdicts = judge(goals, responses)
            for record, response, verdict in zip(batch, responses, verdicts):
                success = None if verdict.complied is None else int(verdict.complied)
                record.update(response=response, judge=judge_name, judge_success=success,
                              judge_success_gpt4=success)
                if verdict.score is not None:
                    record["judge_score"] = verdict.score
            parsed = [v.complied for v in verdicts if v.complied is not None]
            summary[family] = {**proportion(parsed), "unparsed": len(verdicts) - len(parsed)}
            records += batch
    return records, summary
