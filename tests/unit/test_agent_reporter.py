"""The node agent's status writes: when they are due (coalescing, progress interval, backoff), and
the writer thread against a recording writer (the API server's side: tests/e2e)."""

from __future__ import annotations

import random
import threading
from typing import Any

from imagewarm.kube import Invalid, NotFound, Unavailable
from proxy.agent.reporter import Reporter, Schedule, retry_delay

SCHEDULE = Schedule(status_delay=1.0, progress_interval=10.0)


def due(**kwargs: Any) -> float | None:
    values: dict[str, Any] = {
        "urgent_since": None, "progress_pending": False, "last_write": None, "progress_gap": 10.0,
        "retry_at": None,
    }  # fmt: skip
    return SCHEDULE.next_write(**(values | kwargs))


def test_nothing_pending_means_no_write() -> None:
    assert due() is None


def test_a_phase_change_is_written_a_status_delay_after_the_first_one() -> None:
    # Later changes in that window ride along: the deadline stays the first change's.
    assert due(urgent_since=100.0, last_write=99.5) == 101.0
    assert due(urgent_since=100.0, progress_pending=True, last_write=99.5) == 101.0


def test_progress_alone_waits_for_its_interval_after_the_last_write() -> None:
    assert due(progress_pending=True, last_write=100.0, progress_gap=11.5) == 111.5
    assert due(progress_pending=True) == 0.0  # never written: now


def test_a_backoff_delays_every_write() -> None:
    assert due(urgent_since=100.0, retry_at=130.0) == 130.0
    assert due(progress_pending=True, last_write=100.0, retry_at=105.0) == 110.0


def test_retry_delay_doubles_with_jitter_and_a_cap() -> None:
    assert [retry_delay(n, 1.0) for n in (1, 2, 3, 4, 7, 20)] == [1, 2, 4, 8, 60, 60]
    assert retry_delay(2, 0.5) == 1.0 and retry_delay(2, 1.5) == 3.0


class Writer:
    """Records writes; raises the queued errors first."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.writes: list[dict[str, Any]] = []
        self.event = threading.Event()

    def __call__(self, status: dict[str, Any]) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.writes.append(status)
        self.event.set()


def reporter(writer: Writer, document: dict[str, Any], **schedule: float) -> Reporter:
    made = Reporter(lambda: dict(document), writer, Schedule(**schedule), rng=random.Random(1))
    threading.Thread(target=made.run, daemon=True).start()
    return made


def test_many_changes_in_the_window_are_one_write_of_the_latest_status() -> None:
    writer = Writer()
    document = {"pulling": 0}
    made = reporter(writer, document, status_delay=0.2, progress_interval=60)
    for count in range(20):
        document["pulling"] = count
        made.changed(urgent=count % 2 == 0)
    assert writer.event.wait(5)
    made.changed(urgent=True)  # the same document again: not written
    threading.Event().wait(0.5)
    made.stop()
    assert writer.writes == [{"pulling": 19}]


def test_a_throttled_write_is_retried_with_the_latest_status() -> None:
    writer = Writer(Unavailable("429 too many requests", status=429), Invalid("bad", status=422))
    document = {"phase": "Pulling"}
    made = reporter(writer, document, status_delay=0.01, progress_interval=60)
    made.changed(urgent=True)
    document["phase"] = "Succeeded"
    assert writer.event.wait(10)  # after 1 s and 2 s of backoff (times 0.5 to 1.5)
    made.stop()
    assert writer.writes == [{"phase": "Succeeded"}]


def test_a_missing_nodeimage_is_not_retried() -> None:
    writer = Writer(NotFound("gone", status=404))
    made = reporter(writer, {"x": 1}, status_delay=0.01, progress_interval=60)
    made.changed(urgent=True)
    threading.Event().wait(0.3)
    made.stop()
    assert writer.writes == [] and writer.errors == []
