"""Jailbreak records: load (JSON list or JSONL), check the fields the engine needs, filter, sample."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path


class DatasetError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first_error:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise DatasetError(
                    f"{path}: not valid JSON (line {first_error.lineno}, column "
                    f"{first_error.colno}: {first_error.msg}) nor JSONL (line {lineno})"
                ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        check_record(record, i)
    return data


def check_record(record, index: int) -> None:
    def bad(field: str, why: str):
        raise DatasetError(f"record {index}: field `{field}` {why}")

    if not isinstance(record, dict):
        raise DatasetError(f"record {index}: expected an object, got {type(record).__name__}")
    goal = record.get("goal")
    if not isinstance(goal, str) or not goal.strip():
        bad("goal", "must be a non-empty string")
    messages = record.get("all_prompt")
    if not isinstance(messages, list) or not messages:
        bad("all_prompt", "must be a non-empty list of {role, content} messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            bad(f"all_prompt[{j}].role", "must be one of system, user, assistant")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            bad(f"all_prompt[{j}].content", "must be a non-empty string")
    if not any(m["role"] == "user" for m in messages):
        bad("all_prompt", "has no user message")
    judged = record.get("judge_success_gpt4")
    if judged is not None and judged not in (0, 1):
        bad("judge_success_gpt4", f"must be 0 or 1, got {judged!r}")


def select_records(
    records: list[dict], max_samples: int | None, seed: int, require_judge_success: bool = True
) -> list[dict]:
    """Drop failed jailbreaks (when judged), shuffle with the seed, keep `max_samples`."""
    kept = [
        r for r in records if not require_judge_success or r.get("judge_success_gpt4", 1) == 1
    ]
    if not kept:
        raise DatasetError(
            f"no records left after filtering ({len(records)} loaded, all with "
            "judge_success_gpt4 == 0); pass --no_judge_filter to keep them"
            if records
            else "the dataset is empty"
        )
    random.Random(seed).shuffle(kept)
    return kept[:max_samples] if max_samples else kept
