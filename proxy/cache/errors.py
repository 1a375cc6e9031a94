"""Errors of the proxy's cache. They mix in builtins so callers can catch what they already know
(`KeyError` for a miss, `ValueError` for bad bytes, `OSError` for a full disk)."""

from __future__ import annotations

from imagewarm.errors import ImagewarmError


class StoreError(ImagewarmError):
    """Anything the cache refuses or cannot do."""


class NotCached(StoreError, KeyError):
    """The digest is not in the cache (never was, or was evicted): fetch it upstream."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not cached"


class DigestMismatch(StoreError, ValueError):
    """The bytes do not have the digest they were stored under; nothing was kept."""


class SizeMismatch(DigestMismatch):
    """The bytes are not the size the caller announced (a truncated or oversize body); nothing was kept."""


class DiskFull(StoreError, OSError):
    """The cache filesystem is full; the partial file was removed. Keep streaming without caching and
    free space (lower --max-cache-bytes or grow the volume)."""


class FetchAborted(StoreError):
    """The writer this follower was streaming from aborted, died or stalled: fail the response and retry."""
