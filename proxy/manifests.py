"""Manifests: by digest from the cache (never needing the upstream), by tag re-checked at most every
tag TTL, the last known digest served when the upstream is down. Stored and served byte for byte.
After a re-check fails, the registry's cached tags are served as they are for a short while without
asking again, so an outage costs each worker one slow re-check (with its retries) per while, not one
per pull.
With the cache disk full, a fetched manifest is served (verified) without being stored, and a tag
whose re-check cannot be recorded still answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Response

from imagewarm import protocol
from imagewarm.digest import Digest
from proxy import metrics
from proxy.cache.errors import DiskFull
from proxy.cache.manifest_store import ManifestStore
from proxy.cache.tags import TagIndex
from proxy.disk_state import CacheDiskState
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.routes import Target
from proxy.upstream.access import AccessControl
from proxy.upstream.auth import Credentials
from proxy.upstream.registry import Manifest, Upstream

log = logging.getLogger("imagewarm.proxy.manifests")

# After a failed tag re-check, how long (at most; never beyond the tag TTL) cached tags of that
# registry are served without asking it again.
OUTAGE_BACKOFF = 10.0


@dataclass(frozen=True)
class Found:
    manifest: Manifest
    source: str  # "cache", "upstream", "uncached" (fetched, the disk full) or "stale"


def accepts(accept_headers: list[str], media_type: str) -> bool:
    """Whether a client's Accept values admit `media_type` (no Accept at all admits anything)."""
    types = {part.split(";")[0].strip() for header in accept_headers for part in header.split(",")}
    types.discard("")
    return not types or media_type in types or "*/*" in types or "application/*" in types


_CACHE_STATUS = {
    "cache": protocol.HIT,
    "upstream": protocol.MISS,
    "uncached": protocol.UNCACHED,
    "stale": protocol.STALE,
}


class Manifests:
    def __init__(
        self, upstream: Upstream, store: ManifestStore, tags: TagIndex, access: AccessControl, tag_ttl: float
    ) -> None:
        self.upstream = upstream
        self.store = store
        self.tags = tags
        self.access = access
        self.tag_ttl = tag_ttl
        self.disk = CacheDiskState()
        self._outage_until: dict[str, float] = {}  # registry -> monotonic time to ask it again

    def serve(self, target: Target, credentials: Credentials | None, accept: list[str]) -> Response:
        found = self.find(target, credentials)
        manifest = found.manifest
        if not accepts(accept, manifest.media_type):
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"{target.name}:{target.reference} is a {manifest.media_type}"
                f", which this client does not accept ({', '.join(accept)})",
                status=404,
            )
        fetched = found.source in ("upstream", "uncached")
        counter = metrics.MISS_BYTES if fetched else metrics.HIT_BYTES
        counter.labels(kind="manifest").inc(len(manifest.data))
        return Response(
            manifest.data,
            status=200,
            headers={
                "Content-Type": manifest.media_type,
                "Docker-Content-Digest": str(manifest.digest),
                "ETag": f'"{manifest.digest}"',
                protocol.CACHE_HEADER: _CACHE_STATUS[found.source],
            },
        )

    def _cached(self, digest: Digest) -> Manifest | None:
        got = self.store.get(digest)
        return Manifest(got[0], got[1], digest) if got else None

    def _cache_write(self, kind: str, write: Callable[[], object]) -> bool:
        """Run a cache write; False (reported, not raised) when the disk has no room for it."""
        try:
            write()
        except DiskFull as exc:
            self.disk.note_full(kind, exc)
            return False
        self.disk.note_written()
        return True

    def _fetch(self, target: Target, credentials: Credentials | None) -> Found:
        """From the upstream (verified there), cached unless the disk is full."""
        manifest = self.upstream.manifest(target.registry, target.repository, target.reference, credentials)
        stored = self._cache_write(
            "manifest", lambda: self.store.put(manifest.digest, manifest.data, manifest.media_type)
        )
        self.access.granted(target.registry, target.repository, credentials)
        if stored and not target.by_digest:  # a tag entry for a manifest not stored would only miss
            self._record_tag(target, manifest.digest, manifest.media_type)
        return Found(manifest, "upstream" if stored else "uncached")

    def _record_tag(self, target: Target, digest: Digest, media_type: str) -> None:
        """Note that the tag points at `digest` now; on a full disk the old entry stays, so the tag
        is re-checked on its next pull instead of after the TTL."""
        self._cache_write(
            "tag",
            lambda: self.tags.set(target.registry, target.repository, target.reference, digest, media_type),
        )

    def _check_access(self, target: Target, credentials: Credentials | None) -> None:
        def probe(creds: Credentials | None) -> None:
            self.upstream.head_manifest(target.registry, target.repository, target.reference, creds)

        self.access.check(target.registry, target.repository, credentials, probe)

    def find(self, target: Target, credentials: Credentials | None) -> Found:
        """The manifest for a tag or digest. Raises RegistryError as the upstream answered, or
        UpstreamUnavailable when it is down and nothing is cached."""
        if target.by_digest:
            cached = self._cached(target.named_digest)
            if cached is not None:
                self._check_access(target, credentials)
                return Found(cached, "cache")
            return self._fetch(target, credentials)
        entry = self.tags.get(target.registry, target.repository, target.reference)
        cached = self._cached(entry.digest) if entry else None
        if entry and cached and entry.age() < self.tag_ttl:
            self._check_access(target, credentials)
            return Found(cached, "cache")
        if entry and cached and time.monotonic() < self._outage_until.get(target.registry, 0.0):
            self._check_access(target, credentials)
            metrics.STALE_SERVES.inc()
            return Found(cached, "stale")
        try:
            if entry and cached:
                current = self.upstream.head_manifest(
                    target.registry, target.repository, target.reference, credentials
                )
                self.access.granted(target.registry, target.repository, credentials)
                if current == entry.digest:
                    self._record_tag(target, entry.digest, entry.media_type)
                    return Found(cached, "cache")
                log.info(
                    "tag moved",
                    extra={"image": f"{target.name}:{target.reference}", "old": entry.digest, "new": current},
                )
            return self._fetch(target, credentials)
        except RegistryError as exc:
            stale = isinstance(exc, UpstreamUnavailable) or exc.code == "TOOMANYREQUESTS"
            if not (stale and entry and cached):
                raise
            backoff = min(OUTAGE_BACKOFF, self.tag_ttl)
            self._outage_until[target.registry] = time.monotonic() + backoff
            self._check_access(target, credentials)
            metrics.STALE_SERVES.inc()
            log.warning(
                "upstream unavailable: serving cached tags' last known digests",
                extra={
                    "image": f"{target.name}:{target.reference}",
                    "digest": entry.digest,
                    "checked_seconds_ago": round(time.time() - entry.checked_at),
                    "next_check_seconds": backoff,
                    "error": str(exc),
                },
            )
            return Found(cached, "stale")
