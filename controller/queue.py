"""A work queue of keys for level-triggered reconcilers (client-go's workqueue semantics).

- A key is queued at most once: adding a key that is already waiting does nothing.
- A key is never handed to two workers at once: a key added while a worker processes it is
  marked dirty and queued again when that worker calls `done(key)`.
- `add_after` delays a key (the earliest wanted time wins); `add_rate_limited` delays it by a
  per-key exponential backoff (`base_delay` doubling up to `max_delay`) that `forget` resets.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable

DEFAULT_BASE_DELAY = 0.2
DEFAULT_MAX_DELAY = 300.0


class WorkQueue:
    def __init__(
        self,
        *,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
        observe_latency: Callable[[float], None] | None = None,
    ) -> None:
        """`observe_latency` is told, for every key handed out, how long it waited in the queue."""
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._observe_latency = observe_latency
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()  # queued, or to be queued again when its worker is done
        self._processing: set[str] = set()
        self._queued_at: dict[str, float] = {}
        self._waiting: list[tuple[float, int, str]] = []  # heap of (due, sequence, key)
        self._due: dict[str, float] = {}  # key -> its earliest due time in the heap
        self._sequence = 0
        self._failures: dict[str, int] = {}
        self._shutdown = False

    # Adding ---------------------------------------------------------------------------------------

    def add(self, key: str) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: str) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        self._queued_at[key] = self._clock()
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        self._cond.notify()

    def add_after(self, key: str, seconds: float) -> None:
        """Queue `key` once `seconds` have passed (at once when <= 0)."""
        if seconds <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown:
                return
            due = self._clock() + seconds
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._sequence += 1
            heapq.heappush(self._waiting, (due, self._sequence, key))
            self._cond.notify()

    def add_rate_limited(self, key: str) -> float:
        """Queue `key` after its backoff (0.2 s, 0.4 s, ... up to `max_delay`); returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self.base_delay * 2.0**failures, self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset `key`'s backoff (after it was processed successfully)."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # Taking ---------------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> str | None:
        """The next key (marked as processing until `done(key)`), or None after `timeout` seconds
        or once the queue is shut down."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                now = self._clock()
                self._move_due(now)
                if self._queue and not self._shutdown:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    queued_at = self._queued_at.pop(key, now)
                    break
                if self._shutdown:
                    return None
                wait = None if deadline is None else deadline - now
                if self._waiting:
                    until_due = self._waiting[0][0] - now
                    wait = until_due if wait is None else min(wait, until_due)
                if wait is not None and wait <= 0:
                    if deadline is not None and now >= deadline:
                        return None
                    continue
                self._cond.wait(wait)
        if self._observe_latency is not None:
            self._observe_latency(max(0.0, now - queued_at))
        return key

    def _move_due(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            due, _, key = heapq.heappop(self._waiting)
            if self._due.get(key) == due:
                del self._due[key]
                self._add(key)

    def done(self, key: str) -> None:
        """`key` is processed; if it was added meanwhile it is queued again now."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    # State ----------------------------------------------------------------------------------------

    def depth(self) -> int:
        """Keys ready to be processed (not counting delayed ones or ones being processed)."""
        with self._cond:
            self._move_due(self._clock())
            return len(self._queue)

    def shutdown(self) -> None:
        """Wake every waiting `get` (they return None); later adds are ignored."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown
