"""Jailbreak records: load (JSON list or JSONL), check the fields the engine needs, filter, sample."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .errors import DatasetError

ROLES = ("system", "user", "assistant")
# The most characters one record's text field may hold (a goal; a prompt's messages together).
# Tokenising costs about 170 bytes of memory per character (a 50 MB prompt took 6-8 GB; 10 M
# characters 1.7 GB, 1 M characters 200 MB, measured on the tiny tokenizer), and a model reads at
# most its context window: 1 M characters is about 250 k tokens at 4 characters a token, beyond
# a 128 k-token window, so a many-shot prompt for the longest windows fits, and a record past it
# is refused by `validate` and `train` before anything is tokenised rather than found out by the
# memory it takes.
MAX_TEXT_CHARS = 1_000_000


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _decode(path: Path) -> str:
    """The file as UTF-8 text; invalid bytes are an error naming the line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}, line {line}: "
                           f"{raw[e.start:e.start + 1]!r})") from None


def parse_json(text: str):
    """json.loads, with the other ways it can fail (nesting deeper than Python's recursion
    limit, integers over Python's digit limit) turned into JSONDecodeError-like errors."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json_records(path: str | Path) -> list:
    """The file's records, unchecked: a JSON list (or one object), or JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    text = _decode(path)
    try:
        data = parse_json(text)
    except json.JSONDecodeError as first_error:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(parse_json(line))
            except (json.JSONDecodeError, ValueError):
                raise DatasetError(
                    f"{path}: not valid JSON (line {first_error.lineno}, column "
                    f"{first_error.colno}: {first_error.msg}) nor JSONL (line {lineno})"
                ) from None
    except ValueError as e:  # too deep, or an integer with too many digits
        raise DatasetError(f"{path}: not usable JSON ({e})") from None
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
    total = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    if total > MAX_TEXT_CHARS:
        return _too_long(total, "its messages hold")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            return f"message {j}: role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"message {j}: `content` must be a non-empty string"
        if _unencodable(m["content"]):
            return f"message {j}: `content` {_unencodable(m['content'])}"
    if not any(m["role"] == "user" for m in messages):
        return "has no user message"
    return None


def _unencodable(text: str) -> str | None:
    """JSON can carry a lone surrogate ("\\ud83d") that no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate ({text[e.start]!r} at character {e.start}), not text"


def goal_problem(goal) -> str | None:
    if not isinstance(goal, str) or not goal.strip():
        return "must be a non-empty string"
    if len(goal) > MAX_TEXT_CHARS:
        return _too_long(len(goal), "holds")
    return _unencodable(goal)


def _too_long(chars: int, holds: str) -> str:
    return (f"{holds} {chars:,} characters, over the bound of {MAX_TEXT_CHARS:,} for one record's "
            "text (records.MAX_TEXT_CHARS: tokenising takes about 170 bytes a character)")


def judge_problem(judged) -> str | None:
    """None (not judged) or 0/1; NaN, inf, 2, "1" and lists are not (bool is an int here)."""
    ok = judged is None or (isinstance(judged, (int, float)) and judged in (0, 1))
    return None if ok else f"must be 0 or 1, got {judged!r}"


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


def attack_families(records: list[dict]) -> dict[str, int]:
    """{attack family: records in it}, sorted by name: what the surgery's data covers (and so
    which families stay unseen); records without an `attack_family` are not counted."""
    counts: dict[str, int] = {}
    for r in records:
        if isinstance(r.get("attack_family"), str) and r["attack_family"]:
            counts[r["attack_family"]] = counts.get(r["attack_family"], 0) + 1
    return dict(sorted(counts.items()))
