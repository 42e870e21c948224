"""Jailbreak records: load (JSON list or JSONL), check the fields the engine needs, filter, sample."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path


ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    pass


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_records(path: str | Path) -> list:
    """The file's records, unchecked: a JSON list (or one object), or JSON Lines."""
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
    return data


def load_records(path: str | Path) -> list[dict]:
    """Records, each checked; the first bad one is an error naming its index and field."""
    data = read_json_records(path)
    for i, record in enumerate(data):
        check_record(record, i)
    return data


def messages_problem(messages) -> str | None:
    """Why `all_prompt` is unusable, or None: a non-empty list of {role, content} messages with
    a known role, non-empty text and at least one user turn."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content} messages"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            return f"message {j}: role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"message {j}: `content` must be a non-empty string"
    if not any(m["role"] == "user" for m in messages):
        return "has no user message"
    return None


def goal_problem(goal) -> str | None:
    return None if isinstance(goal, str) and goal.strip() else "must be a non-empty string"


def judge_problem(judged) -> str | None:
    return None if judged is None or judged in (0, 1) else f"must be 0 or 1, got {judged!r}"


def check_record(record, index: int) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"record {index}: expected an object, got {type(record).__name__}")
    for field, problem in (("goal", goal_problem), ("all_prompt", messages_problem),
                           ("judge_success_gpt4", judge_problem)):
        why = problem(record.get(field))
        if why:
            raise DatasetError(f"record {index}: field `{field}` {why}")


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
