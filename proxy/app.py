"""`create_app(config)`: the proxy's Flask application (the pull side of the OCI distribution API)."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from imagewarm.config import ConfigError
from imagewarm.kube import ConfigurationError, Kube
from imagewarm.metrics import exposition
from imagewarm.reference import registry_endpoint
from proxy import metrics, routes
from proxy.blobs import Blobs
from proxy.cache.manifest_store import ManifestStore
from proxy.cache.store import BlobStore
from proxy.cache.tags import TagIndex
from proxy.config import ProxyConfig
from proxy.errors import RegistryError
from proxy.manifests import Manifests
from proxy.peers.discovery import PeerDiscovery
from proxy.peers.fallback import RuntimeHosts
from proxy.peers.lookup import Peers
from proxy.routes import Kind
from proxy.tee import Tee
from proxy.upstream.access import AccessControl
from proxy.upstream.auth import credentials_from_header
from proxy.upstream.registry import Upstream

log = logging.getLogger("imagewarm.proxy")


class Proxy:
    """Everything a request needs, built once per process tree (before gunicorn forks)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        config.cache_dir.mkdir(parents=True, exist_ok=True)
        self.store = BlobStore(config.cache_dir)
        self._last_problem: str | None = None
        self.upstream = Upstream(config)
        self.access = AccessControl(config.cache_dir, config.access_ttl, config.offline_grant_ttl)
        tags = TagIndex(config.cache_dir)
        self.manifests = Manifests(
            self.upstream, ManifestStore(config.cache_dir), tags, self.access, config.tag_ttl
        )
        self.discovery = _discovery(config)
        peers = Peers(self._peer_urls) if config.peer or self.discovery is not None else None
        self.blobs = Blobs(self.store, Tee(self.upstream, self.access, peers))
        host, port = config.listen
        self.own_hosts = frozenset(
            {f"localhost:{port}", f"127.0.0.1:{port}", f"{host}:{port}".lower(), config.runtime_name}
        )
        self.runtime_hosts = _runtime_hosts(config)
        if self.discovery is not None:
            self.discovery.on_change = lambda _urls: self.write_runtime_hosts()

    def readiness_problem(self) -> str | None:
        """Why this proxy cannot serve now (None when it can); logged when it changes, per worker."""
        problem = self.store.problem()
        if problem != self._last_problem:
            if problem is None:
                log.info("ready again: the cache directory is usable")
            else:
                log.warning("not ready", extra={"reason": problem, "cache_dir": str(self.config.cache_dir)})
            self._last_problem = problem
        return problem

    def write_runtime_hosts(self) -> None:
        """The runtime's hosts.toml files (`--containerd-hosts-dir`: the proxy prefix's, and each
        `--mirror-registry`'s) with the peers known now."""
        peers = self._peer_urls()
        for hosts in self.runtime_hosts:
            hosts.write(peers)

    def _peer_urls(self) -> tuple[str, ...]:
        discovered = self.discovery.urls() if self.discovery is not None else ()
        return tuple(dict.fromkeys(self.config.peer + discovered))  # --peer first, each once

    def handle(self, path: str) -> Response:
        head = request.method == "HEAD"
        try:
            target = routes.parse(path, request.args.get("ns"), self.own_hosts)
            g.route = target.kind.value
            credentials = credentials_from_header(request.headers.get("Authorization"))
            if target.kind is Kind.BASE:
                return self._base(credentials is not None or "Authorization" in request.headers)
            if not self.config.allowed(target.registry):
                raise RegistryError(
                    "DENIED",
                    f"registry {target.registry} is not an upstream of this proxy "
                    "(add it with --upstream, or --insecure-upstream for plain HTTP)",
                )
            if target.kind is Kind.MANIFEST:
                return self.manifests.serve(target, credentials, request.headers.getlist("Accept"))
            return self.blobs.serve(target, credentials, head)
        except RegistryError as exc:
            if exc.status >= 500:
                log.warning("request failed", extra={"path": path, "code": exc.code, "error": exc.message})
            return exc.response(head=head)

    @staticmethod
    def _base(authenticated: bool) -> Response:
        # Like an authenticating registry: clients that hold credentials learn to send them (Basic);
        # any Authorization, even empty, is enough here: access is decided per repository.
        if not authenticated:
            return RegistryError(
                "UNAUTHORIZED", "send credentials (or empty Basic for anonymous pulls)"
            ).response(head=request.method == "HEAD")
        return Response(
            "{}", mimetype="application/json", headers={"Docker-Distribution-API-Version": "registry/2.0"}
        )


