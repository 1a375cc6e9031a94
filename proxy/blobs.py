"""Blobs: a hit goes out zero-copy (gunicorn `sendfile`s a `wsgi.file_wrapper` response of known
length), with `Range`; a miss is teed (see `proxy.tee`). HEAD shares the GET path, without a body."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

from flask import Response, request
from werkzeug.wsgi import FileWrapper

from imagewarm import protocol
from proxy import metrics
from proxy.cache.store import BlobStore, CachedBlob, DiskFull, Follower, NotCached, Writer
from proxy.errors import RegistryError
from proxy.ranges import parse_range
from proxy.routes import Target
from proxy.tee import Tee
from proxy.upstream.auth import Credentials

SEND_BLOCK = 1 << 20


class _BlobFile(io.FileIO):
    """A private descriptor of a cached blob for the server to `sendfile` from; closing it also releases
    the blob's eviction lock."""

    def __init__(self, blob: CachedBlob) -> None:
        super().__init__(os.dup(blob.fileno()), "rb", closefd=True)
        self._blob = blob

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._blob.close()


def blob_headers(digest: str, length: int) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Content-Length": str(length),
        protocol.CACHE_HEADER: protocol.HIT,
    }


class Blobs:
    def __init__(self, store: BlobStore, tee: Tee) -> None:
        self.store = store
        self.tee = tee

    def serve(self, target: Target, credentials: Credentials | None, head: bool) -> Response:
        digest = target.blob_digest
        range_header = request.headers.get("Range")
        if request.headers.get(protocol.PEER_HEADER):
            return self._for_peer(target, credentials, head, range_header)
        if not self.store.has(digest):
            if head:
                return self.tee.head(target, credentials)
            if range_header:
                return self.tee.passthrough(target, credentials, range_header)
        try:
            claim = self.store.claim(digest)
        except DiskFull as exc:  # not even room for the partial file: stream through, verified
            return self.tee.uncached(target, credentials, str(exc))
        if isinstance(claim, Writer):
            return self.tee.write(target, credentials, claim)
        if isinstance(claim, Follower):
            return self.tee.follow(target, credentials, claim, lambda: self.store.claim(digest))
        return self._checked(claim, target, credentials, head, range_header)

    def _for_peer(
        self, target: Target, credentials: Credentials | None, head: bool, range_header: str | None
    ) -> Response:
        """Another node's proxy asks: answer from the cache only, never fetch for it."""
        try:
            blob = self.store.open(target.blob_digest)
        except NotCached:
            raise RegistryError(
                "BLOB_UNKNOWN", f"{target.reference} is not cached on this node", status=404
            ) from None
        return self._checked(blob, target, credentials, head, range_header)

    def _checked(
        self,
        blob: CachedBlob,
        target: Target,
        credentials: Credentials | None,
        head: bool,
        range_header: str | None,
    ) -> Response:
        """A cached blob for a client that proves access (the blob is released if it does not)."""
        try:
            self.tee.check_access(target, credentials)
            return self._from_cache(blob, head, range_header)
        except BaseException:
            blob.close()
            raise

    def _from_cache(self, blob: CachedBlob, head: bool, range_header: str | None) -> Response:
        span = parse_range(range_header, blob.size)
        first, last = span if span else (0, blob.size - 1)
        length = last - first + 1
        headers = blob_headers(str(blob.digest), length)
        status = 200
        if span:
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{blob.size}"
        if head:
            blob.close()
            return Response(_empty(), status=status, headers=headers)
        metrics.HIT_BYTES.labels(kind="blob").inc(length)
        handle = _BlobFile(blob)
        handle.seek(first)  # gunicorn sends `Content-Length` bytes from the current offset
        wrap = request.environ.get("wsgi.file_wrapper", FileWrapper)
        return Response(wrap(handle, SEND_BLOCK), status=status, headers=headers, direct_passthrough=True)


def _empty() -> Iterable[bytes]:
    return iter(())
