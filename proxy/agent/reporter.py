"""Coalesced status writes of one node's NodeImage (docs/DESIGN.md, "Control plane").

The agent marks the status changed (`changed(urgent=True)` for a phase change, `urgent=False` for
progress); one thread writes the latest whole status as a JSON merge patch of the status
subresource, never on every change:

- a phase change is written `status_delay` after the first unwritten one (about a second), so
  several changes in that window are one write;
- progress alone is written at most once per `progress_interval` (10 s by default), plus up to 20 %
  jitter so thousands of agents started together spread their writes;
- an unchanged document is not written at all;
- a temporary error (429, 5xx, no answer) backs off exponentially with jitter (1 s doubling to 60 s)
  and then writes the latest status, not every missed one.

So a pull task costs its node about two writes (Pulling, then Succeeded) plus one per 10 s of a long
pull, and 5,000 agents do not throttle the API server (kruise PR #2298).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagewarm.kube import KubeError, NotFound
from proxy import metrics

log = logging.getLogger("imagewarm.proxy.agent.reporter")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 60.0


@dataclass(frozen=True)
class Schedule:
    """When the next write is due (pure: the thread asks it with the times it knows)."""

    status_delay: float = 1.0
    progress_interval: float = 10.0

    def next_write(
        self,
        *,
        urgent_since: float | None,
        progress_pending: bool,
        last_write: float | None,
        progress_gap: float,
        retry_at: float | None,
    ) -> float | None:
        """The monotonic time of the next write, or None when nothing is pending. `urgent_since` is
        when the first unwritten phase change came; `progress_gap` this write's progress interval
        (with its jitter); `retry_at` the end of a backoff after a failed write."""
        due: float | None = None
        if urgent_since is not None:
            due = urgent_since + self.status_delay
        elif progress_pending:
            due = (last_write + progress_gap) if last_write is not None else 0.0
        if due is not None and retry_at is not None:
            due = max(due, retry_at)
        return due


def retry_delay(failures: int, jitter: float) -> float:
    """Seconds before retrying after `failures` failed writes in a row (1 s doubling, capped at
    60 s), times `jitter` (0.5 to 1.5) so agents throttled together do not retry together."""
    return float(min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2.0 ** max(0, failures - 1)) * jitter)


class Reporter:
    """Writes `build()` with `write(status)` when due. `build` returns the whole status to write, or
    None when there is nothing to write (no NodeImage)."""

    def __init__(
        self,
        build: Callable[[], dict[str, Any] | None],
        write: Callable[[dict[str, Any]], None],
        schedule: Schedule,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.build = build
        self.write = write
        self.schedule = schedule
        self.rng = rng or random.Random()
        self._cond = threading.Condition()
        self._urgent_since: float | None = None
        self._progress_pending = False
        self._last_write: float | None = None
        self._progress_gap = self._gap()
        self._retry_at: float | None = None
        self._failures = 0
        self._written: dict[str, Any] | None = None
        self._stop = threading.Event()

    def _gap(self) -> float:
        return self.schedule.progress_interval * self.rng.uniform(1.0, 1.2)

    def changed(self, *, urgent: bool) -> None:
        """The status changed: a phase (urgent) or only progress."""
        with self._cond:
            if urgent:
                if self._urgent_since is None:
                    self._urgent_since = time.monotonic()
            else:
                self._progress_pending = True
            self._cond.notify()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify()

    def run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                due = self.schedule.next_write(
                    urgent_since=self._urgent_since,
                    progress_pending=self._progress_pending,
                    last_write=self._last_write,
                    progress_gap=self._progress_gap,
                    retry_at=self._retry_at,
                )
                now = time.monotonic()
                if due is None or due > now:
                    self._cond.wait(None if due is None else due - now)
                    continue
                was_urgent = self._urgent_since is not None
                self._urgent_since, self._progress_pending = None, False
            self._write_once(was_urgent)

    def _write_once(self, was_urgent: bool) -> None:
        status = self.build()
        if status is None or status == self._written:
            return
        try:
            self.write(status)
        except NotFound:  # the NodeImage is gone (its Node was deleted): nothing to report on
            self._written = None
            return
        except Exception as exc:  # KubeError, or a local fault (e.g. an unreadable CA file): retry
            metrics.AGENT_STATUS_WRITE_ERRORS.labels(reason=_reason(exc)).inc()
            self._failures += 1
            delay = retry_delay(self._failures, self.rng.uniform(0.5, 1.5))
            log.warning(
                "could not write the NodeImage status; retrying",
                extra={"error": str(exc), "retry_seconds": round(delay, 2)},
            )
            with self._cond:
                self._retry_at = time.monotonic() + delay
                if was_urgent and self._urgent_since is None:
                    self._urgent_since = time.monotonic()
                self._progress_pending = True
            return
        metrics.AGENT_STATUS_WRITES.inc()
        self._written = status
        self._failures = 0
        with self._cond:
            self._retry_at = None
            self._last_write = time.monotonic()
            self._progress_gap = self._gap()


def _reason(exc: Exception) -> str:
    if not isinstance(exc, KubeError):
        return "local"
    if exc.status == 429:
        return "throttled"
    if exc.temporary:
        return "unavailable"
    return "rejected"
