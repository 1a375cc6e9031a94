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


# Per worker (a `pid` label, live workers only): each gunicorn worker keeps its own SidecarSet cache,
# and a worker whose cache fell behind admits pods without the SidecarSets it has not seen.
SIDECARSET_CACHE_LISTS = gauge(
    "webhook_sidecarset_cache_lists",
    "Complete lists of SidecarSets by this worker's cache: 1, plus one per 410 Gone (expired watch)",
    unitless_ok=True,
    multiprocess_mode="liveall",
)
SIDECARSET_CACHE_OBJECTS = gauge(
    "webhook_sidecarset_cache_objects",
    "SidecarSets in this worker's cache",
    unitless_ok=True,
    multiprocess_mode="liveall",
)
SIDECARSET_CACHE_RESOURCE_VERSION = gauge(
    "webhook_sidecarset_cache_resource_version",
    "The resourceVersion this worker's SidecarSet cache is at (workers should agree within seconds)",
    unitless_ok=True,
    multiprocess_mode="liveall",
)
SIDECARSET_CACHE_PROGRESS = gauge(
    "webhook_sidecarset_cache_progress_timestamp_seconds",
    "When this worker's SidecarSet cache last heard from the API server (a list, an event or a "
    "bookmark; bookmarks come about every minute, so an older one means a stuck watch)",
    multiprocess_mode="liveall",
)


def sidecarset_cache_progressed(state: dict[str, Any], now: float) -> None:
    """Export one worker's SidecarSet cache `state` (`Informer.state()`), heard from at `now`."""
    SIDECARSET_CACHE_LISTS.set(state["lists"])
    SIDECARSET_CACHE_OBJECTS.set(state["objects"])
    version = str(state["resourceVersion"])
    if version.isdigit():  # opaque to clients, but an etcd revision in every API server we know
        SIDECARSET_CACHE_RESOURCE_VERSION.set(int(version))
    SIDECARSET_CACHE_PROGRESS.set(now)
