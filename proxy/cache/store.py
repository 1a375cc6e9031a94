"""The proxy's content-addressed blob cache on local disk.

Contract (DESIGN.md, "Rules"): a digest names a file only once its bytes were verified; a blob
appears by an atomic rename after fsync; a process killed at any instant leaves no half blob
visible. Concurrent misses share one fetch across threads and processes (see `proxy.cache.flight`);
the partial file of a killed writer, or of one whose transfer broke off, stays (for
`ResumePolicy.max_age`) so the next fill resumes it.
Readers hold a shared flock on the blob they serve, so eviction (an exclusive, non-blocking flock)
never removes a blob in use. The store keeps no in-memory state that other processes would need:
several gunicorn workers open the same root, before or after fork.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from imagewarm.digest import Digest
from proxy.cache import durable
from proxy.cache.errors import (
    DigestMismatch,
    DiskFull,
    FetchAborted,
    NotCached,
    SizeMismatch,
    StoreError,
)
from proxy.cache.flight import Follower, ResumePolicy, Writer
from proxy.cache.manifest_store import ManifestStore
from proxy.cache.paths import NEW_SUFFIX, PARTIAL_SUFFIX, Layout

__all__ = [
    "BlobInfo",
    "BlobStore",
    "CachedBlob",
    "DigestMismatch",
    "DiskFull",
    "FetchAborted",
    "Follower",
    "ManifestStore",
    "NotCached",
    "PartialSweep",
    "ResumePolicy",
    "SizeMismatch",
    "StoreError",
    "Writer",
]

# How stale a blob's last-use time may get before a read refreshes it: one utime per blob per
# interval keeps the hot path lean while LRU order stays accurate to the interval.
TOUCH_INTERVAL = 60.0
# How long a follower waits for a writer that adds nothing, and a claimant for a writer to publish.
STALL_TIMEOUT = 60.0
_CLAIM_POLL = 0.002


class CachedBlob:
    """A verified blob opened for reading. Holds a shared flock (released by `close`) so eviction
    skips it. `fileno()` is for `os.sendfile`; `read` and `seek` move the descriptor's offset."""

    def __init__(self, digest: Digest, path: Path, fd: int, size: int) -> None:
        self.digest = digest
        self.path = path
        self.size = size
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"cached blob {self.digest} is closed")
        return self._fd

    def read(self, n: int = -1) -> bytes:
        fd = self.fileno()
        if n >= 0:
            return os.read(fd, n)
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fileno(), offset, whence)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class PartialSweep:
    """What a sweep of partial files did: removed (and the bytes freed), and left for their next fill
    to resume (and the disk they hold, outside the committed total)."""

    removed: int = 0
    freed_bytes: int = 0
    resumable: int = 0
    resumable_bytes: int = 0


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int
    last_used: float  # seconds since the epoch


