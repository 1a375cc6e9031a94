"""A cold blob fetch on its own thread, decoupled from the client that started it.

The fetch thread reads the upstream body with one system call per chunk straight into a new bytes
object (one copy), appends it to the cache's partial file and hashes it, then puts it in a small
window of recent chunks. The client's response (`Fetch.body`) sends chunks from that window, so the
bytes are not copied again; a client that falls behind the window reads the partial file instead.
Reading, writing, hashing and sending release the GIL, so the fetch and the response run in
parallel; memory stays at one window whatever the client's speed; and a client that goes away does
not stop the fetch: the blob is still cached and followers in other workers still complete.

The response never sends the blob's last chunk before its digest is verified: on a mismatch, a
truncated or stalled body, the response raises (the server drops the connection) and no blob is kept.
A transfer that breaks off (the source resets, stalls past the read timeout, or closes before its
Content-Length) says nothing against the bytes that arrived: they stay in the partial file
(`Writer.interrupt`) and the next fill of the blob resumes from them. Bytes that do not verify, or
more of them than announced, are discarded.
A resumed fill (the writer adopted a killed or interrupted writer's partial file, the source sends
the rest) is the same transfer starting at byte `writer.bytes_written`: the client reads the adopted
bytes back from the partial file, like a client that fell behind the window, and its last chunk
waits for the digest too; if the completed blob does not verify, the adopted bytes are discarded
with it.
If the cache disk fills mid-way, the fetch keeps verifying and the rest of the bytes go to the client
through the window only (streaming through, uncached; the fetch then waits for the client).
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests
import urllib3

from imagewarm.errors import ImagewarmError
from proxy import metrics
from proxy.cache.store import DigestMismatch, DiskFull, SizeMismatch, Writer

log = logging.getLogger("imagewarm.proxy.fetch")

CHUNK = 1 << 20
# Recent chunks kept in memory for the client: beyond this it reads them back from the partial file.
WINDOW_BYTES = 8 << 20
# Streaming through a full disk: how long the fetch waits on a client that neither reads nor leaves.
STALL_TIMEOUT = 60.0


class TransferFailed(ImagewarmError):
    """Raised inside a response body to make the server drop the connection."""


_TRANSFER_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class TransferBrokeOff(ImagewarmError):
    """Reading the source's body failed (reset, read timeout, a broken chunked encoding) or it ended
    before the Content-Length it announced (http.client reports that as an ordinary end). Says nothing
    against the bytes that arrived before, unlike a local error (writing or reading back the file)."""


def _body_reader(response: requests.Response) -> Any:
    """What to `read1` the body from: http.client's response under urllib3 (it honours Content-Length
    and chunked encoding, one `recv` into a new bytes object per call), else urllib3's own."""
    inner = getattr(response.raw, "_fp", None)
    if inner is not None and hasattr(inner, "read1"):
        return inner
    return _Urllib3Reader(response.raw)


class _Urllib3Reader:
    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def read1(self, size: int) -> bytes:
        return bytes(self.raw.read(size, decode_content=False))


