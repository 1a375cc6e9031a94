"""Kubernetes API access for the programs: configuration (in-cluster or a kubeconfig), raw JSON
requests and watches, and typed errors.

Objects stay plain dicts as the API server sends them (programs parse what they need at their edge).
Errors are `KubeError` subclasses that mix in builtins, split into permanent ones (`NotFound`,
`Conflict`, `Invalid`, `Forbidden`...: do not retry blindly) and `Unavailable` (temporary: retry
with backoff).

Requests go through urllib3's connection pools directly: `requests` spent more CPU per request
than the TLS, HTTP and JSON work under it (it reads the whole environment for proxy settings on
every request, merges settings, checks typing protocols), and a controller sends two writes per
node per job (bench/controller_bench.py). The environment's proxy (HTTP(S)_PROXY, NO_PROXY) and CA
bundle variables are read once, when a `Kube` is made, with requests' own rules.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import requests.utils
import urllib3

from imagewarm import __version__
from imagewarm.errors import ImagewarmError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _forget_parents_temp_files() -> None:
    """In a forked child: the kubernetes client wrote a kubeconfig's CA, certificate and key data to
    temporary files for its parent and deletes them at exit; a child (a gunicorn worker) inherits
    that list, and its exit would delete files the parent still uses (the node agent in the master
    then fails every request with "invalid path")."""
    module = sys.modules.get("kubernetes.config.kube_config")
    if module is not None:
        module.__dict__["_temp_files"] = {}  # the library's own list; the child keeps its own


os.register_at_fork(after_in_child=_forget_parents_temp_files)


class KubeError(ImagewarmError):
    """An API request failed; `status` is the HTTP status (0: no answer), `reason` the API's reason."""

    temporary = False

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(KubeError, LookupError):
    pass


class Conflict(KubeError):
    """409: the object changed since it was read (re-read and retry) or already exists."""


class AlreadyExists(Conflict):
    pass


class Gone(KubeError):
    """410: the resourceVersion is too old (relist)."""


class Invalid(KubeError, ValueError):
    pass


class Forbidden(KubeError, PermissionError):
    """401/403: check the credentials and RBAC rules the message names."""


class Unavailable(KubeError, ConnectionError):
    """No answer, a timeout, 429 or a 5xx: temporary, retry with backoff."""

    temporary = True


class ConfigurationError(KubeError):
    """Neither a usable kubeconfig nor an in-cluster service account was found."""


def error_for(status: int, body: bytes | str, what: str) -> KubeError:
    """The typed error for an API answer with a non-2xx `status` and a `Status` object body."""
    try:
        status_obj = json.loads(body)
    except ValueError:
        status_obj = {}
    if not isinstance(status_obj, dict):
        status_obj = {}
    reason = str(status_obj.get("reason") or "")
    message = f"{what}: {status} {status_obj.get('message') or str(body)[:200]}"
    kind: type[KubeError]
    if status == 404:
        kind = NotFound
    elif status == 409:
        kind = AlreadyExists if reason == "AlreadyExists" else Conflict
    elif status == 410:
        kind = Gone
    elif status in (400, 422):
        kind = Invalid
    elif status in (401, 403):
        kind = Forbidden
    elif status == 429 or status >= 500:
        kind = Unavailable
    else:
        kind = KubeError
    return kind(message, status=status, reason=reason)


def request_verb(method: str, path: str) -> str:
    """The Kubernetes verb of a request: get or list for a GET (a collection path is a list),
    create, update, patch or delete otherwise (watches are counted as ``watch`` by `Kube.watch`)."""
    method = method.upper()
    if method != "GET":
        return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method)
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    # /api/v1/... or /apis/<group>/<version>/...
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    return "list" if len(rest) == 1 else "get"


# Called after every request with (verb, HTTP status; 0 when no answer came).
Observer = Callable[[str, int], None]


# What may go wrong on the way (no answer, a dropped or reset connection, TLS, a timeout).
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)
USER_AGENT = f"imagewarm/{__version__}"


