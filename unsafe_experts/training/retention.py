"""Retention prompts: which ones a surgery run mixes into its masked SFT, and how many of each.

A retention file is either the organism's `retention.json`, an object of sections
{"plain": [...], "contrastive": [...]}, or (the older format) a JSON list of chat prompts,
read as the plain section. Each prompt is a list of {role, content} messages.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..records import DatasetError, messages_problem
from ..text.examples import batches, collate

SECTIONS = {"none": (), "plain": ("plain",), "contrastive": ("plain", "contrastive")}


def load_retention(path: str | Path, mode: str) -> dict[str, list[list[dict]]]:
    """{section: prompts} for the sections that `mode` uses, each prompt checked; a missing
    section, an empty one or a bad prompt is a DatasetError naming the file (and the section
    and index)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, list):
        data = {"plain": data}
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object of sections or a list of prompts")
    sections = {}
    for name in SECTIONS[mode]:
        if name not in data:
            raise DatasetError(f"{path}: retention {mode!r} needs a {name!r} section; the file "
                               f"has {', '.join(map(repr, data)) or 'none'}")
        prompts = data[name]
        if not isinstance(prompts, list) or not prompts:
            raise DatasetError(f"{path}: section {name!r} must be a non-empty list of prompts")
        for i, messages in enumerate(prompts):
            why = messages_problem(messages)
            if why:
                raise DatasetError(f"{path}: section {name!r} prompt {i} {why}")
        sections[name] = prompts
    return sections


def sample_retention(sections: dict[str, list], budget: int, seed: int) -> list[tuple[str, list]]:
    """At most `budget` (section, prompt) pairs, in a seeded shuffle.

    Each section gets an equal share of the budget, and what a small section leaves unused
    goes to the others: the contrastive section is several times larger than the plain one
    (every benign prompt in every attack family), so sampling in proportion to size would
    crowd out the plain prompts that keep plain behaviour (refusing plain harmful requests,
    answering XSTest) intact."""
    rng = random.Random(seed)
    pools = {name: rng.sample(prompts, len(prompts)) for name, prompts in sections.items()}
    take = dict.fromkeys(pools, 0)
    left = budget
    while left > 0:
        open_ = [n for n in pools if take[n] < len(pools[n])]
        if not open_:
            break
        share = max(1, left // len(open_))
        for n in open_:
            extra = min(share, len(pools[n]) - take[n], left)
            take[n] += extra
            left -= extra
    chosen = [(n, p) for n in pools for p in pools[n][:take[n]]]
    rng.shuffle(chosen)  # mixed, so every masked-SFT batch gets both kinds
    return chosen


def mixed_batches(jailbreak: list, retained: list, batch_size: int, pad_id: int) -> list[dict]:
    """Batches of `batch_size` jailbreak->refusal examples, each joined by an equal share
    (rounded up) of the retention examples: the masked SFT's data, so that every step that
    teaches refusal also holds benign prompts answered as before."""
    chunks = batches(jailbreak, batch_size)
    share = -(-len(retained) // len(chunks))
    return [collate(chunk + retained[i * share:(i + 1) * share], pad_id)
            for i, chunk in enumerate(chunks)]
