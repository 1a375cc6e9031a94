"""Runs level-triggered reconcilers: one work queue per reconciler, worker threads taking keys.

A reconciler reads the informer caches, computes the wanted state for one key and patches the
difference; it never depends on which event woke it (informer handlers only enqueue keys). Its
result says when the key must be looked at again (seconds) or None.

Errors: a temporary `KubeError` (`.temporary`: no answer, 429, 5xx) or a `Conflict` is retried
with the key's exponential backoff. A permanent `KubeError` (Forbidden, Invalid...) is logged once
per key and message and retried with backoff too (capped at 5 minutes: never a hot loop; an RBAC
fix is picked up); reporting a bad spec to the user (Warning Event, status message) is the
reconciler's job, which then returns normally. Any other exception is a bug: logged with its
traceback and retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from controller import metrics
from controller.queue import WorkQueue
from imagewarm.informer import Handler
from imagewarm.kube import Conflict, KubeError

log = logging.getLogger("imagewarm.controller.runner")


class Reconciler(Protocol):
    name: str

    def reconcile(self, key: str) -> float | None:
        """Bring the object named `key` to its wanted state; seconds until it must be looked at
        again, or None."""
        ...


class Runner:
    def __init__(self, workers: int = 2, *, base_delay: float = 0.2, max_delay: float = 300.0) -> None:
        """`workers` threads per reconciler."""
        self.workers = workers
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.reconcilers: dict[str, Reconciler] = {}
        self.queues: dict[str, WorkQueue] = {}
        self._threads: list[threading.Thread] = []
        self._logged: dict[str, str] = {}  # key -> the permanent error last logged for it
        self._metrics: dict[str, tuple[Any, dict[str, Any]]] = {}  # name -> its metrics' children
        self._lock = threading.Lock()

    def add(self, reconciler: Reconciler) -> None:
        name = reconciler.name
        if name in self.reconcilers:
            raise ValueError(f"a reconciler named {name!r} is already registered")
        latency = metrics.QUEUE_LATENCY.labels(name)
        queue = WorkQueue(
            base_delay=self.base_delay, max_delay=self.max_delay, observe_latency=latency.observe
        )
        self.reconcilers[name] = reconciler
        self.queues[name] = queue
        results = ("success", "requeue", "retry", "error")
        self._metrics[name] = (
            metrics.RECONCILE_SECONDS.labels(name),
            {r: metrics.RECONCILES.labels(name, r) for r in results},
        )
        metrics.QUEUE_DEPTH.labels(name).set_function(queue.depth)

    # Feeding --------------------------------------------------------------------------------------

    def enqueue(self, name: str, key: str, after: float = 0.0) -> None:
        self.queues[name].add_after(key, after)

    def enqueue_all(self, name: str, keys: Iterable[str]) -> None:
        queue = self.queues[name]
        for key in keys:
            queue.add(key)

    def handler(
        self, name: str, keys: Callable[[dict[str, Any]], Iterable[str]], *, after: float = 0.0
    ) -> Handler:
        """An informer handler enqueueing, for every changed object, the keys `keys(obj)` names
        (after `after` seconds: coalesces bursts such as a Deployment's pods)."""

        def on_event(_kind: str, obj: dict[str, Any]) -> None:
            for key in keys(obj):
                self.enqueue(name, key, after)

        return on_event

    # Running --------------------------------------------------------------------------------------

    def start(self) -> None:
        for name in self.reconcilers:
            for i in range(self.workers):
                thread = threading.Thread(target=self._work, args=(name,), name=f"{name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking keys and wait for the reconciles in progress."""
        for queue in self.queues.values():
            queue.shutdown()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, name: str) -> None:
        queue = self.queues[name]
        while True:
            key = queue.get()
            if key is None:
                return
            try:
                self.process(name, key)
            finally:
                queue.done(key)

    def process(self, name: str, key: str) -> str:
        """Reconcile `key` once and requeue it as its result asks; returns the result label
        (success, requeue, retry or error). The worker calls `done`; tests may call this directly."""
        reconciler = self.reconcilers[name]
        queue = self.queues[name]
        started = time.perf_counter()
        try:
            again = reconciler.reconcile(key)
        except KubeError as exc:
            if exc.temporary or isinstance(exc, Conflict):
                delay = queue.add_rate_limited(key)
                log.info(
                    "temporary API error; retrying",
                    extra={"kind": name, "key": key, "error": str(exc), "retry_seconds": delay},
                )
                result = "retry"
            else:
                delay = queue.add_rate_limited(key)
                self._log_permanent(name, key, exc, delay)
                result = "error"
        except Exception:
            delay = queue.add_rate_limited(key)
            log.exception(
                "reconcile failed (a bug); retrying", extra={"kind": name, "key": key, "retry_seconds": delay}
            )
            result = "error"
        else:
            queue.forget(key)
            with self._lock:
                self._logged.pop(f"{name}/{key}", None)
            if again is not None:
                queue.add_after(key, again)
                result = "requeue"
            else:
                result = "success"
        seconds, counts = self._metrics[name]
        seconds.observe(time.perf_counter() - started)
        counts[result].inc()
        return result

    def _log_permanent(self, name: str, key: str, exc: KubeError, delay: float) -> None:
        message = str(exc)
        with self._lock:
            if self._logged.get(f"{name}/{key}") == message:
                return
            self._logged[f"{name}/{key}"] = message
        log.warning(
            "API request refused; retrying with backoff",
            extra={"kind": name, "key": key, "error": message, "retry_seconds": delay},
        )
