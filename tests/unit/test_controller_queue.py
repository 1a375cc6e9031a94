"""The work queue's semantics (client-go's): dedupe, never two workers on one key, delays,
per-key exponential backoff; and the runner's handling of reconcile results and errors."""

from __future__ import annotations

import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from controller.queue import WorkQueue
from controller.runner import Runner
from imagewarm.kube import Conflict, Forbidden, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_queued_once() -> None:
    queue = WorkQueue()
    for key in ["a", "b", "a", "a", "c", "b"]:
        queue.add(key)
    assert queue.depth() == 3
    assert [queue.get(0), queue.get(0), queue.get(0), queue.get(0)] == ["a", "b", "c", None]


def test_a_key_added_while_processing_waits_for_done() -> None:
    queue = WorkQueue()
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("a")
    queue.add("a")
    assert queue.get(0) is None, "a key being processed must not go to a second worker"
    queue.done("a")
    assert queue.get(0) == "a"
    queue.done("a")
    assert queue.get(0) is None


@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=30))
def test_never_two_workers_on_one_key(adds: list[str]) -> None:
    """Interleave adds, gets and dones: a key handed out is never handed out again before done."""
    queue = WorkQueue()
    processing: set[str] = set()
    for i, key in enumerate(adds):
        queue.add(key)
        got = queue.get(0)
        if got is not None:
            assert got not in processing
            processing.add(got)
        if i % 3 == 2 and processing:
            done = sorted(processing)[0]
            processing.discard(done)
            queue.done(done)


def test_add_after_waits_and_the_earliest_time_wins() -> None:
    clock = Clock()
    queue = WorkQueue(clock=clock)
    queue.add_after("a", 10)
    queue.add_after("a", 5)
    queue.add_after("a", 20)
    assert queue.get(0) is None and queue.depth() == 0
    clock.now = 5
    assert queue.depth() == 1 and queue.get(0) == "a"
    queue.done("a")
    clock.now = 30
    assert queue.get(0) is None, "the later, superseded times must not queue it again"


def test_backoff_doubles_per_key_up_to_the_cap_and_forget_resets() -> None:
    clock = Clock()
    queue = WorkQueue(base_delay=0.2, max_delay=1.0, clock=clock)
    delays = [queue.add_rate_limited("a") for _ in range(5)]
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert queue.add_rate_limited("b") == 0.2
    queue.forget("a")
    assert queue.add_rate_limited("a") == 0.2


def test_get_blocks_until_a_key_is_added_or_shutdown() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    thread = threading.Thread(target=lambda: got.append(queue.get(5)))
    thread.start()
    time.sleep(0.05)
    queue.add("x")
    thread.join(5)
    assert got == ["x"]
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    queue.shutdown()
    waiter.join(5)
    assert got == ["x", None]


def test_latency_is_observed() -> None:
    clock = Clock()
    seen: list[float] = []
    queue = WorkQueue(clock=clock, observe_latency=seen.append)
    queue.add("a")
    clock.now = 2.5
    assert queue.get(0) == "a"
    assert seen == [2.5]


class Scripted:
    """A reconciler answering from a script of results (a value or an exception) per call."""

    name = "scripted"

    def __init__(self, *results: object) -> None:
        self.results = list(results)
        self.calls: list[str] = []

    def reconcile(self, key: str) -> float | None:
        self.calls.append(key)
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[return-value]


def test_runner_results_and_errors() -> None:
    reconciler = Scripted(
        None, 30.0, Unavailable("down"), Conflict("changed"), Forbidden("rbac"), KeyError("bug"), None
    )
    runner = Runner(workers=1)
    runner.add(reconciler)
    queue = runner.queues["scripted"]
    results = [runner.process("scripted", "ns/a") for _ in range(7)]
    assert results == ["success", "requeue", "retry", "retry", "error", "error", "success"]
    # Four failures in a row backed the key off 0.2, 0.4, 0.8, 1.6 s; the success reset it.
    assert queue.failures("ns/a") == 0


def test_runner_workers_process_keys_and_stop() -> None:
    done = threading.Event()

    class Counting:
        name = "counting"
        seen: list[str] = []

        def reconcile(self, key: str) -> float | None:
            self.seen.append(key)
            if len(self.seen) == 3:
                done.set()
            return None

    runner = Runner(workers=2)
    counting = Counting()
    runner.add(counting)
    runner.start()
    runner.enqueue_all("counting", ["a", "b", "c", "a"])
    assert done.wait(5)
    runner.stop()
    assert sorted(set(counting.seen)) == ["a", "b", "c"]