class BlobStore:
    """Blobs by digest under `root` (see `proxy.cache.paths` for the layout).

    Opening the store creates its directories; the first process to open it (no other live store
    holds the open lock) recovers: it deletes every leftover temporary file and the partial files of
    killed writers that `resume` does not accept (too small, too old), and recounts committed bytes
    with one stat per blob (no hashing). Later processes, and `remove_stale_partials` (called
    periodically), only delete what no live writer holds. A claim adopts an accepted partial file
    (see `Writer.adopted`). The store is safe to share across threads and across fork.
    """

    def __init__(
        self,
        root: Path,
        *,
        stall_timeout: float = STALL_TIMEOUT,
        touch_interval: float = TOUCH_INTERVAL,
        resume: ResumePolicy | None = None,
    ) -> None:
        self.root = Path(root)
        self.layout = Layout(self.root)
        self.stall_timeout = stall_timeout
        self.touch_interval = touch_interval
        self.resume = resume or ResumePolicy()
        for directory in self.layout.directories():
            directory.mkdir(parents=True, exist_ok=True)
        self._counter = durable.Counter(self.layout.counter)
        self._open_fd = os.open(self.layout.open_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.recovered = self._recover()

    # -- start-up ------------------------------------------------------------------------------

    def _recover(self) -> bool:
        """Returns True when this process was the only one and did the full recovery."""
        try:
            fcntl.flock(self._open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Others are live: wait for any recovery in progress (it holds the lock exclusively).
            fcntl.flock(self._open_fd, fcntl.LOCK_SH)
            self._remove_stale_partials(everything=False)
            return False
        self._remove_stale_partials(everything=True)
        # Alone, every lock file is a leftover of a killed writer (harmless, but they would pile up).
        for lock in self.layout.locks_dir.iterdir():
            lock.unlink(missing_ok=True)
        self._counter.set(sum(info.size for info in self.blobs()))
        fcntl.flock(self._open_fd, fcntl.LOCK_SH)
        return True

    def remove_stale_partials(self) -> PartialSweep:
        """Delete the files of dead or interrupted writers that are no longer worth resuming (older
        than `resume.max_age`, or too small) and unpublished ones; says what it removed and kept."""
        return self._remove_stale_partials(everything=False)

    def _remove_stale_partials(self, everything: bool) -> PartialSweep:
        with os.scandir(self.layout.partial_dir) as entries:
            names = [entry.name for entry in entries]
        removed = freed = resumable = resumable_bytes = 0
        now = time.time()
        for name in names:
            path = self.layout.partial_dir / name
            if name.endswith((PARTIAL_SUFFIX, NEW_SUFFIX)):
                # A live writer holds its partial file locked; take the lock to be sure it is stale.
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    status = os.fstat(fd)
                    if name.endswith(PARTIAL_SUFFIX) and self.resume.accepts(status, now):
                        resumable, resumable_bytes = resumable + 1, resumable_bytes + status.st_size
                        continue  # the next claim of its digest resumes it
                    if status.st_nlink and os.path.samestat(status, os.stat(path)):
                        path.unlink()
                        removed, freed = removed + 1, freed + status.st_size
                except (BlockingIOError, FileNotFoundError):
                    pass
                finally:
                    os.close(fd)
            elif everything:  # small-write temporaries carry no lock; only safe when we are alone
                path.unlink(missing_ok=True)
        return PartialSweep(removed, freed, resumable, resumable_bytes)

    def close(self) -> None:
        if self._open_fd >= 0:
            os.close(self._open_fd)
            self._open_fd = -1

    # -- reading -------------------------------------------------------------------------------

    def problem(self) -> str | None:
        """What keeps the store from caching now, saying what to do; None when it can. Every directory
        of the layout must be a writable directory, and a file must be creatable where fills start.
        Cheap (a stat per directory, one probe file): `/readyz` asks it on every probe."""
        for directory in self.layout.directories():
            try:
                mode = directory.stat().st_mode
            except FileNotFoundError:
                return f"{directory} is missing (was the cache removed? restart the proxy to recreate it)"
            except OSError as exc:
                return f"{directory} cannot be read: {exc.strerror} (check the cache volume)"
            if not stat.S_ISDIR(mode):
                return f"{directory} is not a directory (remove what is there and restart the proxy)"
            if not os.access(directory, os.W_OK):
                return (
                    f"{directory} is not writable (mount the cache volume read-write and give the proxy's "
                    "user write access to --cache-dir)"
                )
        probe = self.layout.tmp(f"ready-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            probe.unlink(missing_ok=True)
        except OSError as exc:
            return f"{self.layout.partial_dir} is not writable: {exc.strerror} (check the cache volume)"
        return None

    def has(self, digest: Digest) -> bool:
        return self.layout.blob(digest).is_file()

    def size(self, digest: Digest) -> int | None:
        try:
            return self.layout.blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: Digest) -> CachedBlob:
        """The verified blob, locked against eviction and marked recently used; raises NotCached."""
        blob = self._open_committed(digest)
        if blob is None:
            raise NotCached(f"{digest} is not cached")
        return blob

    def _open_committed(self, digest: Digest) -> CachedBlob | None:
        path = self.layout.blob(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for an eviction in progress on this blob
            status = os.fstat(fd)
            if status.st_nlink == 0:  # evicted while we opened it
                os.close(fd)
                return None
            if time.time() - status.st_mtime >= self.touch_interval:
                os.utime(fd)
        except BaseException:
            os.close(fd)
            raise
        return CachedBlob(digest, path, fd, status.st_size)

    # -- writing -------------------------------------------------------------------------------

    def claim(
        self, digest: Digest, expected_size: int | None = None, *, stall_timeout: float | None = None
    ) -> Writer | Follower | CachedBlob:
        """Single flight across processes: a CachedBlob when the blob is already here; else the first
        caller gets the Writer (it must fetch and commit or abort) and concurrent callers get a
        Follower of that writer. Raises FetchAborted if a writer holds the claim but publishes
        nothing within the stall timeout."""
        stall = self.stall_timeout if stall_timeout is None else stall_timeout
        deadline = time.monotonic() + stall
        lock_path = self.layout.lock(digest)
        while True:
            blob = self._open_committed(digest)
            if blob is not None:
                return blob
            lock_fd = durable.try_lock(lock_path)
            if lock_fd is not None:
                # Someone may have committed between our check and our lock.
                blob = self._open_committed(digest)
                if blob is not None:
                    durable.unlock_and_remove(lock_path, lock_fd)
                    return blob
                return Writer(self.layout, digest, expected_size, lock_fd, self._counter, self.resume)
            follower = Follower.attach(self.layout, digest, expected_size, stall)
            if follower is not None:
                return follower
            # The writer holds the claim but has not published its partial file yet (or just finished).
            if time.monotonic() > deadline:
                raise FetchAborted(f"the writer of {digest} published nothing for {stall:g}s; retry")
            time.sleep(_CLAIM_POLL)

    def put_bytes(self, digest: Digest, data: bytes) -> None:
        """Store a small blob whole: verify, fsync, rename. Raises DigestMismatch, DiskFull."""
        if Digest.of(data, digest.algorithm) != digest:
            raise DigestMismatch(f"bytes do not match {digest}; nothing was kept")
        target = self.layout.blob(digest)
        if target.exists():
            return
        durable.atomic_write(self.layout.tmp(os.urandom(8).hex()), target, data)
        self._counter.add(len(data))

    # -- accounting, pins, eviction support ----------------------------------------------------

    def total_bytes(self) -> int:
        """Bytes of committed blobs, kept by every process's commits and evictions."""
        return self._counter.read()

    def blobs(self) -> list[BlobInfo]:
        """Every committed blob with its size and last use (one stat each, no hashing)."""
        infos = []
        for digest, entry in self.layout.blob_entries():
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            infos.append(BlobInfo(digest, status.st_size, status.st_mtime))
        return infos

    def remove(self, digest: Digest) -> int | None:
        """Delete a blob unless a reader or its writer holds it or it is pinned. Returns the bytes
        freed, or None when it was kept."""
        path = self.layout.blob(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            status = os.fstat(fd)
            if status.st_nlink == 0 or self.is_pinned(digest):
                return None
            path.unlink()
        finally:
            os.close(fd)
        self._counter.add(-status.st_size)
        return status.st_size

    def pin(self, digest: Digest, owner: str) -> None:
        """Keep `digest` from eviction until every owner unpins it (the blob need not be cached yet)."""
        path = self.layout.pin(digest, owner)
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                return
            except FileNotFoundError:  # an unpin removed the empty directory meanwhile
                continue

    def unpin(self, digest: Digest, owner: str) -> None:
        path = self.layout.pin(digest, owner)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other owners remain, or already gone
            path.parent.rmdir()

    def pins(self, digest: Digest) -> set[str]:
        try:
            return {self.layout.pin_owner(path) for path in self.layout.pin_dir(digest).iterdir()}
        except FileNotFoundError:
            return set()

    def is_pinned(self, digest: Digest) -> bool:
        return bool(self.pins(digest))
