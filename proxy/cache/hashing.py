"""A digest computed on a thread of its own, so hashing a blob overlaps receiving and writing it.

hashlib releases the GIL on large buffers, so a fetch that hands each chunk to this hasher spends its
own time on the socket and the disk while another core hashes. Pending chunks are bounded (the
caller waits when the hasher falls behind), so memory stays flat.

A fill that resumes a partial file cannot restore the hash state of the writer that left it (hashlib
states cannot be saved), so `ResumedHash` reads the file back from byte 0 while the rest is appended.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading

# Batches waiting to be hashed before `update` makes its caller wait, and the bytes per batch: small
# chunks (a socket read may return a few KiB) are handed over together, one thread switch per batch.
PENDING_BATCHES = 8
BATCH_BYTES = 1 << 20


class PipelinedHash:
    """`update` queues, a daemon thread hashes in order; `hexdigest` and `copy` wait for it to catch up.
    `close` ends the thread (also done by `hexdigest`); a closed hash may still be read, not updated."""

    def __init__(self, algorithm: str) -> None:
        self._hash = hashlib.new(algorithm)
        self.name = self._hash.name
        self._pending: queue.Queue[list[bytes] | None] = queue.Queue(PENDING_BATCHES)
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("update of a closed hash")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hash", daemon=True)
            self._thread.start()
        # The caller may reuse a mutable buffer once we return: keep only immutable bytes.
        self._batch.append(data if isinstance(data, bytes) else bytes(data))
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            self._pending.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _run(self) -> None:
        while (batch := self._pending.get()) is not None:
            for data in batch:
                self._hash.update(data)
            self._pending.task_done()
        self._pending.task_done()

    def _drain(self) -> None:
        if self._thread is not None:
            self._hand_over()
            self._pending.join()

    def copy(self) -> hashlib._Hash:
        """A plain hashlib object holding every byte given so far."""
        self._drain()
        return self._hash.copy()

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Hash what is pending and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._hand_over()
            self._pending.put(None)
            self._thread.join()


class ResumedHash:
    """The digest of a file that already holds `length` bytes and keeps being appended to.

    A thread reads the file back from byte 0 and hashes it, catching up with the appends, so the rest
    of the blob arrives while the adopted bytes are hashed (the source is never kept waiting). Until
    it has caught up, `update` (called after each append) only counts the bytes it must read back;
    from then on `update` hashes the chunks themselves, as PipelinedHash does. `copy` and `hexdigest`
    wait for the catch-up; `close` stops it where it is (the hash is then only good for `name`).
    Owns `fd`: a read-only descriptor of the file, opened apart from the writer's (a flock belongs to
    an open file description, and this one must not hold the writer's lock). Raises OSError from
    `copy`/`hexdigest` when the file could not be read back."""

    def __init__(self, algorithm: str, fd: int, length: int) -> None:
        self._inner = PipelinedHash(algorithm)
        self.name = self._inner.name
        self._fd = fd
        self._lock = threading.Lock()
        self._on_disk = length  # bytes in the file the catch-up must hash
        self._read = 0
        self._direct = False  # caught up: `update` hashes what it is given
        self._stop = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._catch_up, name="rehash", daemon=True)
        self._thread.start()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """`data` has just been appended to the file."""
        if not self._direct:
            with self._lock:
                if not self._direct:
                    self._on_disk += len(data)
                    return
        self._inner.update(data)

    def _catch_up(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stop:
                        return
                    if self._read == self._on_disk:
                        self._direct = True  # from now on `update` feeds the hash, in order
                        return
                    end = self._on_disk
                data = os.pread(self._fd, min(BATCH_BYTES, end - self._read), self._read)
                if not data:
                    raise OSError(
                        f"the partial file ends at byte {self._read}, before the {end} bytes written"
                    )
                self._inner.update(data)
                self._read += len(data)
        except OSError as error:
            self._error = error

    def _caught_up(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise OSError(f"reading the resumed partial file back failed: {self._error}") from self._error

    def copy(self) -> hashlib._Hash:
        """A plain hashlib object holding every byte of the file so far (waits for the catch-up)."""
        self._caught_up()
        return self._inner.copy()

    def hexdigest(self) -> str:
        self._caught_up()
        digest = self._inner.hexdigest()
        self.close()
        return digest

    def close(self) -> None:
        """Stop reading back (an abort need not wait for a long re-read) and release the file. Idempotent."""
        with self._lock:
            self._stop = True
        self._thread.join()
        self._inner.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
