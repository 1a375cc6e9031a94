"""Blob misses: the client gets bytes while the cache fills (tee, see `proxy.upstream.fetch`), and
concurrent misses in any worker follow the one fetch instead of starting their own.

Whatever streams, the end is held back until the blob's digest is verified: on a mismatch (or a
truncated, stalled or aborted fetch) the body raises before it, so gunicorn drops the connection and
the client sees a failed transfer, never a clean success with wrong bytes.

A claim that adopted the partial file of a killed writer, or of one whose transfer broke off (a
reset, a stall past the read timeout, a peer gone: see `proxy.upstream.fetch`), asks its source for
the rest only (`Writer.adopted`; `Range: bytes=N-`, the same source order: a peer, else the
upstream) and resumes on a 206 that is exactly the rest of the blob; on a 200 (the source ignores
ranges) or anything else it starts over from byte 0. The client still gets the whole blob, the
adopted bytes read back from the file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import requests
from flask import Response

from imagewarm import protocol
from proxy import metrics
from proxy.cache.store import CachedBlob, DiskFull, FetchAborted, Follower, Writer
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.peers.lookup import Peers
from proxy.ranges import parse_length, resumed_size
from proxy.routes import Target
from proxy.upstream.access import AccessControl, Unverifiable
from proxy.upstream.auth import Credentials
from proxy.upstream.fetch import Fetch, TransferFailed
from proxy.upstream.registry import Upstream

log = logging.getLogger("imagewarm.proxy.tee")

CHUNK = 1 << 20
# How many times a follower whose fill was aborted before it sent a byte claims the blob again.
TAKEOVERS = 2


def held_back(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield every chunk but the last one as it arrives; the last only once `chunks` ends cleanly."""
    pending: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        if pending is not None:
            yield pending
        pending = chunk
    if pending is not None:
        yield pending


