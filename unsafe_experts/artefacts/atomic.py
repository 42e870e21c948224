"""Atomic writes: a reader never sees a half-written file or checkpoint."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import ConfigError, OutputDirBusyError


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
        try:
            write(tmp)
        except Exception as e:
            error = _os_error(e)
            if error is None:
                raise
            raise error from None
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


def _os_error(error: Exception) -> OSError | None:
    """The OSError inside a safetensors write error (a full disk, a read-only folder): its
    Rust writer raises SafetensorError("Error while serializing: IoError(Os { code: 28, kind:
    StorageFull, message: \"No space left on device\" })"), which is no OSError, so a full
    disk was a traceback where the same failure from Python's own writes is one error line."""
    if type(error).__name__ != "SafetensorError":
        return None
    found = re.search(r'IoError\(Os \{ code: (\d+),.*message: "([^"]*)"', str(error))
    if not found:
        return None
    return OSError(int(found[1]), f"{found[2]} (writing safetensors)")


def save_checkpoint_atomic(model, tokenizer, path: str | Path, state_dict=None) -> None:
    """save_pretrained (of `state_dict` when given: a sharded model's gathered weights) into a
    hidden sibling, then rename it into place."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)

    save_directory_atomic(path, write)


LOCK_NAME = ".unsafe-experts.lock"
# what the writers above append to ".NAME.": mkstemp's random part and ".tmp", mkdtemp's eight
# random characters, save_directory_atomic's "old"
_TEMPORARY_SUFFIX = re.compile(r"[A-Za-z0-9_]+\.tmp|[a-z0-9_]{8}|old")


def is_temporary_of(name: str, is_target) -> bool:
    """Whether `name` is a temporary entry an atomic writer above made for an entry that
    `is_target(entry_name)` accepts: `.NAME.XXXXXXXX.tmp` (write_bytes_atomic), `.NAME.XXXXXXXX`
    and `.NAME.old` (save_directory_atomic). Nothing else a folder holds matches: a user's
    `.git`, `.venv` or notes, or the lock file."""
    if not name.startswith("."):
        return False
    for i, char in enumerate(name):
        if char == "." and i > 1 and _TEMPORARY_SUFFIX.fullmatch(name[i + 1:]) and is_target(name[1:i]):
            return True
    return False


class DirectoryLock:
    """An exclusive lock on an output directory for the length of a run. flock is released by
    the kernel when the process dies, so a killed run never leaves a stale lock behind.

    The lock file is opened without following links (a symbolic link there is refused, never
    written through), and must be a regular file with one link. The holder removes it before
    unlocking; a process that opened the file just before that removal and locks it just after
    holds a lock on a file no longer in the folder, so acquire checks that the file it locked
    is still the one at the path, and tries again if not."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def _open(self) -> int | None:
        """The lock file's descriptor, created if absent; None when the file was removed
        between the open and the check (its holder released it: try again)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"output_dir: the lock file {self.path} is a symbolic link; it is "
                                  "never written through a link: remove it") from None
            raise ConfigError(f"output_dir: cannot open the lock file {self.path} ({e.strerror})") from None
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 0:
            os.close(fd)
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise ConfigError(f"output_dir: the lock file {self.path} is not a plain file of its own "
                              "(a hard link, folder or device), which locking would overwrite: remove it")
        return fd

    def acquire(self) -> DirectoryLock:
        while True:
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputDirBusyError(
                    f"output_dir: {self.path.parent} is in use by another run (pid {holder}); "
                    "wait for it or choose another --output_dir") from None
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            locked = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
                break
            os.close(fd)  # its holder removed the file after we opened it: not the lock any more
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file, then unlocks: whoever locks the removed file afterwards sees
        that it is no longer at the path (acquire) and tries again."""
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
