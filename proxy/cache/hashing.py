"""A digest computed on a thread of its own, so hashing a blob overlaps receiving and writing it.

hashlib releases the GIL on large buffers, so a fetch that hands each chunk to this hasher spends its
own time on the socket and the disk while another core hashes. Pending chunks are bounded (the
caller waits when the hasher falls behind), so memory stays flat.
"""

from __future__ import annotations

import hashlib
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
