"""Size-limited cache: least recently used blobs are removed between two watermarks.

When committed bytes exceed `high * max_bytes`, blobs are removed oldest use first until they are at
or under `low * max_bytes`. Never removed: a blob being served (its readers hold a shared flock), a
blob being written (not committed yet, so not a candidate), a pinned blob. Any process may run it;
two evictors at once only race to remove the same files, which is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.cache.store import BlobStore


@dataclass(frozen=True)
class EvictionReport:
    """What one pass did (the HTTP side turns this into metrics)."""

    bytes_before: int
    bytes_after: int
    evicted_count: int = 0
    evicted_bytes: int = 0
    skipped_in_use: int = 0
    skipped_pinned: int = 0


class Evictor:
    def __init__(self, store: BlobStore, max_bytes: int, high: float = 0.9, low: float = 0.8) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not 0 < low <= high <= 1:
            raise ValueError(f"watermarks need 0 < low <= high <= 1, got low={low} high={high}")
        self.store = store
        self.max_bytes = max_bytes
        self.high = high
        self.low = low

    def run_once(self) -> EvictionReport:
        """One pass: scan (one stat per blob), and if over the high watermark evict LRU down to low."""
        blobs = self.store.blobs()
        total = sum(info.size for info in blobs)
        if total <= self.high * self.max_bytes:
            return EvictionReport(bytes_before=total, bytes_after=total)
        target = self.low * self.max_bytes
        remaining = total
        evicted_count = evicted_bytes = in_use = pinned = 0
        for info in sorted(blobs, key=lambda info: info.last_used):
            if remaining <= target:
                break
            if self.store.is_pinned(info.digest):
                pinned += 1
                continue
            freed = self.store.remove(info.digest)
            if freed is None:
                # Kept: a reader or writer holds it, it was pinned meanwhile, or another evictor took it.
                if self.store.is_pinned(info.digest):
                    pinned += 1
                elif self.store.has(info.digest):
                    in_use += 1
                continue
            evicted_count += 1
            evicted_bytes += freed
            remaining -= freed
        return EvictionReport(
            bytes_before=total,
            bytes_after=remaining,
            evicted_count=evicted_count,
            evicted_bytes=evicted_bytes,
            skipped_in_use=in_use,
            skipped_pinned=pinned,
        )
