"""The upstream registry client: pooled connections, token/basic auth, bounded retries, safe redirects.

Every request names a registry (already checked against the allow-list), a repository and the
client's credentials (or None). Failures become RegistryErrors the proxy can answer with:
401 UNAUTHORIZED / 403 DENIED / 404 *_UNKNOWN as the upstream said, UpstreamUnavailable after the
retries of connection errors, timeouts, 429 and 5xx.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from imagewarm import reference as references
from imagewarm.digest import Digest, InvalidDigest
from imagewarm.mediatypes import MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, SCHEMA1_TYPES
from proxy.config import ProxyConfig
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.ranges import parse_length
from proxy.upstream.auth import Challenge, Credentials, TokenCache, cache_key, parse_challenge

log = logging.getLogger("imagewarm.proxy.upstream")

MAX_MANIFEST_BYTES = 4 << 20
MAX_REDIRECTS = 5
MAX_BACKOFF = 2.0
MAX_RETRY_AFTER = 5.0

ACCEPT = ", ".join(MANIFEST_TYPES)
# Content types some registries and static file servers put on manifests, saying nothing of the kind.
GENERIC_TYPES = ("", "application/json", "text/plain", "application/octet-stream")


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest


class Upstream:
    """One client (connection pool, token cache) for all allowed upstream registries; thread-safe."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.tokens = TokenCache()
        # Which scheme each registry asked for, so later requests authenticate up front.
        self._challenges: dict[str, Challenge] = {}
        self._failing_token_services: set[str] = set()  # realms whose last answer was a failure
        self._lock = threading.Lock()

    # --- requests -------------------------------------------------------------------------------

    def base_url(self, registry: str) -> str:
        return f"{self.config.scheme(registry)}://{references.registry_endpoint(registry)}"

    def request(
        self,
        method: str,
        registry: str,
        repository: str,
        path: str,
        credentials: Credentials | None,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send `method` to `<registry>/v2/<repository>/<path>`, authenticating as the upstream asks.

        Returns the final response whatever its status (the caller maps 401/403/404); raises
        UpstreamUnavailable when the upstream cannot be reached or keeps answering 429/5xx."""
        url = f"{self.base_url(registry)}/v2/{repository}/{path}"
        sent = dict(headers or {})
        authorization = self._authorization(registry, repository, credentials)
        response = self._send(method, url, sent, authorization, stream)
        if response.status_code == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if challenge is not None:
                self._challenges[registry] = challenge
                authorization = self._answer(challenge, registry, repository, credentials)
                if authorization is not None:
                    response.close()
                    response = self._send(method, url, sent, authorization, stream)
        return response

    def _authorization(self, registry: str, repository: str, credentials: Credentials | None) -> str | None:
        """The Authorization for a first try, from the challenge this registry sent before. A token
        service failure raises (RegistryError): the request would only be refused without one."""
        challenge = self._challenges.get(registry)
        if challenge is None:
            return None
        return self._answer(challenge, registry, repository, credentials)

    def _answer(
        self, challenge: Challenge, registry: str, repository: str, credentials: Credentials | None
    ) -> str | None:
        if challenge.scheme == "basic":
            return credentials.basic() if credentials else None
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return None
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        scope = f"repository:{repository}:pull"
        key = (cache_key(credentials), realm, service, scope)
        token = self.tokens.get(key)
        if token is None:
            token, expires_in = self._fetch_token(realm, service, scope, credentials)
            self.tokens.put(key, token, expires_in)
        return f"Bearer {token}"

    def _fetch_token(
        self, realm: str, service: str, scope: str, credentials: Credentials | None
    ) -> tuple[str, float]:
        """A token for `scope` from the registry's token service `realm`. Raises RegistryError:
        UNAUTHORIZED when it refuses the credentials, UpstreamUnavailable when it fails."""
        params = {"scope": scope, **({"service": service} if service else {})}
        headers = {"Authorization": credentials.basic()} if credentials else {}
        try:
            response = self.session.get(realm, params=params, headers=headers, timeout=self._timeouts())
        except requests.RequestException as exc:
            raise self._token_service_failed(realm, scope, f"is unreachable: {exc}") from None
        if response.status_code in (401, 403):
            self._token_service_answers(realm)
            raise RegistryError(
                "UNAUTHORIZED",
                f"the registry's token service refused these credentials "
                f"for {scope}: log in with credentials that may pull it",
            )
        if response.status_code != 200:
            raise self._token_service_failed(realm, scope, f"answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body["access_token"]
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, KeyError, TypeError):
            raise self._token_service_failed(realm, scope, "sent no token") from None
        self._token_service_answers(realm)
        return str(token), expires_in

    def _token_service_failed(self, realm: str, scope: str, what: str) -> UpstreamUnavailable:
        """The error for a token service failure, logged once per failing state of `realm`."""
        with self._lock:
            first = realm not in self._failing_token_services
            self._failing_token_services.add(realm)
        if first:
            log.warning(
                "token service failing: pulls that need a token fail until it answers (cached "
                "manifests and blobs are still served)",
                extra={"realm": realm, "scope": scope, "error": what},
            )
        return UpstreamUnavailable(
            f"the registry's token service {realm} {what}: this registry needs a token for {scope}, so "
            "nothing can be fetched from it now; retry later (what the proxy has cached is still served)"
        )

    def _token_service_answers(self, realm: str) -> None:
        if realm not in self._failing_token_services:  # the common case, without the lock
            return
        with self._lock:
            recovered = realm in self._failing_token_services
            self._failing_token_services.discard(realm)
        if recovered:
            log.info("token service answers again", extra={"realm": realm})

    def _timeouts(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.read_timeout)

    def _send(
        self, method: str, url: str, headers: dict[str, str], authorization: str | None, stream: bool
    ) -> requests.Response:
        """One logical request: retried on connection errors, 429 and 5xx with bounded backoff."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._follow(method, url, headers, authorization, stream)
            except requests.RequestException as exc:
                if last:
                    raise UpstreamUnavailable(
                        f"{method} {url} failed after {attempts} attempts: {exc}"
                    ) from None
                time.sleep(_backoff(attempt))
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if last:
                    return response
                wait = _backoff(attempt, response.headers.get("Retry-After"))
                log.info(
                    "upstream busy, retrying",
                    extra={"url": url, "status": response.status_code, "wait_seconds": wait},
                )
                response.close()
                time.sleep(wait)
                continue
            return response
        raise AssertionError("unreachable")

    def _follow(
        self, method: str, url: str, headers: dict[str, str], authorization: str | None, stream: bool
    ) -> requests.Response:
        """Follow redirects ourselves: credentials go only to the host they were meant for."""
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if authorization and urlsplit(url).netloc == origin:
                sent["Authorization"] = authorization
            response = self.session.request(
                method, url, headers=sent, stream=stream, allow_redirects=False, timeout=self._timeouts()
            )
            if response.status_code not in (301, 302, 303, 307, 308) or "Location" not in response.headers:
                return response
            url = urljoin(url, response.headers["Location"])
            response.close()
            if response.status_code == 303:
                method = "GET"
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from {origin}")

    # --- the pull API -----------------------------------------------------------------------------

    def manifest(
        self,
        registry: str,
        repository: str,
        reference: str,
        credentials: Credentials | None,
    ) -> Manifest:
        """GET a manifest: size-limited, digest-verified (against the request and the header)."""
        name = f"{registry}/{repository}:{reference}"
        response = self.request(
            "GET",
            registry,
            repository,
            f"manifests/{reference}",
            credentials,
            headers={"Accept": ACCEPT + ", " + ", ".join(SCHEMA1_TYPES)},
            stream=True,
        )
        with response:
            _raise_for(response, "MANIFEST_UNKNOWN", name)
            declared = parse_length(response.headers.get("Content-Length"))
            if declared is not None and declared > MAX_MANIFEST_BYTES:
                raise RegistryError(
                    "MANIFEST_INVALID",
                    f"{name}: manifest of {declared} bytes is over the "
                    f"{MAX_MANIFEST_BYTES} byte limit; refusing it",
                    status=502,
                )
            data = _read_limited(response, MAX_MANIFEST_BYTES, name)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if _is_schema1(media_type, data):
            raise RegistryError(
                "MANIFEST_INVALID",
                f"{name} is a Docker schema 1 manifest, which is not "
                "supported: push the image again with a current tool (schema 2 or OCI)",
                status=502,
            )
        digest = Digest.of(data)
        asked = Digest.parse(reference) if ":" in reference else None  # a Target's: already checked
        if asked is not None and Digest.of(data, asked.algorithm) != asked:
            raise RegistryError(
                "MANIFEST_INVALID",
                f"{name}: the upstream sent a manifest whose digest is "
                f"{digest}, not the one asked for; not caching it",
                status=502,
            )
        header = response.headers.get("Docker-Content-Digest")
        if header and header.startswith("sha256:") and header != str(digest):
            raise RegistryError(
                "MANIFEST_INVALID",
                f"{name}: the upstream's Docker-Content-Digest {header} "
                f"does not match the body ({digest}); not caching it",
                status=502,
            )
        # A generic or missing type would make runtimes refuse the manifest: name it from the body.
        named = _guess_media_type(data) if media_type in GENERIC_TYPES else media_type
        return Manifest(data, named, asked or Digest.of(data))

    def head_manifest(
        self, registry: str, repository: str, reference: str, credentials: Credentials | None
    ) -> Digest | None:
        """The digest the upstream gives for a tag or digest (None if it sent no digest header, or
        one that is no digest this proxy can verify)."""
        response = self.request(
            "HEAD", registry, repository, f"manifests/{reference}", credentials, headers={"Accept": ACCEPT}
        )
        with response:
            _raise_for(response, "MANIFEST_UNKNOWN", f"{registry}/{repository}:{reference}")
        try:
            return Digest.parse(response.headers.get("Docker-Content-Digest", ""))
        except InvalidDigest:
            return None

    def head_blob(
        self, registry: str, repository: str, digest: str, credentials: Credentials | None
    ) -> int | None:
        """The size of a blob upstream (None if not stated); raises as the upstream answered."""
        response = self.request("HEAD", registry, repository, f"blobs/{digest}", credentials)
        with response:
            _raise_for(response, "BLOB_UNKNOWN", f"{registry}/{repository}@{digest}")
        return parse_length(response.headers.get("Content-Length"))

    def blob(
        self,
        registry: str,
        repository: str,
        digest: str,
        credentials: Credentials | None,
        *,
        byte_range: str | None = None,
    ) -> requests.Response:
        """A streaming GET of a blob (206 when `byte_range` is given and honoured); caller closes it."""
        headers = {"Range": byte_range} if byte_range else {}
        response = self.request(
            "GET", registry, repository, f"blobs/{digest}", credentials, headers=headers, stream=True
        )
        try:
            _raise_for(response, "BLOB_UNKNOWN", f"{registry}/{repository}@{digest}")
        except RegistryError:
            response.close()
            raise
        return response


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    seconds = parse_length(retry_after)  # the delay-seconds form; an HTTP date is not worth parsing
    if seconds is not None:
        return min(float(seconds), MAX_RETRY_AFTER)
    return min(0.1 * 2.0**attempt, MAX_BACKOFF)


def _raise_for(response: requests.Response, unknown: str, name: str) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    if status == 401:
        raise RegistryError(
            "UNAUTHORIZED",
            f"{name}: the upstream requires credentials that may pull this "
            "repository (log in to the proxy with them)",
        )
    if status == 403:
        raise RegistryError("DENIED", f"{name}: the upstream denied access with these credentials")
    if status == 404:
        raise RegistryError(unknown, f"{name} does not exist upstream")
    if status == 429:
        raise RegistryError("TOOMANYREQUESTS", f"{name}: the upstream kept rate-limiting us; retry later")
    if status == 416:
        raise RegistryError("RANGE_INVALID", f"{name}: range not satisfiable upstream", status=416)
    raise UpstreamUnavailable(f"{name}: the upstream answered {status}")


def _read_limited(response: requests.Response, limit: int, name: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(64 << 10):
            total += len(chunk)
            if total > limit:
                raise RegistryError(
                    "MANIFEST_INVALID",
                    f"{name}: manifest over the {limit} byte limit; refusing it",
                    status=502,
                )
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"{name}: the manifest transfer failed: {exc}") from None
    return b"".join(chunks)


def _is_schema1(media_type: str, data: bytes) -> bool:
    """Schema 1 by its media type, or by its body when the upstream gave none or a generic one (old
    registries sent signed schema 1 manifests as `application/json`)."""
    if media_type in SCHEMA1_TYPES:
        return True
    if media_type in MANIFEST_TYPES:
        return False
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("schemaVersion") == 1


def _guess_media_type(data: bytes) -> str:
    """The type a manifest names itself (`mediaType`, always set by Docker schema 2), else OCI's by
    shape (the OCI types make `mediaType` optional)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return OCI_MANIFEST
    if isinstance(doc, dict) and doc.get("mediaType"):
        return str(doc["mediaType"])
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST
