"""The webhook's Prometheus metrics (declared once, at import)."""

import functools
from typing import Any

from prometheus_client import Counter

from imagewarm.metrics import counter, gauge, histogram

REQUESTS = counter(
    "webhook_requests_total",
    "AdmissionReview requests answered, by operation and HTTP status",
    ["operation", "code"],
)
DECISIONS = counter(
    "webhook_decisions_total",
    "Decisions: patched, unchanged, skipped, warned, ignored (not a pod/operation), invalid, error",
    ["decision"],
)
REWRITES = counter("webhook_rewrites_total", "Container images rewritten to the node proxy")
INJECTIONS = counter("webhook_sidecarset_injections_total", "SidecarSets injected into pods", ["sidecarset"])
DURATION = histogram(
    "webhook_request_duration_seconds",
    "Time to answer one /mutate request",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


# A labelled child looked up once: `labels()` costs as much as the increment itself, on every request.
# Both label sets are small and fixed (operations, codes, decision reasons).
@functools.cache
def requests(operation: str, code: str) -> Counter:
    return REQUESTS.labels(operation, code)


@functools.cache
def decisions(reason: str) -> Counter:
    return DECISIONS.labels(reason)


# Per worker (a `pid` label, live workers only) and cache ("sidecarsets", "namespaces"): each gunicorn
# worker keeps its own caches, and a worker whose SidecarSet cache fell behind admits pods without the
# SidecarSets it has not seen. Labelled so that only workers, never the master (which imports this
# module too), have values.
CACHE_LISTS = gauge(
    "webhook_cache_lists",
    "Complete lists by this worker's cache: 1, plus one per 410 Gone (expired watch)",
    ["cache"],
    unitless_ok=True,
    multiprocess_mode="liveall",
)
CACHE_OBJECTS = gauge(
    "webhook_cache_objects",
    "Objects in this worker's cache",
    ["cache"],
    unitless_ok=True,
    multiprocess_mode="liveall",
)
CACHE_RESOURCE_VERSION = gauge(
    "webhook_cache_resource_version",
    "The resourceVersion this worker's cache is at (workers should agree within seconds)",
    ["cache"],
    unitless_ok=True,
    multiprocess_mode="liveall",
)
CACHE_PROGRESS = gauge(
    "webhook_cache_progress_timestamp_seconds",
    "When this worker's cache last heard from the API server (a list, an event or a bookmark; "
    "bookmarks come about every minute, so an older one means a stuck watch)",
    ["cache"],
    multiprocess_mode="liveall",
)


def cache_progressed(cache: str, state: dict[str, Any], now: float) -> None:
    """Export one worker's `cache` state (`Informer.state()`), heard from at `now`."""
    CACHE_LISTS.labels(cache).set(state["lists"])
    CACHE_OBJECTS.labels(cache).set(state["objects"])
    version = str(state["resourceVersion"])
    if version.isdigit():  # opaque to clients, but an etcd revision in every API server we know
        CACHE_RESOURCE_VERSION.labels(cache).set(int(version))
    CACHE_PROGRESS.labels(cache).set(now)
