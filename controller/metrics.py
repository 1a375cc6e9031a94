"""The controller's Prometheus metrics (`imagewarm_controller_*`), declared once."""

from __future__ import annotations

from typing import Any

from imagewarm.metrics import counter, gauge, histogram

RECONCILES = counter(
    "controller_reconciles_total",
    "Reconciles by kind and result (success, requeue, retry: temporary error, error: permanent or bug)",
    ["kind", "result"],
)
QUEUE_DEPTH = gauge(
    "controller_queue_depth", "Keys ready to be reconciled, by kind", ["kind"], unitless_ok=True
)
RECONCILE_SECONDS = histogram(
    "controller_reconcile_seconds",
    "Time one reconcile took, by kind",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_LATENCY = histogram(
    "controller_queue_latency_seconds",
    "Time a key waited in the queue before a worker took it, by kind",
    ["kind"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
)
LEADER = gauge("controller_leader", "1 while this replica holds the leader Lease", unitless_ok=True)
API_REQUESTS = counter(
    "controller_api_requests_total",
    "Requests to the API server by verb and HTTP status (0: no answer; 429: throttled)",
    ["verb", "code"],
)
TASKS = gauge(
    "controller_tasks",
    "NodeImage pull tasks by phase (Pending: no status for the current version yet)",
    ["phase"],
    unitless_ok=True,
)
EVENTS = counter("controller_events_total", "Events recorded (created or counted again)", ["type", "reason"])


_REQUEST_COUNTERS: dict[tuple[str, int], Any] = {}


def observe_request(verb: str, status: int) -> None:
    """The `imagewarm.kube.Kube.observer` of the controller's connection."""
    counter = _REQUEST_COUNTERS.get((verb, status))
    if counter is None:  # a label lookup per request costs more than the count
        counter = _REQUEST_COUNTERS.setdefault((verb, status), API_REQUESTS.labels(verb, str(status)))
    counter.inc()


CACHED_IMAGE_WRITES = counter(
    "controller_cachedimage_writes_total",
    "CachedImage writes by what they did (create, status, expiry, delete, pin, unpin)",
    ["what"],
)
