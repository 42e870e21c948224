"""A content-addressed cache for results that depend only on the model before surgery and on
fixed inputs: the retention answers and the evaluation before surgery.

A comparison runs dozens of surgeries on one organism; each would otherwise regenerate the same
retention answers and re-evaluate the same unrepaired model (on the demo organism that is about
two thirds of a run's time). An entry is keyed by the digests of everything its value depends on:
the weights and config of a local model directory, the inputs, the settings, the torch and
transformers versions, and the source of this package (so a code change never serves a stale
result). A hub id has no local bytes to digest, so nothing is cached for it. A hit returns the
bytes a miss would have produced on the same machine: callers compute in an order that does not
depend on anything outside the key (see Surgery._retention_batches).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from ..records import file_digest
from .atomic import write_json_atomic

_PACKAGE = Path(__file__).resolve().parents[1]  # the whole engine package


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def model_digest(model: str | Path) -> str | None:
    """sha256 over every file of a local checkpoint (weights, config, tokenizer, chat
    template); None for a hub id."""
    root = Path(model)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.is_file())
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def cached(cache_dir: str | Path | None, kind: str, key: dict | None, compute: Callable[[], object]):
    """compute()'s JSON-serialisable value, read from `cache_dir/kind/<digest>.json` when an
    earlier call stored it under the same key; no cache_dir or no key: compute() every time."""
    if not cache_dir or key is None:
        return compute()
    full = {**key, "torch": torch.__version__, "transformers": transformers.__version__,
            "source": _source_digest()}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()
    path = Path(cache_dir) / kind / f"{digest}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["value"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed and replaced
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": full, "value": value})
    return value
