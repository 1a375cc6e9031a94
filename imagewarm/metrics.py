"""Prometheus metrics with the `imagewarm_` prefix, correct under gunicorn's worker processes.

Programs declare their metrics once at import (`counter("proxy_requests_total", ...)`); names are
prefixed here and must end in a base unit or `_total`. When `PROMETHEUS_MULTIPROC_DIR` is set
(gunicorn with several workers), `exposition()` aggregates every worker's values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX = "imagewarm_"
_UNITS = ("_total", "_bytes", "_seconds", "_info", "_ratio", "_count", "_timestamp_seconds")


def _name(name: str, *, unitless_ok: bool = False) -> str:
    if name.startswith(PREFIX):
        raise ValueError(f"metric {name!r}: pass the name without the {PREFIX!r} prefix")
    if not unitless_ok and not name.endswith(_UNITS):
        raise ValueError(f"metric {name!r} must end in a base unit or _total ({', '.join(_UNITS)})")
    return PREFIX + name


def counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    # prometheus_client appends _total itself; give it the stem.
    return Counter(_name(name).removesuffix("_total"), documentation, list(labels))


def gauge(
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    *,
    unitless_ok: bool = False,
    multiprocess_mode: Any = "livesum",
) -> Gauge:
    """A gauge; under gunicorn `multiprocess_mode` says how workers' values combine (default: summed
    over live workers)."""
    name = _name(name, unitless_ok=unitless_ok)
    return Gauge(name, documentation, list(labels), multiprocess_mode=multiprocess_mode)


def histogram(
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
) -> Histogram:
    return Histogram(_name(name), documentation, list(labels), buckets=list(buckets))


def exposition() -> tuple[bytes, str]:
    """The text of all metrics (aggregated across gunicorn workers when multiprocess) and its type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
