"""The webhook's Prometheus metrics (declared once, at import)."""

import functools

from prometheus_client import Counter

from imagewarm.metrics import counter, histogram

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
