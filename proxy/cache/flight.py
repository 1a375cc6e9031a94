"""One fetch per blob, shared by every process: the Writer that fills the partial file and the
Followers that stream it as it grows.

Two flocks make this work across threads and gunicorn workers alike:
- the digest's lock file (`locks/`), held exclusively by the one Writer from claim to commit/abort;
- the partial file's own inode, held exclusively by its Writer. A Follower probes *that inode*: a
  partial left by a killed writer has no holder, so a Follower can tell its writer is gone without
  any in-memory state.

A partial file left by a killed writer is a prefix of the blob (bytes are only ever appended), so a
new Writer may adopt it instead of fetching those bytes again (`Writer.adopted`, then `resume` or
`start_over`). A writer whose transfer broke off (`Writer.interrupt`: the source reset, stalled or
closed early) leaves its file the same way, as if it had been killed: it releases the inode's lock,
then the claim. Its followers see the inode unlocked and not committed, so they raise FetchAborted
as after an abort, and a new claim never follows the kept file (no live writer holds it) but adopts
it, under the same policy.

The rule that keeps every Follower right: an inode's bytes, once written, never change. Resuming
appends to the adopted inode; starting over publishes a fresh inode by rename and abandons the old
one, never truncated or rewritten. So whatever inode a Follower opened, the bytes it read are a
prefix of that inode's final content, which is served only if it commits, i.e. verified. (A follower
still polling an interrupted writer's inode at the instant the next writer resumes it may find the
lock held again and follow that fill instead of failing: the same inode, appended to, and still
served only if it commits.) While the new Writer asks the source whether it can resume, the adopted
file is under a private name, locked: Followers find no partial and wait for the claim, as for any
writer not yet published.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from imagewarm.digest import Digest
from proxy.cache import durable
from proxy.cache.errors import DigestMismatch, DiskFull, FetchAborted, SizeMismatch
from proxy.cache.hashing import PipelinedHash, ResumedHash
from proxy.cache.paths import Layout

FOLLOW_CHUNK = 1 << 20
# Followers poll the growing file: start fast so the first bytes go out at once, back off when idle.
POLL_MIN = 0.001
POLL_MAX = 0.02

# A killed writer's partial file is resumed when it holds at least this much: below one chunk of a
# fetch, re-reading and re-hashing it, and the chance a torn tail ends in a mismatch, are not worth
# the few milliseconds of transfer saved.
RESUME_MIN_BYTES = 1 << 20
# ... and was last written at most this long ago: long enough for a restarted pod, a rebooted node or
# a rollout; short enough that a fill nobody comes back for does not hold cache space for days.
RESUME_MAX_AGE = 6 * 3600.0
_ADOPT_TRIES = 5
_ADOPT_WAIT = 0.002

# What `Writer.interrupt` did with the partial file: kept for the next fill; dropped because it is
# under the policy's minimum, or because this writer resumed it and added nothing (the next fill
# starts from byte 0 rather than resuming at the byte where the source keeps failing); or nothing to
# keep (already aborted, verified, or no resume policy).
Interruption = Literal["kept", "too_small", "no_progress", "closed"]


@dataclass(frozen=True)
class ResumePolicy:
    """Which partial files of killed or interrupted writers are worth resuming (the rest are removed)."""

    min_bytes: int = RESUME_MIN_BYTES
    max_age: float = RESUME_MAX_AGE

    def accepts(self, status: os.stat_result, now: float) -> bool:
        return status.st_size >= self.min_bytes and now - status.st_mtime <= self.max_age


@dataclass(frozen=True)
class _Adopted:
    """A killed writer's partial file, locked by us, under a private name until we decide."""

    fd: int
    path: Path
    size: int