class Fetch:
    """One upstream blob transfer into `writer`, started by `start()`, served by `body()` (once)."""

    def __init__(
        self,
        writer: Writer,
        upstream: requests.Response,
        registry: str,
        image: str,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """`on_failure` is called (on the fetch thread) when the transfer fails or does not verify."""
        self.writer = writer
        self.on_failure = on_failure
        self.upstream = upstream
        self.registry = registry
        self.image = image
        self.digest = writer.digest
        # The response reads back through its own descriptor: still readable if the partial is removed.
        self._read_fd = os.open(writer.path, os.O_RDONLY | os.O_CLOEXEC)
        self._changed = threading.Condition()
        self._window: collections.deque[tuple[int, bytes]] = collections.deque()
        self._window_bytes = 0
        self._start = writer.bytes_written  # a resumed fill's adopted bytes, already in the file
        self._received = self._start  # bytes of the blob so far (adopted, then from upstream)
        self._cached = self._start  # of which in the partial file (stops growing when the disk is full)
        self._caching = True
        self._sent = 0  # bytes the client has been given
        self._verified = False
        self._error: str | None = None
        self._client_gone = False
        self._finished = False  # the client got every byte
        self._check: hashlib._Hash | None = None  # verifies what streams through once the disk is full
        self.thread = threading.Thread(target=self._run, name=f"fetch-{self.digest.hex[:12]}", daemon=True)

    def start(self) -> Fetch:
        self.thread.start()
        return self

    # -- the fetch thread ----------------------------------------------------------------------

    def _run(self) -> None:
        metrics.IN_FLIGHT.inc()
        started = time.monotonic()
        try:
            self._transfer()
            seconds = time.monotonic() - started
            metrics.FETCH_SECONDS.labels(registry=self.registry).observe(seconds)
            # One line per blob a node fetched: what an operator asks first ("who pulled what, and
            # from where?"), and what a test that counts fetches shows when it fails.
            log.info(
                "blob fetched",
                extra={
                    "digest": self.digest,
                    "image": self.image,
                    "source": self.registry,  # the registry, or "peers" (another node's proxy)
                    "bytes": self._received,
                    "resumed_from": self._start,
                    "seconds": round(seconds, 3),
                    "cached": self._caching,
                },
            )
        except DigestMismatch as exc:  # also SizeMismatch: more bytes than announced
            metrics.DIGEST_MISMATCHES.inc()
            if self._start and not isinstance(exc, SizeMismatch):
                # The adopted bytes may be the bad ones (a node that lost power mid-fill): they are gone
                # with the rest, so the next fill starts from byte 0 instead of resuming them again.
                metrics.RESUME_FALLBACKS.labels(reason="mismatch").inc()
                log.warning(
                    "a resumed fill did not verify: its adopted bytes were discarded, the next fill "
                    "starts from byte 0",
                    extra={"digest": self.digest, "adopted_bytes": self._start},
                )
            self._fail("upstream bytes do not match the digest; transfer dropped, nothing cached", exc)
        except TransferBrokeOff as exc:
            self._broke_off(exc)
        except _TRANSFER_ERRORS as exc:
            self._fail("upstream blob transfer failed; transfer dropped, nothing cached", exc)
        except Exception as exc:
            log.exception("blob fetch failed", extra={"digest": self.digest})
            self._fail("blob fetch failed; nothing cached", exc)
        finally:
            metrics.IN_FLIGHT.dec()
            self.upstream.close()
            self.writer.abort()  # no-op after a commit

    def _transfer(self) -> None:
        reader = _body_reader(self.upstream)
        upstream_bytes = metrics.UPSTREAM_BYTES.labels(registry=self.registry)
        while chunk := self._read(reader):
            upstream_bytes.inc(len(chunk))
            if self._caching:
                try:
                    self.writer.write(chunk)
                except DiskFull as exc:
                    self._stop_caching(exc)
            if not self._caching:
                assert self._check is not None
                self._check.update(chunk)
            self._append(chunk)
        expected = self.writer.expected_size
        if expected is not None and self._received < expected:
            raise TransferBrokeOff(
                f"the source closed the body of {self.digest} after {self._received} of {expected} bytes"
            )
        if self._caching:
            self.writer.verify()
        else:
            assert self._check is not None
            if not self.digest.matches(self._check):
                actual = f"{self._check.name}:{self._check.hexdigest()}"
                raise DigestMismatch(f"bytes for {self.digest} hash to {actual}")
        with self._changed:
            self._verified = True  # the client may have the last chunk now, before the slower fsync
            self._changed.notify_all()
        if self._caching:
            self.writer.commit()

    def _read(self, reader: Any) -> bytes:
        try:
            chunk: bytes = reader.read1(CHUNK)
        except _TRANSFER_ERRORS as exc:
            raise TransferBrokeOff(
                f"reading {self.digest} from the source failed after {self._received} bytes: "
                f"{exc or type(exc).__name__}"
            ) from exc
        return chunk

    def _append(self, chunk: bytes) -> None:
        with self._changed:
            self._window.append((self._received, chunk))
            self._window_bytes += len(chunk)
            self._received += len(chunk)
            if self._caching:
                self._cached = self._received
            self._trim()
            deadline = time.monotonic() + STALL_TIMEOUT
            while self._window_bytes > WINDOW_BYTES and not self._caching:
                # Streaming through: the chunks exist nowhere else, so wait for the client to take them.
                if self._client_gone:
                    raise TimeoutError(f"the client left while {self.digest} streamed through uncached")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the client stopped reading {self.digest} for {STALL_TIMEOUT:g}s")
                self._changed.wait(1.0)
                self._trim()
            self._changed.notify_all()

    def _trim(self) -> None:
        """Drop the oldest chunks over the window's size that the client has or can read from the file."""
        while self._window_bytes > WINDOW_BYTES:
            offset, chunk = self._window[0]
            end = offset + len(chunk)
            if end > self._cached and end > self._sent:
                return
            self._window.popleft()
            self._window_bytes -= len(chunk)

    def _stop_caching(self, exc: DiskFull) -> None:
        self._check = self.writer.running_hash()  # the writer hashed what it wrote before the disk filled
        self._caching = False
        metrics.UNCACHED_STREAMS.labels(reason="disk_full").inc()
        log.warning(
            "cache disk full: streaming without caching", extra={"digest": self.digest, "error": str(exc)}
        )

    def _broke_off(self, exc: TransferBrokeOff) -> None:
        """The transfer failed, not the bytes: keep what arrived for the next fill to resume from."""
        outcome = self.writer.interrupt()
        if outcome != "closed":  # "closed": the writer had already stopped (a full disk, a write error)
            metrics.INTERRUPTED_FILLS.labels(partial=outcome).inc()
        if outcome == "kept":
            message = "upstream blob transfer broke off; the bytes received stay for the next fill to resume"
        else:
            message = "upstream blob transfer failed; transfer dropped, nothing cached"
        self._fail(message, exc, received_bytes=self._received, partial=outcome)

    def _fail(self, message: str, exc: BaseException, **details: object) -> None:
        log.error(message, extra={"image": self.image, "digest": self.digest, "error": str(exc), **details})
        self.writer.abort()  # a no-op after `interrupt`
        if self.on_failure is not None:
            self.on_failure()
        with self._changed:
            self._error = str(exc) or type(exc).__name__
            self._changed.notify_all()

    # -- the client's response -----------------------------------------------------------------

    def body(self) -> Iterator[bytes]:
        """The blob's bytes for the client that started the fetch; raises TransferFailed on failure."""
        finished = False
        try:
            while True:
                with self._changed:
                    while (step := self._next_step()) is None:
                        self._changed.wait(1.0)
                if isinstance(step, _Done):
                    finished = True
                    return
                data = step if isinstance(step, bytes) else self._read_back(step)
                with self._changed:
                    self._sent += len(data)
                    self._changed.notify_all()
                metrics.MISS_BYTES.labels(kind="blob").inc(len(data))
                yield data
        finally:
            self._finished = finished
            if not finished:
                self.close()
            self._close_read()

    def _next_step(self) -> bytes | tuple[int, int] | _Done | None:
        """Under the lock: bytes to send, a (start, end) span to read back from the file, _DONE, or None
        to wait. Raises TransferFailed when the fetch failed."""
        if self._error and not self._verified:  # once verified, a failed commit only loses the cache
            raise TransferFailed(self._error)
        sent = self._sent
        # Held back: the last chunk goes only once the digest is verified (a resumed fill's adopted bytes
        # may go before the first new chunk arrives: a 206 of the rest always has a last chunk).
        last_chunk_start = self._window[-1][0] if self._window else self._start
        limit = self._received if self._verified else last_chunk_start
        if sent >= limit:
            return _DONE if self._verified and sent == self._received else None
        oldest = self._window[0][0] if self._window else self._received
        if sent < oldest:  # fell behind the window: those bytes are in the file
            return (sent, min(oldest, sent + CHUNK))
        # Several small chunks ready (or `sent` inside a chunk): one read back and one send beat many.
        span_end = min(sent + CHUNK, limit, self._cached)
        for offset, chunk in self._window:
            if offset <= sent < offset + len(chunk):
                if offset == sent and (len(chunk) >= span_end - sent or span_end <= sent):
                    return chunk
                if span_end > sent:
                    return (sent, span_end)
                return chunk[sent - offset :]  # streaming through a full disk: not in the file
        raise AssertionError(f"byte {sent} of {self.digest} is in neither the window nor the file")

    def _read_back(self, span: tuple[int, int]) -> bytes:
        start, end = span
        data = os.pread(self._read_fd, end - start, start)
        if len(data) != end - start:
            raise TransferFailed(f"the partial file of {self.digest} ended early")
        return data

    def close(self) -> None:
        """The client is gone (or never read): the fetch goes on to fill the cache. Idempotent; also the
        server's close callback of the response, so the read side is freed even if `body` never ran."""
        with self._changed:
            if self._client_gone or self._finished:
                self._close_read()
                return
            self._client_gone = True
            self._changed.notify_all()
        if self.thread.is_alive() and self._caching:
            log.info(
                "client left during a cold fetch; the fetch goes on to fill the cache",
                extra={"digest": self.digest, "sent_bytes": self._sent},
            )
        self._close_read()

    def _close_read(self) -> None:
        fd, self._read_fd = self._read_fd, -1
        if fd >= 0:
            os.close(fd)


class _Done:
    """The client got every byte."""


_DONE = _Done()
