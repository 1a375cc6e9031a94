"""Whether the cache disk has room for the small writes of manifests and tag entries, as this process
last saw it. A write the disk refuses is counted every time, but logged only when the state changes
(full, then space again), so a full disk under load does not flood the log."""

from __future__ import annotations

import logging
import threading

from proxy import metrics
from proxy.cache.errors import DiskFull

log = logging.getLogger("imagewarm.proxy.disk")


class CacheDiskState:
    """Per process (each gunicorn worker logs its own state changes); safe across threads."""

    def __init__(self) -> None:
        self._full = False
        self._lock = threading.Lock()

    def note_full(self, kind: str, error: DiskFull) -> None:
        """A `kind` ("manifest", "tag") write failed for lack of space; the request is answered anyway."""
        metrics.DISK_FULL_SKIPPED_WRITES.labels(kind=kind).inc()
        with self._lock:
            changed, self._full = not self._full, True
        if changed:
            log.warning(
                "cache disk full: manifests and tags are served without being cached until space returns "
                "(free space on the cache volume, or lower --max-cache-bytes)",
                extra={"kind": kind, "error": str(error)},
            )

    def note_written(self) -> None:
        """A write succeeded: if the disk was full, caching has resumed."""
        if not self._full:  # the common case, without the lock
            return
        with self._lock:
            changed, self._full = self._full, False
        if changed:
            log.info("cache disk has space again: manifests and tags are cached again")