def _headers(digest: str, size: int | None, cache: str) -> dict[str, str]:
    headers = {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        protocol.CACHE_HEADER: cache,
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _content_length(response: requests.Response) -> int | None:
    return parse_length(response.headers.get("Content-Length"))


@dataclass(frozen=True)
class _Source:
    """Where a fill reads from: the open response, its metrics label, what to call if its bytes fail,
    and the whole blob's size (the client's Content-Length; None if not stated)."""

    response: requests.Response
    label: str
    on_failure: Callable[[], None] | None
    size: int | None


class Tee:
    def __init__(self, upstream: Upstream, access: AccessControl, peers: Peers | None = None) -> None:
        self.upstream = upstream
        self.access = access
        self.peers = peers

    def check_access(self, target: Target, credentials: Credentials | None) -> None:
        """Raise RegistryError unless the client may read this blob (see `proxy.upstream.access`);
        the probe is a HEAD upstream with its credentials."""

        def probe(creds: Credentials | None) -> None:
            self.upstream.head_blob(target.registry, target.repository, target.reference, creds)

        self.access.check(target.registry, target.repository, credentials, probe)

    def _open(
        self, target: Target, credentials: Credentials | None, start: int = 0
    ) -> tuple[requests.Response, str, Callable[[], None] | None]:
        """Where to read a missing blob from: a peer that has it cached (the client's access proven
        first, as for cached content; by the peer when the upstream is down), else the upstream. With
        the response: its metrics label, and what to call if its bytes fail (a peer is set aside).
        With `start`, asks for the bytes from there on (the answer may be a 206 or a 200)."""
        if self.peers is not None and self.peers.urls():  # none known yet: no access probe for nothing
            # If the upstream cannot vouch for the client now and this node has no decision to fall back
            # on, the peer that has the blob checks the forwarded credentials by its own rule.
            with contextlib.suppress(Unverifiable):
                self.check_access(target, credentials)
            found = self.peers.blob(target, credentials, start)
            if found is not None:
                url, response = found
                return response, "peers", functools.partial(self.peers.failed, url)
        response = self.upstream.blob(
            target.registry,
            target.repository,
            target.reference,
            credentials,
            byte_range=f"bytes={start}-" if start else None,
        )
        self.access.granted(target.registry, target.repository, credentials)
        return response, target.registry, None

    def _open_fill(self, target: Target, credentials: Credentials | None, writer: Writer) -> _Source:
        """The source of `writer`'s bytes, with `writer` resumed or started over accordingly and its
        expected size set. Raises as `_open` does (the caller aborts the writer)."""
        if writer.adopted:
            source = self._resumed(target, credentials, writer)
            if source is not None:
                return source
        response, label, on_failure = self._open(target, credentials)
        try:
            writer.start_over()  # the fill starts from byte 0 (a no-op unless it adopted a file)
        except BaseException:
            response.close()
            raise
        size = _content_length(response)
        writer.expected_size = size
        return _Source(response, label, on_failure, size)

    def _resumed(self, target: Target, credentials: Credentials | None, writer: Writer) -> _Source | None:
        """Ask for the rest of an adopted partial file. The source for the fill if the answer is a 206 of
        the rest (resumed) or a 200 (started over); None when the blob must be asked for again whole."""
        start = writer.adopted
        try:
            response, label, on_failure = self._open(target, credentials, start)
        except RegistryError as exc:
            if exc.code != "RANGE_INVALID":
                raise
            self._fall_back(target, writer, "unsatisfiable", exc.status)
            return None
        content_range = response.headers.get("Content-Range")
        size = resumed_size(
            response.status_code, content_range, response.headers.get("Content-Length"), start
        )
        if response.status_code != 200 and size is None:
            response.close()
            self._fall_back(target, writer, "inconsistent", response.status_code, content_range)
            return None
        try:
            if size is None:  # a 200: the whole blob, usable as it is
                self._fall_back(target, writer, "range_ignored", 200)
                size = _content_length(response)
                writer.expected_size = size
                return _Source(response, label, on_failure, size)
            writer.resume(size)
        except BaseException:
            response.close()
            raise
        metrics.RESUMED_FILLS.inc()
        metrics.RESUMED_BYTES.inc(start)
        log.info(
            "resuming the fill",
            extra={"digest": target.reference, "at_byte": start, "blob_bytes": size, "source": label},
        )
        return _Source(response, label, on_failure, size)

    @staticmethod
    def _fall_back(
        target: Target, writer: Writer, reason: str, status: int, content_range: str | None = None
    ) -> None:
        metrics.RESUME_FALLBACKS.labels(reason=reason).inc()
        log.info(
            "cannot resume the fill: the source did not send the rest of the blob; fetching it from byte 0",
            extra={
                "digest": target.reference,
                "adopted_bytes": writer.adopted,
                "reason": reason,
                "status": status,
                **({"content_range": content_range[:100]} if content_range is not None else {}),
            },
        )
        writer.start_over()

    def head(self, target: Target, credentials: Credentials | None) -> Response:
        size = self.upstream.head_blob(target.registry, target.repository, target.reference, credentials)
        self.access.granted(target.registry, target.repository, credentials)
        return Response(iter(()), status=200, headers=_headers(target.reference, size, protocol.MISS))

    def passthrough(self, target: Target, credentials: Credentials | None, byte_range: str) -> Response:
        """A range of a blob not cached: relayed from the upstream, not cached (the full pull caches)."""
        upstream = self.upstream.blob(
            target.registry, target.repository, target.reference, credentials, byte_range=byte_range
        )
        self.access.granted(target.registry, target.repository, credentials)
        headers = _headers(target.reference, _content_length(upstream), protocol.UNCACHED)
        if "Content-Range" in upstream.headers:
            headers["Content-Range"] = upstream.headers["Content-Range"]

        def body() -> Iterator[bytes]:
            with upstream:
                yield from upstream.iter_content(CHUNK)

        return Response(body(), status=upstream.status_code, headers=headers, direct_passthrough=True)

    def uncached(self, target: Target, credentials: Credentials | None, reason: str) -> Response:
        """The whole blob relayed without caching (the cache disk is full), still verified: the last
        chunk goes out only if the digest matches."""
        upstream = self.upstream.blob(target.registry, target.repository, target.reference, credentials)
        self.access.granted(target.registry, target.repository, credentials)
        metrics.UNCACHED_STREAMS.labels(reason="disk_full").inc()
        log.warning(
            "cache disk full before the fetch began: streaming without caching",
            extra={"digest": target.reference, "error": reason},
        )

        def body() -> Iterator[bytes]:
            digest = target.named_digest
            check = digest.hasher()
            with upstream:
                try:
                    for chunk in upstream.iter_content(CHUNK):
                        check.update(chunk)
                        metrics.UPSTREAM_BYTES.labels(registry=target.registry).inc(len(chunk))
                        yield chunk
                except requests.RequestException as exc:
                    raise TransferFailed(f"upstream transfer of {target.reference} failed: {exc}") from None
            if not digest.matches(check):
                metrics.DIGEST_MISMATCHES.inc()
                raise TransferFailed(f"upstream bytes do not match {target.reference}")

        headers = _headers(target.reference, _content_length(upstream), protocol.UNCACHED)
        return Response(held_back(body()), status=200, headers=headers, direct_passthrough=True)

    def write(self, target: Target, credentials: Credentials | None, writer: Writer) -> Response:
        """This request holds the claim: fetch (from a peer or the upstream) on a thread of its own
        (see `proxy.upstream.fetch`) that fills the cache while this response streams what it wrote."""
        try:
            source = self._open_fill(target, credentials, writer)
        except BaseException:
            writer.abort()
            raise
        try:
            fetch = Fetch(writer, source.response, source.label, target.name, source.on_failure).start()
        except BaseException:
            source.response.close()
            writer.abort()
            raise
        response = Response(
            fetch.body(),
            status=200,
            headers=_headers(target.reference, source.size, protocol.MISS),
            direct_passthrough=True,
        )
        response.call_on_close(fetch.close)
        return response

    def follow(
        self,
        target: Target,
        credentials: Credentials | None,
        follower: Follower,
        reclaim: Callable[[], Writer | Follower | CachedBlob],
    ) -> Response:
        """Another request (any worker) is fetching this blob: stream its partial file as it grows.

        The client's access is checked first (`_follower_size`), also while the upstream is down. If
        the fill is aborted (its writer killed, say) before this response sent a byte, the response
        takes over: `reclaim` claims the blob again, as a new request would, and it streams what that
        gives (a fill of its own, another writer's, or the committed blob)."""
        try:
            size = self._follower_size(target, credentials)
        except BaseException:
            follower.close()
            raise

        def body() -> Iterator[bytes]:
            source = _followed(follower)
            for attempt in range(TAKEOVERS + 1):
                sent = False
                try:
                    for chunk in held_back(source):
                        sent = True
                        yield chunk
                    return
                except FetchAborted as exc:
                    if sent or attempt == TAKEOVERS:
                        raise TransferFailed(str(exc)) from None
                    log.info(
                        "the fill this request followed was aborted before it sent a byte; taking over",
                        extra={"digest": target.reference, "error": str(exc)},
                    )
                    source = self._taken_over(target, credentials, reclaim)

        return Response(
            body(),
            status=200,
            headers=_headers(target.reference, size, protocol.JOINED),
            direct_passthrough=True,
        )

    def _follower_size(self, target: Target, credentials: Credentials | None) -> int | None:
        """The blob's size for a client allowed to follow its fill; raises RegistryError if it is not.
        The upstream's HEAD decides (and gives the size). While the upstream is down the writer may
        still fill from a peer, so its followers are decided as for cached content: a stored decision
        (public, an offline grant), else a peer that has the blob and accepts the credentials."""
        try:
            size = self.upstream.head_blob(target.registry, target.repository, target.reference, credentials)
        except UpstreamUnavailable as exc:
            return self._offline_follower_size(target, credentials, exc)
        self.access.granted(target.registry, target.repository, credentials)
        return size

    def _offline_follower_size(
        self, target: Target, credentials: Credentials | None, error: UpstreamUnavailable
    ) -> int | None:
        def upstream_down(_credentials: Credentials | None) -> None:
            raise error

        try:
            self.access.check(target.registry, target.repository, credentials, upstream_down)
        except Unverifiable:
            vouched = self.peers.head(target, credentials) if self.peers is not None else None
            if vouched is None:
                raise
            with vouched:
                return _content_length(vouched)
        found = self.peers.head(target, credentials) if self.peers is not None else None
        if found is None:
            return None  # the response goes out chunked
        with found:
            return _content_length(found)

    def _taken_over(
        self,
        target: Target,
        credentials: Credentials | None,
        reclaim: Callable[[], Writer | Follower | CachedBlob],
    ) -> Iterator[bytes]:
        """The blob's bytes after claiming it again (see `follow`); raises FetchAborted when that
        claim's writer fails too, TransferFailed when this request's own fill fails."""
        try:
            claim = reclaim()
        except DiskFull as exc:
            raise TransferFailed(f"cannot take over the fill of {target.reference}: {exc}") from None
        if isinstance(claim, CachedBlob):
            with claim:
                while chunk := claim.read(CHUNK):
                    yield chunk
            return
        if isinstance(claim, Follower):
            yield from _followed(claim)
            return
        try:
            source = self._open_fill(target, credentials, claim)
        except BaseException:
            claim.abort()
            raise
        try:
            fetch = Fetch(claim, source.response, source.label, target.name, source.on_failure).start()
        except BaseException:
            source.response.close()
            claim.abort()
            raise
        try:
            yield from fetch.body()
        finally:
            fetch.close()


def _followed(follower: Follower) -> Iterator[bytes]:
    """The bytes of another writer's fill, as they land; raises FetchAborted if it is aborted."""
    try:
        for chunk in follower:
            metrics.MISS_BYTES.labels(kind="blob").inc(len(chunk))
            yield chunk
    finally:
        follower.close()
