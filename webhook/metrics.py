"""The webhook's Prometheus metrics (declared once, at import)."""

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
