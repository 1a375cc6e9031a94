"""Warming an image: pulling it through a node proxy, as a runtime would, so the proxy caches all of it.

`warm(image, proxy_url)` asks the proxy in rewrite mode (`/v2/<registry-segment>/<repository>/...`,
the path `reference.to_proxied` names) for the manifest; an index resolves to the manifest of the
wanted platform (or of every platform); then the config and every layer blob are fetched a few at a
time (3, like containerd), their bodies counted and discarded: the proxy verifies and keeps them.
The proxy never ends a body it could not verify, so a completed fetch of the right size is cached.

Credentials are the `Authorization` header for the image (`dockerconfig.authorization_for`), sent
on every request: the proxy forwards it upstream and checks it before serving cached content.
Every failure is a `WarmError` whose message says what went wrong and what to do.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests

from imagewarm import __version__, platforms, protocol
from imagewarm.digest import Digest
from imagewarm.mediatypes import INDEX_TYPES, MANIFEST_TYPES
from imagewarm.platforms import Platform
from imagewarm.reference import Reference, Unproxiable, parse, registry_segment

log = logging.getLogger("imagewarm.warmup")

DEFAULT_PROXY_URL = "http://localhost:7439"
PARALLEL_BLOBS = 3  # containerd's default max_concurrent_downloads
_CHUNK = 1 << 20
_MAX_INDEX_DEPTH = 2  # an index may point at indexes; deeper nesting is not something registries serve


class WarmError(RuntimeError):
    """The image could not be warmed; the message says why and what to do."""


class ProxyUnreachable(WarmError, ConnectionError):
    """Nothing answers at the proxy URL."""


class CredentialsRefused(WarmError, PermissionError):
    """The proxy (checking with the upstream) refused the credentials sent, or that none were."""


class ManifestUnknown(WarmError, LookupError):
    """The image's repository or tag does not exist upstream (nor in the cache)."""


class NoMatchingPlatform(WarmError, LookupError):
    """A multi-platform image has no image for the wanted platform."""


class WarmCancelled(WarmError):
    """The caller's `cancel` event was set before the warm-up finished (what was verified stays cached)."""


@dataclass(frozen=True)
class Progress:
    """Where a warm-up stands. `finished` is the digest of the blob that just completed, or None for
    an update during a transfer."""

    image: Reference
    done: int
    total: int
    blobs_done: int
    blobs_total: int
    finished: str | None = None


def describe(progress: Progress) -> str:
    """One progress line: `warm nginx:1.27: 12.0 / 64.1 MiB, 2/4 blobs  sha256:0123456789ab`."""
    line = (
        f"warm {progress.image.familiar}: {progress.done / 2**20:7.1f} / {progress.total / 2**20:.1f} MiB, "
        f"{progress.blobs_done}/{progress.blobs_total} blobs"
    )
    return line + (f"  {progress.finished[:19]}" if progress.finished else "")


