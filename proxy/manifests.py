"""Manifests: by digest from the cache (never needing the upstream), by tag re-checked at most every
tag TTL, the last known digest served when the upstream is down. Stored and served byte for byte."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flask import Response

from imagewarm import protocol
from proxy import metrics
from proxy.access import AccessControl
from proxy.auth import Credentials
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.manifest_store import ManifestStore
from proxy.routes import Target
from proxy.tags import TagIndex
from proxy.upstream import Manifest, Upstream

log = logging.getLogger("imagewarm.proxy.manifests")


@dataclass(frozen=True)
class Found:
    manifest: Manifest
    source: str  # "cache", "upstream" or "stale"


def accepts(accept_headers: list[str], media_type: str) -> bool:
    """Whether a client's Accept values admit `media_type` (no Accept at all admits anything)."""
    types = {part.split(";")[0].strip() for header in accept_headers for part in header.split(",")}
    types.discard("")
    return not types or media_type in types or "*/*" in types or "application/*" in types


_CACHE_STATUS = {"cache": protocol.HIT, "upstream": protocol.MISS, "stale": protocol.STALE}


class Manifests:
    def __init__(
        self, upstream: Upstream, store: ManifestStore, tags: TagIndex, access: AccessControl, tag_ttl: float
    ) -> None:
        self.upstream = upstream
        self.store = store
        self.tags = tags
        self.access = access
        self.tag_ttl = tag_ttl

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
        counter = metrics.MISS_BYTES if found.source == "upstream" else metrics.HIT_BYTES
        counter.labels(kind="manifest").inc(len(manifest.data))
        return Response(
            manifest.data,
            status=200,
            headers={
                "Content-Type": manifest.media_type,
                "Docker-Content-Digest": manifest.digest,
                "ETag": f'"{manifest.digest}"',
                protocol.CACHE_HEADER: _CACHE_STATUS[found.source],
            },
        )

    def _cached(self, digest: str) -> Manifest | None:
        got = self.store.get(digest)
        return Manifest(got[0], got[1], digest) if got else None

    def _fetch(self, target: Target, credentials: Credentials | None) -> Manifest:
        manifest = self.upstream.manifest(target.registry, target.repository, target.reference, credentials)
        self.store.put(manifest.digest, manifest.data, manifest.media_type)
        self.access.granted(target.registry, target.repository, credentials)
        if not target.by_digest:
            self.tags.set(
                target.registry, target.repository, target.reference, manifest.digest, manifest.media_type
            )
        return manifest

    def _check_access(self, target: Target, credentials: Credentials | None) -> None:
        def probe(creds: Credentials | None) -> None:
            self.upstream.head_manifest(target.registry, target.repository, target.reference, creds)

        self.access.check(target.registry, target.repository, credentials, probe)

    def find(self, target: Target, credentials: Credentials | None) -> Found:
        """The manifest for a tag or digest. Raises RegistryError as the upstream answered, or
        UpstreamUnavailable when it is down and nothing is cached."""
        if target.by_digest:
            cached = self._cached(target.reference)
            if cached is not None:
                self._check_access(target, credentials)
                return Found(cached, "cache")
            return Found(self._fetch(target, credentials), "upstream")
        entry = self.tags.get(target.registry, target.repository, target.reference)
        cached = self._cached(entry.digest) if entry else None
        if entry and cached and entry.age() < self.tag_ttl:
            self._check_access(target, credentials)
            return Found(cached, "cache")
        try:
            if entry and cached:
                current = self.upstream.head_manifest(
                    target.registry, target.repository, target.reference, credentials
                )
                self.access.granted(target.registry, target.repository, credentials)
                if current == entry.digest:
                    self.tags.set(
                        target.registry, target.repository, target.reference, entry.digest, entry.media_type
                    )
                    return Found(cached, "cache")
                log.info(
                    "tag moved",
                    extra={"image": f"{target.name}:{target.reference}", "old": entry.digest, "new": current},
                )
            return Found(self._fetch(target, credentials), "upstream")
        except RegistryError as exc:
            stale = isinstance(exc, UpstreamUnavailable) or exc.code == "TOOMANYREQUESTS"
            if not (stale and entry and cached):
                raise
            self._check_access(target, credentials)
            metrics.STALE_SERVES.inc()
            log.warning(
                "upstream unavailable: serving the tag's last known digest",
                extra={
                    "image": f"{target.name}:{target.reference}",
                    "digest": entry.digest,
                    "checked_seconds_ago": round(time.time() - entry.checked_at),
                    "error": str(exc),
                },
            )
            return Found(cached, "stale")
