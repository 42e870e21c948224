"""Atomic writes: a reader never sees a half-written file or checkpoint."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputDirBusyError


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_directory_atomic(path: str | Path, write) -> None:
    """`write(tmp)` fills a hidden sibling directory, which is then renamed into place (an
    existing `path` is replaced only once the new one is complete)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint_atomic(model, tokenizer, path: str | Path, state_dict=None) -> None:
    """save_pretrained (of `state_dict` when given: a sharded model's gathered weights) into a
    hidden sibling, then rename it into place."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    save_directory_atomic(path, write)


LOCK_NAME = ".unsafe-experts.lock"


class DirectoryLock:
    """An exclusive lock on an output directory for the length of a run. flock is released by
    the kernel when the process dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DirectoryLock:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputDirBusyError(
                f"output_dir: {self.path.parent} is in use by another run (pid {holder}); "
                "wait for it or choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def inside(base: str | Path, name: str) -> Path:
    """base/name, refusing a name that would land outside base ("..", absolute paths, links)."""
    base = Path(base).resolve()
    path = (base / name).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{name!r} would be written outside {base}")
    return path
