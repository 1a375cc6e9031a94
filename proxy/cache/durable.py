"""Crash-safe file primitives for the cache: directory fsync, atomic small writes, flock'd lock
files that can be deleted safely, and a byte counter shared by every process using the cache.

Every function opens its own file descriptors: flock locks belong to an open file description, and
descriptors shared over fork (gunicorn's preload) would make every worker the same lock holder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from proxy.cache.errors import DiskFull

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: OSError) -> bool:
    return error.errno in _DISK_FULL


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (regular files rarely write short, but may)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(tmp: Path, target: Path, data: bytes) -> None:
    """Write `data` to `target` so that a crash leaves either the old file or the whole new one.

    `tmp` must be on the same filesystem. Raises DiskFull (after removing `tmp`) when space runs out.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # a new directory needs space too
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            message = f"cache disk full writing {target.name}: free space on the cache volume"
            raise DiskFull(error.errno, message) from error
        raise
    fsync_dir(target.parent)


def try_lock(path: Path) -> int | None:
    """Take an exclusive flock on the lock file `path` without waiting.

    Returns the locked descriptor, or None when another holder has it. Lock files may be unlinked by
    their holder (see `unlock_and_remove`), so after locking we check that the inode we hold is still
    the one at `path`; if not, we retry on the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        held = os.fstat(fd)
        if (held.st_ino, held.st_dev) == (current.st_ino, current.st_dev):
            return fd
        os.close(fd)


def unlock_and_remove(path: Path, fd: int) -> None:
    """Remove a lock file we hold, then release it: lock files do not pile up one per digest."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def is_locked(fd: int) -> bool:
    """True when someone holds an exclusive flock on the file behind `fd` (probed with a shared lock,
    released at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


_COUNTER = struct.Struct("<q")


class Counter:
    """A signed 64-bit total in a file, updated under flock by any process (one open, lock, read,
    write, close per update: used per commit or eviction, never per chunk)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _locked(self, operation: int) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, operation)
        return fd

    def read(self) -> int:
        fd = self._locked(fcntl.LOCK_SH)
        try:
            raw = os.pread(fd, _COUNTER.size, 0)
        finally:
            os.close(fd)
        return _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0

    def add(self, delta: int) -> int:
        fd = self._locked(fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _COUNTER.size, 0)
            value = (_COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0) + delta
            os.pwrite(fd, _COUNTER.pack(value), 0)
        finally:
            os.close(fd)
        return value

    def set(self, value: int) -> None:
        fd = self._locked(fcntl.LOCK_EX)
        try:
            os.pwrite(fd, _COUNTER.pack(value), 0)
        finally:
            os.close(fd)
