"""When a CachedImage expires, and how often its status may be written. Pure logic.

The rules (and the kube-image-keeper bugs each one prevents):
- `status.lastSeenUsed` is the last time the controller saw a pod using the image: set when the
  last user goes (the status write that records `usedBy.count: 0`), refreshed while in use at most
  every `LAST_SEEN_REFRESH` (so a long-running pod does not mean a write per reconcile).
- An unused image gets `spec.expiresAt = lastSeenUsed + ttl` ONCE; it is never pushed forward
  while the image stays unused (kuik#396 pushed it every day, so nothing ever expired). It is
  computed from stored fields only, so a controller restart finds the same value (kuik#199).
- It is deleted when `expiresAt` has passed, never while a pod uses it (kuik#540, #567): the
  reconciler checks the Pod cache again at that moment and deletes with a resourceVersion
  precondition. A pod using it again clears `expiresAt`.
- `spec.retain: true` never expires (an `expiresAt` is cleared).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

LAST_SEEN_REFRESH = 3600.0
STATUS_WRITE_INTERVAL = 5.0


def format_time(moment: dt.datetime) -> str:
    """RFC 3339 in UTC with seconds, as the API server writes times: `2026-12-03T14:20:30Z`."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object) -> dt.datetime | None:
    """A stored RFC 3339 time, or None when absent or not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def last_seen_used(used: bool, stored_status: Mapping[str, Any], now: dt.datetime) -> str | None:
    """The `lastSeenUsed` to write now, or None to keep the stored one.

    In use: now, when the stored value is absent or older than LAST_SEEN_REFRESH. Not in use: now
    when the stored status still counts users (the moment the last one went), else the stored."""
    stored = parse_time(stored_status.get("lastSeenUsed"))
    if used:
        if stored is None or (now - stored).total_seconds() >= LAST_SEEN_REFRESH:
            return format_time(now)
        return None
    count = (stored_status.get("usedBy") or {}).get("count") or 0
    return format_time(now) if count or stored is None else None


@dataclass(frozen=True)
class ExpiryAction:
    """What to do about expiry: `set` writes `expires_at`, `clear` removes it, `delete` deletes the
    CachedImage, `wait` does nothing now; `recheck` is the seconds after which to look again."""

    action: Literal["set", "clear", "delete", "wait"]
    expires_at: str | None = None
    recheck: float | None = None


def expiry_action(
    spec: Mapping[str, Any],
    stored_status: Mapping[str, Any],
    used: bool,
    now: dt.datetime,
    ttl: float,
    created: str | None = None,
) -> ExpiryAction:
    """The expiry step for a CachedImage with `spec` and `stored_status` (as stored: expiry derives
    from stored fields only), `used` by a pod or not, unused images living `ttl` seconds.

    An unused image whose stored status still counts users waits: its status write records
    `lastSeenUsed` first, and expiry follows from that (the reconciler runs again after it)."""
    expires_at = parse_time(spec.get("expiresAt"))
    if used or spec.get("retain"):
        return ExpiryAction("clear") if spec.get("expiresAt") else ExpiryAction("wait")
    if (stored_status.get("usedBy") or {}).get("count"):
        return ExpiryAction("wait")
    if expires_at is None:
        since = parse_time(stored_status.get("lastSeenUsed")) or parse_time(created) or now
        expires = since + dt.timedelta(seconds=ttl)
        return ExpiryAction("set", format_time(expires), max(0.0, (expires - now).total_seconds()))
    remaining = (expires_at - now).total_seconds()
    if remaining <= 0:
        return ExpiryAction("delete")
    return ExpiryAction("wait", recheck=remaining)


class WriteSpacing:
    """At most one write per key every `interval` seconds (CachedImage status: a Deployment scaling
    to 1,000 pods is a few writes, not 1,000). Thread-safe; memory only, which is fine: after a
    restart the first write of each key is simply allowed."""

    def __init__(self, interval: float = STATUS_WRITE_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, key: str) -> float:
        """Seconds until `key` may be written again (0: now)."""
        with self._lock:
            last = self._last.get(key)
        return 0.0 if last is None else max(0.0, last + self.interval - self.clock())

    def wrote(self, key: str) -> None:
        with self._lock:
            self._last[key] = self.clock()

    def forget(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)