@dataclass(frozen=True)
class WarmResult:
    """A warmed image: `digest` is what the reference resolved to (an index's own digest for a
    multi-platform image), `manifests` the platform manifests pulled, `bytes` and `blobs` the
    config and layer blobs transferred (each once, even when platforms share one), `cached` how many
    of those the proxy served from its cache."""

    image: Reference
    digest: str
    manifests: tuple[str, ...]
    bytes: int
    blobs: int
    seconds: float
    cached: int = 0  # of `blobs`, how many the proxy already had (its X-Imagewarm-Cache: hit)
    blob_digests: tuple[str, ...] = ()  # the config and layer blobs, each once, in pull order

    @property
    def mib_per_second(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int


def _descriptor(image: Reference, descriptor: Any) -> _Blob:
    """A manifest's descriptor as a checked (digest, size): it names a path on the proxy."""
    try:
        digest, size = descriptor["digest"], descriptor["size"]
        Digest.parse(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"size {size!r} is not a byte count")
    except (KeyError, TypeError, ValueError) as exc:
        raise WarmError(f"{image.familiar}: its manifest has an invalid descriptor ({exc})") from None
    return _Blob(digest, size)


def proxied_path(image: Reference, kind: str, identifier: str) -> str:
    """The proxy's rewrite-mode path for a manifest or blob of `image`:
    `/v2/registry.corp_5000/team/app/manifests/1.4`. Raises Unproxiable for an IPv6 registry."""
    return f"/v2/{registry_segment(image.registry)}/{image.repository}/{kind}/{identifier}"


def manifest_identifier(image: Reference) -> str:
    """What to ask for: the digest when the reference pins one (as runtimes do), else the tag."""
    return image.digest or image.tag or "latest"


def oci_error_text(body: bytes) -> str:
    """The `CODE: message` pairs of an OCI error body, or its first line when it is not one."""
    try:
        errors = json.loads(body)["errors"]
        shown = [f"{e.get('code', '?')}: {e.get('message', '')}".rstrip(": ") for e in errors]
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return text.splitlines()[0][:200] if text else "no details"
    return "; ".join(shown) or "no details"


def error_for(image: Reference, status: int, body: bytes, *, credentials_sent: bool, what: str) -> WarmError:
    """The WarmError for a proxy's error answer to the request for `what` (e.g. `manifest 1.4`).

    The proxy answers 401 to a client without credentials for a private image and 403 to credentials
    the upstream refuses (or for a registry it does not proxy: its message says so)."""
    name, host = image.familiar, image.registry
    said = f"proxy: {oci_error_text(body)}"
    if status == 401 or (status == 403 and credentials_sent):
        sent = "the credentials sent were refused" if credentials_sent else "no credentials were sent"
        return CredentialsRefused(
            f"credentials refused for {name}: give --docker-config with an entry for {host} ({sent}; {said})"
        )
    if status == 404 and what.startswith("manifest"):
        return ManifestUnknown(
            f"manifest unknown: {name} is not in {host}; check the repository and tag ({said})"
        )
    hint = {
        403: "the proxy does not serve this registry",
        502: f"the proxy could not reach {host} and has no cached copy; retry when it is back",
        429: f"{host} is rate-limiting the proxy; retry later",
    }.get(status, "see the proxy's log")
    return WarmError(f"{what} of {name}: the proxy answered {status} ({said}); {hint}")


class _Proxy:
    """GETs against the proxy for one image, one HTTP session per thread, errors made WarmErrors."""

    def __init__(self, url: str, image: Reference, authorization: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.image = image
        self.timeout = timeout
        self.headers = {"User-Agent": f"imagewarm/{__version__} (warm)"}
        if authorization:
            self.headers["Authorization"] = authorization
        self.answered = False
        self.first_cache: str | None = None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        for session in self._sessions:
            session.close()

    @contextmanager
    def get(
        self, kind: str, identifier: str, what: str, accept: str | None = None
    ) -> Iterator[requests.Response]:
        url = self.url + proxied_path(self.image, kind, identifier)
        try:
            response = self._session().get(
                url, headers={"Accept": accept} if accept else {}, stream=True, timeout=(10, self.timeout)
            )
        except requests.ConnectionError as exc:
            raise ProxyUnreachable(
                f"cannot reach the proxy at {self.url} ({type(exc).__name__}); start it, or give its "
                "address with --proxy"
            ) from exc
        except requests.Timeout as exc:
            raise WarmError(
                f"{what} of {self.image.familiar}: the proxy at {self.url} did not answer within "
                f"{self.timeout:.0f}s; see the proxy's log"
            ) from exc
        with response:
            if response.status_code != 200:
                raise error_for(
                    self.image,
                    response.status_code,
                    response.content,
                    credentials_sent="Authorization" in self.headers,
                    what=what,
                )
            yield response

    def manifest(self, identifier: str, expected: str | None) -> tuple[str, str, dict[str, Any]]:
        """(digest, media type, document) of a manifest, its bytes checked against `expected`.
        The first manifest's X-Imagewarm-Cache answer is kept in `first_cache`."""
        what = f"manifest {identifier}"
        with self.get("manifests", identifier, what, ", ".join(MANIFEST_TYPES)) as response:
            data = self._read(response, what)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            if not self.answered:
                self.answered = True
                self.first_cache = response.headers.get(protocol.CACHE_HEADER)
        # `expected` came from a parsed reference or a checked descriptor.
        digest = str(Digest.of(data, Digest.parse(expected).algorithm if expected else "sha256"))
        if expected and digest != expected:
            raise WarmError(
                f"{what} of {self.image.familiar}: the proxy sent content with digest {digest}, not "
                f"{expected}; see the proxy's log"
            )
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise WarmError(f"{what} of {self.image.familiar}: the proxy sent a body that is not a manifest")
        return digest, document.get("mediaType") or media_type, document

    def _read(self, response: requests.Response, what: str) -> bytes:
        try:
            return response.content
        except requests.RequestException as exc:
            raise self._broken(what, exc) from exc

    def _broken(self, what: str, exc: Exception) -> WarmError:
        return WarmError(
            f"{what} of {self.image.familiar}: the proxy broke off the transfer ({type(exc).__name__}); "
            "it does so when the upstream fails or sends bytes that do not match the digest; retry, "
            "and see the proxy's log if it persists"
        )

    def blob(self, blob: _Blob, received: Callable[[int], None], stop: threading.Event) -> bool:
        """Fetch one blob through the proxy, body discarded; True when the proxy had it cached.
        Raises WarmError unless all of it came."""
        digest, size = blob.digest, blob.size
        what = f"blob {digest[:19]}"
        got = 0
        with self.get("blobs", digest, what) as response:
            hit = response.headers.get(protocol.CACHE_HEADER) == protocol.HIT
            try:
                for chunk in response.iter_content(_CHUNK):
                    if stop.is_set():
                        return hit  # another blob failed: the warm-up is over
                    got += len(chunk)
                    received(len(chunk))
            except requests.RequestException as exc:
                raise self._broken(what, exc) from exc
        if got != size:
            raise WarmError(
                f"{what} of {self.image.familiar}: the proxy sent {got} bytes, the manifest says {size}; "
                "retry, and see the proxy's log if it persists"
            )
        return hit


def _is_index(document: Mapping[str, Any], media_type: str) -> bool:
    return media_type in INDEX_TYPES or ("manifests" in document and "layers" not in document)


def _resolve(
    proxy: _Proxy, identifier: str, expected: str | None, wanted: Platform | str, depth: int = 0
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """(digest of what `identifier` names, [(digest, image manifest)] to pull for `wanted`)."""
    digest, media_type, document = proxy.manifest(identifier, expected)
    if not _is_index(document, media_type):
        if not isinstance(document.get("config"), Mapping) or not isinstance(document.get("layers"), list):
            raise WarmError(
                f"{proxy.image.familiar}: {media_type or 'the manifest'} is not an image manifest or index "
                "this client knows (OCI or Docker schema 2)"
            )
        return digest, [(digest, document)]
    if depth >= _MAX_INDEX_DEPTH:
        raise WarmError(f"{proxy.image.familiar}: indexes nested deeper than {_MAX_INDEX_DEPTH} levels")
    try:
        chosen = platforms.choose(document.get("manifests") or [], wanted, proxy.image.familiar)
    except platforms.NoMatchingPlatform as exc:
        raise NoMatchingPlatform(str(exc)) from None
    manifests: list[tuple[str, dict[str, Any]]] = []
    for entry in chosen:
        child = _descriptor(proxy.image, entry).digest
        manifests += _resolve(proxy, child, child, wanted, depth + 1)[1]
    return digest, manifests


def _blobs(image: Reference, manifests: list[tuple[str, dict[str, Any]]]) -> list[_Blob]:
    """Config and layers of every manifest, each digest once, in pull order."""
    seen: dict[str, _Blob] = {}
    for _, manifest in manifests:
        for descriptor in [manifest["config"], *manifest["layers"]]:
            blob = _descriptor(image, descriptor)
            seen.setdefault(blob.digest, blob)
    return list(seen.values())


class _Tracker:
    """Counts bytes from several threads and reports progress: at each finished blob, and otherwise
    at most every `interval` seconds."""

    def __init__(
        self, image: Reference, blobs: list[_Blob], report: Callable[[Progress], None], interval: float
    ) -> None:
        self.image = image
        self.total = sum(b.size for b in blobs)
        self.blobs_total = len(blobs)
        self.done = 0
        self.blobs_done = 0
        self.report = report
        self.interval = interval
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def _emit(self, finished: str | None) -> None:
        self.last = time.monotonic()
        self.report(Progress(self.image, self.done, self.total, self.blobs_done, self.blobs_total, finished))

    def received(self, count: int) -> None:
        with self.lock:
            self.done += count
            if time.monotonic() - self.last >= self.interval:
                self._emit(None)

    def finished(self, digest: str) -> None:
        with self.lock:
            self.blobs_done += 1
            self._emit(digest)


def warm(
    image: Reference | str,
    proxy_url: str = DEFAULT_PROXY_URL,
    *,
    platform: Platform | str | None = None,
    authorization: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    parallel: int = PARALLEL_BLOBS,
    timeout: float = 60.0,
    progress_interval: float = 1.0,
    cancel: threading.Event | None = None,
) -> WarmResult:
    """Pull `image` through the proxy at `proxy_url` so the proxy caches it: its manifest, the manifest
    for `platform` (this machine's by default; `platforms.ALL` for every one) when it is an index, then
    the config and layer blobs, `parallel` at a time. `authorization` is sent on every request.

    Raises WarmError (ProxyUnreachable, CredentialsRefused, ManifestUnknown, NoMatchingPlatform or
    the base class) with a message that says what to do; InvalidReference for invalid text.
    Setting `cancel` ends the warm-up at the next chunk with WarmCancelled (a stalled transfer ends
    at its `timeout`); the blobs the proxy verified so far stay in its cache."""
    ref = parse(image) if isinstance(image, str) else image
    wanted = platform if platform is not None else platforms.this_platform()
    report = progress or (lambda _: None)
    started = time.monotonic()
    try:
        proxied_path(ref, "manifests", manifest_identifier(ref))
    except Unproxiable as exc:
        raise WarmError(f"{ref.familiar} cannot be pulled through the proxy: {exc}") from None
    proxy = _Proxy(proxy_url, ref, authorization, timeout)
    try:
        digest, manifests = _resolve(proxy, manifest_identifier(ref), ref.digest, wanted)
        blobs = _blobs(ref, manifests)
        tracker = _Tracker(ref, blobs, report, progress_interval)
        stop = threading.Event()

        hits: list[str] = []

        def received(count: int) -> None:
            if cancel is not None and cancel.is_set():
                raise WarmCancelled(f"warm-up of {ref.familiar} cancelled")
            tracker.received(count)

        def fetch(blob: _Blob) -> None:
            if cancel is not None and cancel.is_set():
                raise WarmCancelled(f"warm-up of {ref.familiar} cancelled")
            if proxy.blob(blob, received, stop):
                hits.append(blob.digest)
            if not stop.is_set():
                tracker.finished(blob.digest)

        with concurrent.futures.ThreadPoolExecutor(max(1, parallel), thread_name_prefix="warm") as pool:
            futures = [pool.submit(fetch, b) for b in blobs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                stop.set()  # running fetches end at their next chunk; queued ones never start
                for future in futures:
                    future.cancel()
                raise
    finally:
        proxy.close()
    result = WarmResult(
        ref,
        digest,
        tuple(d for d, _ in manifests),
        tracker.done,
        len(blobs),
        time.monotonic() - started,
        cached=len(hits),
        blob_digests=tuple(b.digest for b in blobs),
    )
    log.info(
        "image warmed",
        extra={
            "image": str(ref),
            "digest": digest,
            "bytes": result.bytes,
            "blobs": result.blobs,
            "cached": result.cached,
            "seconds": round(result.seconds, 3),
        },
    )
    return result


@dataclass(frozen=True)
class Measurement:
    """What an image's manifests say, read through a proxy: `digest` what the reference resolved
    to, `size` the bytes of config and layers for the platform, `cache` the proxy's
    X-Imagewarm-Cache answer for the first manifest (`stale`: the upstream failed; `miss`: it
    answered just now; `hit`: the proxy did not ask it)."""

    digest: str
    size: int
    cache: str | None


def measure(
    image: Reference | str,
    proxy_url: str,
    *,
    platform: Platform | str | None = None,
    authorization: str | None = None,
    timeout: float = 30.0,
) -> Measurement:
    """Read `image`'s manifest (and, for an index, the platform's) through the proxy, without its
    blobs. Raises WarmError as `warm` does."""
    ref = parse(image) if isinstance(image, str) else image
    wanted = platform if platform is not None else platforms.this_platform()
    try:
        proxied_path(ref, "manifests", manifest_identifier(ref))
    except Unproxiable as exc:
        raise WarmError(f"{ref.familiar} cannot be pulled through the proxy: {exc}") from None
    proxy = _Proxy(proxy_url, ref, authorization, timeout)
    try:
        digest, manifests = _resolve(proxy, manifest_identifier(ref), ref.digest, wanted)
        size = sum(blob.size for blob in _blobs(ref, manifests))
    finally:
        proxy.close()
    return Measurement(digest, size, proxy.first_cache)
