"""Content digests as DVC 3 computes them, so MLflow tags point at DVC-tracked bytes."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from unsafe_experts.records import file_digest


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def dvc_md5(path: str | Path) -> str:
    """A file's md5, or a directory's `<md5>.dir` over its sorted (relpath, md5) entries."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    entries = sorted(
        ({"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
         for p in path.rglob("*") if p.is_file()),
        key=lambda e: e["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def git_commit(cwd: str | Path = ".") -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