@dataclass
class Kube:
    """A connection to one API server. Thread-safe (urllib3 pools, up to `connections` kept open).

    `observer`, when set, is told the verb and status of every request (the programs' metrics)."""

    server: str
    verify: str | bool = True
    cert: tuple[str, str] | None = None
    token: Callable[[], str] | None = None
    timeout: float = 30.0
    observer: Observer | None = field(default=None, repr=False)
    connections: int = 32  # more than the controller's workers and watches together
    http: urllib3.PoolManager = field(init=False, repr=False)
    _direct: urllib3.HTTPConnectionPool | None = field(init=False, repr=False)
    _prefix: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.verify is True:  # requests' rule: the variables, else certifi's bundle
            self.verify = (
                os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or requests.utils.DEFAULT_CA_BUNDLE_PATH
            )
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED" if self.verify else "CERT_NONE"}
        if isinstance(self.verify, str):
            tls["ca_cert_dir" if os.path.isdir(self.verify) else "ca_certs"] = self.verify
        if self.cert is not None:
            tls["cert_file"], tls["key_file"] = self.cert
        pool = {"maxsize": self.connections, "block": False, **tls}
        proxies = requests.utils.get_environ_proxies(self.server)  # {} when NO_PROXY names it
        proxy = proxies.get(urlsplit(self.server).scheme) or proxies.get("all")
        if proxy:
            parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            headers = {}
            if parts.username:
                login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers["Proxy-Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
            address = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            self.http = urllib3.ProxyManager(address, proxy_headers=headers, **pool)
            self._direct = None
        else:
            self.http = urllib3.PoolManager(**pool)
            # The API server's own pool, used without the manager's URL parsing and pool lookup
            # on every request (a sixth of a write's client CPU).
            self._direct = self.http.connection_from_url(self.server)
        self._prefix = urlsplit(self.server).path.rstrip("/")  # a server URL may have a path

    # Construction -------------------------------------------------------------------------------

    @classmethod
    def load(cls, kubeconfig: str | os.PathLike[str] | None = None) -> Kube:
        """From `kubeconfig` when given, else in-cluster when running in a pod, else $KUBECONFIG or
        ~/.kube/config. Raises ConfigurationError saying what was tried."""
        if kubeconfig:
            return cls.from_kubeconfig(kubeconfig)
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
            return cls.in_cluster()
        default = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        if Path(default).exists():
            return cls.from_kubeconfig(default)
        raise ConfigurationError(
            "no Kubernetes configuration: pass --kubeconfig PATH, set KUBECONFIG, "
            "or run in a pod with a service account"
        )

    @classmethod
    def in_cluster(cls) -> Kube:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        token_file = SERVICE_ACCOUNT_DIR / "token"
        # Bound tokens rotate: read the file again on every request (it is small and cached by the OS).
        return cls(
            server=f"https://{host}:{port}",
            verify=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            token=lambda: token_file.read_text().strip(),
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str]) -> Kube:
        from kubernetes import config as kconfig
        from kubernetes.client import Configuration

        configuration = Configuration()
        try:
            kconfig.load_kube_config(config_file=str(path), client_configuration=configuration)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the library raises several types for one cause: a bad file
            raise ConfigurationError(f"cannot use kubeconfig {path}: {exc}") from None
        return cls.from_configuration(configuration)

    @classmethod
    def from_configuration(cls, configuration: Any) -> Kube:
        """From a `kubernetes.client.Configuration` (e.g. `ApiClient().configuration`)."""
        verify: str | bool = configuration.ssl_ca_cert or bool(configuration.verify_ssl)
        cert = (configuration.cert_file, configuration.key_file) if configuration.cert_file else None
        api_key = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get(
            "BearerToken"
        )
        token = None
        if api_key:
            value = str(api_key).removeprefix("Bearer ").strip()
            token = lambda: value  # noqa: E731
        return cls(server=configuration.host.rstrip("/"), verify=verify, cert=cert, token=token)

    # Requests -----------------------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token()}"
        return headers

    def _send(self, method: str, path: str, params: dict[str, Any] | None, **options: Any) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = path + (("&" if "?" in path else "?") + urlencode(query) if query else "")
        options.update(retries=False, redirect=False)
        if self._direct is not None:
            return self._direct.urlopen(method, self._prefix + target, **options)
        return self.http.request(method, self.server + target, **options)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request; the decoded JSON answer. Raises the typed KubeError for a non-2xx answer."""
        what = f"{method} {path}"
        seconds = timeout or self.timeout
        try:
            response = self._send(
                method,
                path,
                params,
                body=json.dumps(body).encode() if body is not None else None,
                headers=self._headers(content_type if body is not None else None),
                timeout=urllib3.Timeout(connect=seconds, read=seconds),
            )
        except _TRANSPORT_ERRORS as exc:
            self._observe(request_verb(method, path), 0)
            raise Unavailable(f"{what}: no answer from {self.server}: {exc}") from None
        self._observe(request_verb(method, path), response.status)
        if response.status >= 300:
            raise error_for(response.status, response.data, what)
        return json.loads(response.data) if response.data else {}

    def _observe(self, verb: str, status: int) -> None:
        if self.observer is not None:
            self.observer(verb, status)

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body=body)

    def patch(self, path: str, body: Any, *, kind: str = "merge") -> dict[str, Any]:
        """`kind`: json (RFC 6902 ops), merge (RFC 7386) or strategic."""
        types = {
            "json": "application/json-patch+json",
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }
        return self.request("PATCH", path, body=body, content_type=types[kind])

    def delete(self, path: str) -> dict[str, Any]:
        return self.request("DELETE", path)

    def watch(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_seconds: int = 300,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Watch events (`{"type", "object"}`) from `resource_version` until the server ends the watch
        (after about `timeout_seconds`) or the connection drops (Unavailable). An ERROR event is
        raised as its typed error (Gone for 410)."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
            **(params or {}),
        }
        what = f"WATCH {path}"
        try:
            response = self._send(
                "GET",
                path,
                query,
                headers=self._headers(),
                timeout=urllib3.Timeout(connect=self.timeout, read=timeout_seconds + 30),
                preload_content=False,
            )
        except _TRANSPORT_ERRORS as exc:
            self._observe("watch", 0)
            raise Unavailable(f"{what}: no answer from {self.server}: {exc}") from None
        self._observe("watch", response.status)
        finished = False
        try:
            if response.status >= 300:
                raise error_for(response.status, response.read(), what)
            try:
                pending = b""
                for chunk in _chunks(response):  # one event per line, split over chunks or not
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if line.strip():
                            yield self._event(line, what)
                if pending.strip():
                    yield self._event(pending, what)
                finished = True
            except KubeError:  # an ERROR event (some are OSErrors or ValueErrors too)
                raise
            except (*_TRANSPORT_ERRORS, ValueError) as exc:
                raise Unavailable(f"{what}: watch interrupted: {exc}") from None
        finally:
            if not finished:  # left mid-stream: the connection holds unread events, never reuse it
                response.close()
            response.release_conn()

    @staticmethod
    def _event(line: bytes, what: str) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(line)
        if event.get("type") == "ERROR":
            status = event.get("object") or {}
            raise error_for(int(status.get("code") or 500), json.dumps(status), what)
        return event


def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The body as it arrives: each HTTP chunk whole (a watch is chunked), else what one read gets."""
    if response.chunked:
        yield from response.read_chunked()
        return
    while chunk := response.read1(65536):
        yield chunk


def retry(call: Callable[[], Any], *, attempts: int = 5, delay: float = 0.5) -> Any:
    """`call()`, retried with exponential backoff while it raises a temporary KubeError."""
    for attempt in range(attempts):
        try:
            return call()
        except KubeError as exc:
            if not exc.temporary or attempt == attempts - 1:
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")
