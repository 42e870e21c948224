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
import warnings
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


class CacheWarning(UserWarning):
    """A cache entry that could not be trusted (damaged, edited, of the wrong shape) and was
    recomputed."""


def value_digest(value) -> str:
    """sha256 of a JSON value in a canonical form (as read back from JSON, keys sorted): what an
    entry stores beside its value and is checked against on every read."""
    return hashlib.sha256(json.dumps(json.loads(json.dumps(value)), sort_keys=True).encode()).hexdigest()


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _trusted(path: Path, key: dict, valid: Callable[[object], bool] | None):
    """(value, None) of a sound entry, or (None, why) of one that must be recomputed."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        return None, f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(entry, dict) or not {"key", "value", "sha256"} <= entry.keys():
        return None, "not a cache entry (needs key, value and sha256)"
    if _canonical(entry["key"]) != _canonical(key):
        return None, "stored under another key"
    if value_digest(entry["value"]) != entry["sha256"]:
        return None, "its value does not match its sha256 (edited or damaged)"
    if valid is not None and not valid(entry["value"]):
        return None, "its value is not of the expected shape"
    return entry["value"], None


def cached(cache_dir: str | Path | None, kind: str, key: dict | None, compute: Callable[[], object],
           valid: Callable[[object], bool] | None = None, used: dict | None = None):
    """compute()'s JSON-serialisable value, read from `cache_dir/kind/<digest>.json` when an
    earlier call stored it under the same key; no cache_dir or no key: compute() every time.

    An entry holds its full key, its value and the sha256 of the value (value_digest). On
    every read the key, the digest and (with `valid`) the value's shape are checked; an entry
    that fails any of them, or cannot be read, is never used: a CacheWarning names it, the value
    is computed and the entry overwritten. (Entries from before the digest was stored never
    match a key now: the key holds this package's source digest.) `used`, when given, gets
    `used[kind] = {"entry": path, "hit": bool}` for the run's metadata."""
    if not cache_dir or key is None:
        return compute()
    full = {**key, "torch": torch.__version__, "transformers": transformers.__version__,
            "source": _source_digest()}
    digest = hashlib.sha256(_canonical(full).encode()).hexdigest()
    path = Path(cache_dir) / kind / f"{digest}.json"
    if path.is_file():
        value, why = _trusted(path, full, valid)
        if why is None:
            if used is not None:
                used[kind] = {"entry": str(path), "hit": True}
            return value
        warnings.warn(f"cache entry {path}: {why}; not used: recomputing it and replacing the entry",
                      CacheWarning, stacklevel=2)
    elif path.exists() or path.is_symlink():
        warnings.warn(f"cache entry {path}: not a file; not used: recomputing it", CacheWarning, stacklevel=2)
    value = compute()
    if path.is_file() or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": full, "value": value, "sha256": value_digest(value)})
    if used is not None:
        used[kind] = {"entry": str(path), "hit": False}
    return value
