"""The proxy's metrics (DESIGN.md: `imagewarm_proxy_*`, base units). Declared once, at import."""

from __future__ import annotations

from imagewarm.metrics import counter, gauge, histogram

REQUESTS = counter("proxy_requests_total", "Requests by route and HTTP status", ["route", "method", "status"])
HIT_BYTES = counter("proxy_cache_hit_bytes_total", "Bytes served from the cache", ["kind"])
MISS_BYTES = counter("proxy_cache_miss_bytes_total", "Bytes served while fetching (cache misses)", ["kind"])
UPSTREAM_BYTES = counter(
    "proxy_upstream_bytes_total", "Bytes received from upstream registries", ["registry"]
)
FETCH_SECONDS = histogram(
    "proxy_upstream_fetch_seconds",
    "Duration of upstream blob fetches",
    ["registry"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = gauge("proxy_inflight_fetches", "Upstream blob fetches in progress", unitless_ok=True)
# Set from the store's shared counter by whichever worker serves the scrape: the most recent value is
# the true one (max would keep a stale size from before an eviction).
CACHE_BYTES = gauge("proxy_cache_bytes", "Bytes held by the blob cache", multiprocess_mode="livemostrecent")
EVICTIONS = counter("proxy_evictions_total", "Blobs evicted to stay under --max-cache-bytes")
EVICTED_BYTES = counter("proxy_evicted_bytes_total", "Bytes evicted to stay under --max-cache-bytes")
AUTH_DECISIONS = counter(
    "proxy_auth_decisions_total",
    "Private-image access decisions by source and outcome",
    ["source", "decision"],
)
STALE_SERVES = counter(
    "proxy_stale_tag_serves_total", "Tags served from their last known digest because the upstream failed"
)
UNCACHED_STREAMS = counter(
    "proxy_uncached_streams_total",
    "Blob misses streamed without caching, by reason (e.g. disk_full)",
    ["reason"],
)
DISK_FULL_SKIPPED_WRITES = counter(
    "proxy_disk_full_skipped_writes_total",
    "Manifests and tag entries served but not cached because the cache disk was full, by kind",
    ["kind"],
)
DIGEST_MISMATCHES = counter(
    "proxy_digest_mismatches_total", "Upstream transfers dropped because their digest did not verify"
)
RESUMED_FILLS = counter(
    "proxy_resumed_fills_total",
    "Blob fills that adopted the partial file a killed proxy or a broken-off transfer left and asked "
    "the source for the rest only",
)
RESUMED_BYTES = counter(
    "proxy_resumed_bytes_total", "Bytes of adopted partial files that resumed fills did not fetch again"
)
RESUME_FALLBACKS = counter(
    "proxy_resume_fallbacks_total",
    "Adopted partial files dropped, by reason (range_ignored: the source answered 200 to the range; "
    "inconsistent: its 206 was not the rest of the blob; unsatisfiable: it answered 416; the fill then "
    "started from byte 0) and resumed fills discarded (mismatch: the completed blob did not verify; "
    "the next fill starts from byte 0)",
    ["reason"],
)
INTERRUPTED_FILLS = counter(
    "proxy_interrupted_fills_total",
    "Blob fills whose transfer broke off (the source reset, stalled or closed early), by what became of "
    "their partial file (kept: for the next fill to resume; too_small: under the resume minimum, "
    "removed; no_progress: a resumed fill that added nothing, removed so the next starts from byte 0)",
    ["partial"],
)
# Set by the master's upkeep (every --eviction-interval), which lists the partial files anyway.
RESUMABLE_PARTIAL_BYTES = gauge(
    "proxy_resumable_partial_bytes",
    "Disk held by partial files of killed or broken-off fills, kept for their next fill to resume "
    "(not counted in --max-cache-bytes; removed once too old to resume)",
    multiprocess_mode="livemostrecent",
)
PEER_FETCHES = counter(
    "proxy_peer_fetches_total",
    "Blob misses asked of peer proxies, by result (hit: a peer sent it; miss: no peer had it; "
    "unreachable: a peer did not answer; failed: a peer's transfer broke off or did not verify)",
    ["result"],
)
# Every worker keeps its own view of the discovered peers; the largest is the most complete.
PEERS = gauge(
    "proxy_peers",
    "Peer proxies known (--peer and discovered with --peers-from)",
    unitless_ok=True,
    multiprocess_mode="livemax",
)
RUNTIME_FALLBACK_PEERS = gauge(
    "proxy_runtime_fallback_peers",
    "Peer proxies the runtime's hosts.toml lists after this proxy (--containerd-hosts-dir)",
    unitless_ok=True,
    multiprocess_mode="livemostrecent",
)
RUNTIME_HOSTS_WRITE_FAILURES = counter(
    "proxy_runtime_hosts_write_failures_total",
    "Failed writes of the runtime's hosts.toml: pulls cannot fall back to peers (see the log)",
)
# The node agent (gunicorn master, `--node-name`): its NodeImage's pull tasks.
AGENT_TASKS = gauge(
    "agent_tasks",
    "This node's NodeImage pull tasks by phase (Waiting, Pulling, Succeeded, Failed)",
    ["phase"],
    unitless_ok=True,
    multiprocess_mode="livemostrecent",
)
AGENT_PULLS = counter(
    "agent_pulls_total",
    "Pull tasks finished by result (succeeded, failed), and attempts retried (retried)",
    ["result"],
)
AGENT_WARMED_BYTES = counter("agent_warmed_bytes_total", "Bytes of images pulled by the agent's tasks")
AGENT_STATUS_WRITES = counter("agent_status_writes_total", "NodeImage status writes")
AGENT_STATUS_WRITE_ERRORS = counter(
    "agent_status_write_errors_total",
    "Failed NodeImage status writes by reason (throttled: 429; unavailable; rejected; local)",
    ["reason"],
)
TAINT_REMOVAL_FAILURES = counter(
    "proxy_taint_removal_failures_total",
    "Failed attempts to remove the node's startup taint (reason: forbidden = RBAC missing, error)",
    ["reason"],
)