def _runtime_hosts(config: ProxyConfig) -> list[RuntimeHosts]:
    if not config.containerd_hosts_dir:
        return []
    directory = Path(config.containerd_hosts_dir)
    host, port = config.listen
    owner = config.node_name or f"{host}:{port}"
    own = config.runtime_local_url or f"http://{config.runtime_name}"  # as the runtime reaches it
    prefix = RuntimeHosts(directory, config.runtime_name, owner, config.fallback_peers, local_url=own)
    mirrors = [
        RuntimeHosts(
            directory,
            registry,
            owner,
            config.fallback_peers,
            local_url=own,
            server=f"{config.scheme(registry)}://{registry_endpoint(registry)}",
        )
        for registry in config.mirror_registry
    ]
    return [prefix, *mirrors]


def _discovery(config: ProxyConfig) -> PeerDiscovery | None:
    """Peer discovery for `--peers-from`, not started (see `proxy.serve`); the kubeconfig is loaded now
    so a bad one stops the proxy at start. Raises ConfigError saying what to give."""
    if config.peers_from is None:
        return None
    namespace, service = config.peers_from
    try:
        kube = Kube.load(config.kubeconfig or None)
    except ConfigurationError as exc:
        raise ConfigError(
            f"--peers-from needs the Kubernetes API: {exc} (give --kubeconfig PATH, or run in a pod)"
        ) from None
    return PeerDiscovery(
        kube,
        namespace,
        service,
        own_node=config.node_name,
        own_address=config.listen,
        static=config.peer,
    )


def unexpected_error(exc: Exception) -> Response | HTTPException:
    """The answer to an exception no code path expected: OCI error JSON (500 UNKNOWN), never Flask's
    HTML page, and the traceback in the log. HTTP errors of routing (404, 405) keep their own answer."""
    if isinstance(exc, HTTPException):
        return exc
    log.error(
        "request failed unexpectedly",
        exc_info=exc,
        extra={"method": request.method, "path": request.path, "error": f"{type(exc).__name__}: {exc}"},
    )
    return RegistryError(
        "UNKNOWN",
        "the proxy failed unexpectedly serving this request: retry it; if it keeps failing, the proxy's "
        f"log has the traceback (search for {request.path})",
        status=500,
        detail={"exception": type(exc).__name__},
    ).response(head=request.method == "HEAD")


def create_app(config: ProxyConfig) -> Flask:
    proxy = Proxy(config)
    app = Flask("imagewarm.proxy")
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.extensions["imagewarm.proxy"] = proxy
    app.register_error_handler(Exception, unexpected_error)

    @app.route("/v2", methods=["GET", "HEAD"])
    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2/<path:_rest>", methods=["GET", "HEAD"])
    def v2(_rest: str = "") -> Response:
        return proxy.handle(request.path)

    @app.route("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.route("/readyz")
    def readyz() -> Response:
        # Answered by a worker, so a 200 also says the workers are up (the taint removal asks it).
        problem = proxy.readiness_problem()
        if problem is not None:
            return Response(f"not ready: {problem}\n", status=503, mimetype="text/plain")
        return Response("ready\n", mimetype="text/plain")

    @app.route("/metrics")
    def prometheus() -> Response:
        metrics.CACHE_BYTES.set(proxy.store.total_bytes())
        body, content_type = exposition()
        return Response(body, content_type=content_type)

    @app.after_request
    def count(response: Response) -> Response:
        metrics.REQUESTS.labels(
            route=g.get("route", "other"), method=request.method, status=str(response.status_code)
        ).inc()
        return response

    return app