class Writer:
    """The single fetcher of a blob. `write(chunk)` appends; `commit()` verifies size and digest, fsyncs
    and renames the blob into place; `abort()` removes everything. As a context manager it aborts if
    the block raises (and does nothing if it already committed).

    `expected_size` may be set after the claim (e.g. from the upstream's Content-Length).
    Raises SizeMismatch (when more bytes arrive than `expected_size`, or fewer at commit),
    DigestMismatch at commit, DiskFull on ENOSPC; in each case nothing is kept and followers see
    FetchAborted. When the transfer itself breaks off, `interrupt()` instead of `abort()` keeps the
    bytes written so far for the next claim to resume (followers see FetchAborted all the same).

    With a `resume` policy, a claim that finds a partial file its writer left (killed, or interrupted)
    adopts it when the policy accepts it: `adopted` is then its size, and the caller either `resume`s
    (the source sends the rest from byte `adopted`) or `start_over`s (the first `write` does that by
    itself).
    An abort before deciding puts the adopted file back for a later claim.
    """

    def __init__(
        self,
        layout: Layout,
        digest: Digest,
        expected_size: int | None,
        lock_fd: int,
        counter: durable.Counter,
        resume: ResumePolicy | None = None,
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.bytes_written = 0
        self.adopted = 0  # bytes of a killed writer's partial file this writer holds, undecided
        self.resumed = False
        self._layout = layout
        self._resume = resume
        self._resumed_from = 0  # bytes in the file when this writer took it: progress is beyond them
        self._lock_fd: int | None = lock_fd
        self._counter = counter
        self._hash: PipelinedHash | ResumedHash = PipelinedHash(digest.algorithm)  # overlaps the next write
        self._partial = layout.partial(digest)
        self._fd: int | None = None
        self._held: _Adopted | None = None
        self._hash_at_disk_full: hashlib._Hash | None = None
        self._verified = False
        try:
            if resume is None or not self._adopt(resume):
                self._fd = self._publish_partial()
        except BaseException:
            self._release_claim()
            raise

    def _adopt(self, policy: ResumePolicy) -> bool:
        """Take a killed writer's partial file if the policy accepts it: lock it and move it under a
        private name (see the module's docstring). False when there is none worth it."""
        try:
            fd = os.open(self._partial, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:  # none (the usual case), or not a file we can write: a fresh one replaces it
            return False
        hidden = self._layout.new_partial(self.digest, secrets.token_hex(8))
        try:
            size = self._stale_size(fd, policy)
            if size is not None:
                os.rename(self._partial, hidden)
        except OSError:
            size = None
        if size is None:
            os.close(fd)
            return False
        self._held = _Adopted(fd, hidden, size)
        self.adopted = size
        return True

    def _stale_size(self, fd: int, policy: ResumePolicy) -> int | None:
        """The size of the partial file behind `fd` if its writer is gone and the policy accepts it
        (it is then locked by us); None otherwise."""
        for attempt in range(_ADOPT_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A store's sweep holds it an instant to judge it; we hold the claim, so no live writer
                # can (never wait long on a lock someone may hold for good).
                if attempt == _ADOPT_TRIES - 1:
                    return None
                time.sleep(_ADOPT_WAIT)
        held = os.fstat(fd)
        if held.st_nlink == 0 or not os.path.samestat(held, os.stat(self._partial)):
            return None  # removed or replaced meanwhile
        return held.st_size if policy.accepts(held, time.time()) else None

    def resume(self, expected_size: int) -> None:
        """Keep the adopted bytes: publish the file again and append the rest from byte `adopted`.
        The adopted bytes are hashed again, read back from the file while the rest arrives."""
        held = self._held
        if held is None:
            raise FetchAborted(f"writer for {self.digest} adopted no partial file to resume")
        if expected_size <= held.size:
            raise ValueError(f"{self.digest}: {held.size} bytes adopted, not fewer than {expected_size}")
        read_fd = os.open(held.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(held.fd, held.size, os.SEEK_SET)
            os.rename(held.path, self._partial)  # followers may attach from here on
        except BaseException:
            os.close(read_fd)
            raise
        self._held = None
        self.adopted = 0
        self._hash.close()
        self._hash = ResumedHash(self.digest.algorithm, read_fd, held.size)
        self._fd = held.fd
        self.bytes_written = held.size
        self._resumed_from = held.size
        self.expected_size = expected_size
        self.resumed = True

    def start_over(self) -> None:
        """Drop the adopted bytes (if any) and fill from byte 0 into a fresh partial file."""
        held, self._held = self._held, None
        if held is None:
            return
        self.adopted = 0
        try:
            held.path.unlink(missing_ok=True)
        finally:
            os.close(held.fd)  # whoever still reads the old inode sees its writer gone
        self._fd = self._publish_partial()

    def _publish_partial(self) -> int:
        # Create a fresh inode under a private name, lock it, then rename it over any stale partial:
        # followers only ever open a partial path whose inode is locked by a live writer.
        while True:
            new = self._layout.new_partial(self.digest, secrets.token_hex(8))
            try:
                fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as error:
                if durable.is_disk_full(error):
                    raise DiskFull(error.errno, "cache disk full: free space on the cache volume") from error
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # a starting store took it for stale in the instant before
                os.close(fd)
                continue
            os.rename(new, self._partial)
            return fd

    @property
    def path(self) -> Path:
        return self._partial

    def running_hash(self) -> hashlib._Hash:
        """A copy of the hash of every byte written so far: lets a caller whose caching stopped (DiskFull)
        keep verifying the rest of the stream it passes through."""
        if self._hash_at_disk_full is not None:
            return self._hash_at_disk_full.copy()
        return self._hash.copy()

    def write(self, chunk: bytes | memoryview) -> None:
        if self._held is not None:
            self.start_over()
        if self._fd is None or self._verified:
            raise FetchAborted(f"writer for {self.digest} is closed or verified; claim again")
        if self.expected_size is not None and self.bytes_written + len(chunk) > self.expected_size:
            self.abort()
            raise SizeMismatch(f"{self.digest}: more than the expected {self.expected_size} bytes arrived")
        try:
            durable.write_all(self._fd, chunk)
        except OSError as error:
            if durable.is_disk_full(error):
                # Before the abort: a resumed hash stops reading the file back when it is closed.
                self._hash_at_disk_full = self._hash.copy()
            self.abort()
            if durable.is_disk_full(error):
                raise DiskFull(error.errno, f"cache disk full writing {self.digest}: free space") from error
            raise
        self._hash.update(chunk)
        self.bytes_written += len(chunk)

    def verify(self) -> None:
        """Check every byte is here with the right digest (no more writes may follow). Raises
        SizeMismatch or DigestMismatch after aborting. Lets a caller release bytes it held back from a
        client before the slower `commit` (fsync) finishes."""
        if self._held is not None:
            self.start_over()
        if self._fd is None:
            raise FetchAborted(f"writer for {self.digest} is closed; claim again")
        if self._verified:
            return
        if self.expected_size is not None and self.bytes_written != self.expected_size:
            self.abort()
            raise SizeMismatch(
                f"{self.digest}: got {self.bytes_written} bytes, expected {self.expected_size}; none kept"
            )
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            self.abort()
            raise DigestMismatch(
                f"bytes for {self.digest} hash to {self._hash.name}:{actual}; nothing was kept"
            )
        self._verified = True

    def commit(self) -> None:
        """Verify, fsync, rename into place, fsync the directory. Only then is the digest visible."""
        self.verify()
        assert self._fd is not None  # verify raised otherwise
        target = self._layout.blob(self.digest)
        try:
            os.fsync(self._fd)
            target.parent.mkdir(parents=True, exist_ok=True)
            existed = target.exists()
            os.rename(self._partial, target)
            durable.fsync_dir(target.parent)
        except OSError as error:
            self.abort()
            if durable.is_disk_full(error):
                raise DiskFull(error.errno, f"cache disk full committing {self.digest}") from error
            raise
        if not existed:
            self._counter.add(self.bytes_written)
        self._close_partial()  # releases the inode lock: followers see the commit
        self._release_claim()

    def abort(self) -> None:
        """Drop the partial file and release the claim; followers raise FetchAborted. Idempotent.
        An adopted file not yet resumed goes back where it was: this writer added nothing to it."""
        held, self._held = self._held, None
        if held is not None:
            self.adopted = 0
            try:
                os.rename(held.path, self._partial)
            except OSError:
                held.path.unlink(missing_ok=True)
            finally:
                os.close(held.fd)
        if self._fd is not None:
            # Unlink first, then release: a follower that sees the lock gone also sees no blob.
            try:
                if os.path.samestat(os.stat(self._partial), os.fstat(self._fd)):
                    self._partial.unlink()
            except FileNotFoundError:
                pass
            self._close_partial()
        self._release_claim()

    def interrupt(self) -> Interruption:
        """The transfer broke off (the source reset, stalled or closed early), which says nothing
        against the bytes written so far: leave the partial file where it is for the next claim to
        adopt and resume, as a killed writer's, and release the claim. The inode's lock goes first,
        so followers see a writer gone without a commit and raise FetchAborted, as after `abort`.

        It is an `abort` instead when the file is under the policy's `min_bytes` (the sweep would
        remove it), and when this writer resumed the file and added nothing: each attempt either gets
        further or falls back to byte 0, so a source that always fails at the same byte never keeps
        a fill resuming at that byte (the clients' retries bound the attempts). Idempotent."""
        if self._fd is None or self._held is not None or self._verified or self._resume is None:
            self.abort()  # nothing of ours to keep (an adopted file not yet resumed goes back as it was)
            return "closed"
        if self.bytes_written < self._resume.min_bytes:
            self.abort()
            return "too_small"
        if self.bytes_written <= self._resumed_from:
            self.abort()
            return "no_progress"
        self._close_partial()  # the file stays at its name, unlocked: a dead writer's, for the next claim
        self._release_claim()
        return "kept"

    def _close_partial(self) -> None:
        self._hash.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _release_claim(self) -> None:
        if self._lock_fd is not None:
            durable.unlock_and_remove(self._layout.lock(self.digest), self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is not None or self._fd is not None:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit or abort must not hold the claim (and its followers) hostage.
        if getattr(self, "_lock_fd", None) is not None:
            self.abort()


class Follower:
    """Iterator of the bytes of a blob another Writer (any process) is fetching, read from the partial
    file as it grows. It ends when the writer has committed, and then the bytes yielded are exactly the
    verified blob. Raises FetchAborted when the writer aborts, dies, or adds nothing for
    `stall_timeout` seconds; the caller must then fail its response (the bytes it sent are suspect).
    """

    def __init__(
        self, layout: Layout, digest: Digest, fd: int, expected_size: int | None, stall_timeout: float
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.bytes_read = 0
        self._layout = layout
        self._fd: int | None = fd
        self._stall_timeout = stall_timeout
        self._committed = False

    @classmethod
    def attach(
        cls, layout: Layout, digest: Digest, expected_size: int | None, stall_timeout: float
    ) -> Follower | None:
        """Open the digest's partial file if a live writer holds it; None otherwise."""
        try:
            fd = os.open(layout.partial(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if durable.is_locked(fd):
            return cls(layout, digest, fd, expected_size, stall_timeout)
        os.close(fd)
        return None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        if self._fd is None:
            raise StopIteration
        poll = POLL_MIN
        idle_since = time.monotonic()
        while True:
            chunk = os.read(self._fd, FOLLOW_CHUNK)
            if chunk:
                self.bytes_read += len(chunk)
                return chunk
            if self._committed:
                self.close()
                raise StopIteration
            if durable.is_locked(self._fd):  # writer alive: wait for more
                if time.monotonic() - idle_since > self._stall_timeout:
                    self.close()
                    raise FetchAborted(
                        f"the fetch of {self.digest} stalled for {self._stall_timeout:g}s; retry the pull"
                    )
                time.sleep(poll)
                poll = min(poll * 2, POLL_MAX)
                continue
            if self._is_committed():
                self._committed = True  # read what remains, then stop
                continue
            self.close()
            raise FetchAborted(f"the fetch of {self.digest} was aborted by its writer; retry the pull")

    def _is_committed(self) -> bool:
        assert self._fd is not None
        try:
            committed = os.stat(self._layout.blob(self.digest))
        except FileNotFoundError:
            return False
        if not os.path.samestat(committed, os.fstat(self._fd)):
            return False
        # From here on we serve a cached blob: hold it against eviction like any reader.
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
