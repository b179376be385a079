"""Safe files: atomic writes (readers see the old file or the whole new one) and cross-process locks.

Every file the suite writes for others to read (`result.json`, `spec.json`,
`metrics.csv`, tables, figures, caches) goes through `atomic_write`: a temp
file in the target folder, then `os.replace`. Locks are `filelock`'s
platform lock (flock on POSIX, msvcrt on Windows), which the OS releases when
the holder dies, so a crashed worker never blocks a run forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import filelock


class Busy(RuntimeError):
    """A non-blocking lock is held by another process."""


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `write(fh)` so that readers never see half of it.

    Args:
        path: destination; its folder is created if missing.
        write: called with a binary file handle open on the temp file.

    Returns:
        `path`, as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Atomically write UTF-8 text with '\\n' line endings."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: Path | str, data: Any) -> Path:
    """Atomically write `data` as indented JSON (key order kept) with a final newline."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path | str) -> Any:
    """The parsed JSON file, or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def file_lock(path: Path | str, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive cross-process lock on `path` for the block.

    Raises:
        Busy: `blocking=False` and another process holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=-1 if blocking else 0)
    except filelock.Timeout:
        raise Busy(f"{path} is held by another process") from None
    try:
        yield
    finally:
        lock.release()


def is_locked(path: Path | str) -> bool:
    """Whether another process holds the lock on `path` now (creates nothing when there is no lock file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with file_lock(path, blocking=False):
            return False
    except Busy:
        return True
