"""The proxy's settings: one frozen value built from flags and `IMAGEWARM_*` variables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imagewarm.config import (
    parse_bytes,
    parse_duration,
    parse_host_port,
    parse_positive_int,
    setting,
)


def _registry(text: str) -> str:
    """An upstream registry host[:port], lower-cased; `docker.io` stays `docker.io` (mapped when fetching)."""
    host = text.strip().lower().removeprefix("https://").removeprefix("http://").rstrip("/")
    if not host or "/" in host or " " in host:
        raise ValueError("expected a registry host such as docker.io, ghcr.io or registry.corp:5000")
    return host


def _optional_bytes(text: str) -> int:
    return parse_bytes(text) if text.strip() not in ("", "0") else 0


def _peer_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or value.rstrip("/").count("/") != 2:
        raise ValueError(f"{value!r}: give a peer proxy as http://HOST:PORT")
    return value.rstrip("/")


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _namespaced_service(value: str) -> tuple[str, str]:
    namespace, sep, service = value.strip().partition("/")
    if not sep or not _DNS_LABEL.fullmatch(namespace) or not _DNS_LABEL.fullmatch(service):
        raise ValueError(
            f"{value!r}: give the peers' Service as NAMESPACE/SERVICE, e.g. imagewarm-system/imagewarm-proxy"
        )
    return namespace, service


@dataclass(frozen=True)
class ProxyConfig:
    cache_dir: Path = setting(help="directory of the content-addressed cache", parse=Path, metavar="DIR")
    listen: tuple[str, int] = setting(
        ("127.0.0.1", 7439), help="address to serve on", parse=parse_host_port, metavar="HOST:PORT"
    )
    upstream: tuple[str, ...] = setting(
        (),
        help="a registry this proxy may fetch from (HTTPS)",
        parse=_registry,
        repeated=True,
        metavar="REGISTRY",
    )
    peer: tuple[str, ...] = setting(
        (),
        help="another node's proxy asked for a blob before the upstream (http://HOST:PORT)",
        parse=_peer_url,
        repeated=True,
        metavar="URL",
    )
    peers_from: tuple[str, str] | None = setting(
        None,
        help="discover peer proxies from this Service's EndpointSlices (with --kubeconfig or in-cluster); "
        "adds to --peer",
        parse=_namespaced_service,
        metavar="NAMESPACE/SERVICE",
    )
    containerd_hosts_dir: str = setting(
        "",
        help="containerd's registry hosts directory (its config_path, e.g. /etc/containerd/certs.d): "
        "write <dir>/<proxy prefix>/hosts.toml listing this proxy, then peers, so pulls fall back to a "
        "peer while this proxy is down",
        metavar="DIR",
    )
    proxy_prefix: str = setting(
        "",
        help="the registry host pods pull from, as the webhook writes it; empty: localhost:<--listen port>",
        metavar="HOST:PORT",
    )
    mirror_registry: tuple[str, ...] = setting(
        (),
        help="mirror mode: also write <--containerd-hosts-dir>/<REGISTRY>/hosts.toml (this proxy, then "
        "peers, then the registry itself), so unrewritten pulls from REGISTRY go through the cache; "
        "REGISTRY must be an --upstream or --insecure-upstream",
        parse=_registry,
        repeated=True,
        metavar="REGISTRY",
    )
    fallback_peers: int = setting(
        3, help="how many peers the runtime may fall back to (--containerd-hosts-dir)", parse=int, metavar="N"
    )
    insecure_upstream: tuple[str, ...] = setting(
        (), help="a registry reached over plain HTTP", parse=_registry, repeated=True, metavar="HOST:PORT"
    )
    tag_ttl: float = setting(
        300.0,
        help="how long a tag's digest is trusted before re-checking upstream",
        parse=parse_duration,
        metavar="DURATION",
    )
    max_cache_bytes: int = setting(
        0,
        help="evict least recently used blobs above this size (0: no limit)",
        parse=_optional_bytes,
        metavar="BYTES",
    )
    node_name: str = setting(
        "",
        help="this node's name: remove its proxy-not-ready taint once serving, and run the node agent "
        "(pull the tasks of the NodeImage of that name through this proxy, report their status)",
    )
    kubeconfig: str = setting("", help="kubeconfig for the node agent (default: in-cluster)", metavar="PATH")
    agent_parallel_pulls: int = setting(
        2, help="node agent: pull tasks run at once on this node", parse=parse_positive_int, metavar="N"
    )
    agent_progress_interval: float = setting(
        10.0,
        help="node agent: least time between two status writes for progress alone (phase changes are "
        "written within --agent-status-delay)",
        parse=parse_duration,
        metavar="DURATION",
    )
    agent_status_delay: float = setting(
        1.0,
        help="node agent: how long phase changes are gathered into one status write",
        parse=parse_duration,
        metavar="DURATION",
    )
    workers: int = setting(4, help="gunicorn worker processes", parse=parse_positive_int)
    connections: int = setting(
        1000, help="open client connections per worker process (a thread each)", parse=parse_positive_int
    )
    connect_timeout: float = setting(
        5.0, help="upstream connect timeout", parse=parse_duration, metavar="DURATION"
    )
    read_timeout: float = setting(
        30.0,
        help="upstream read timeout (a stalled body fails after it)",
        parse=parse_duration,
        metavar="DURATION",
    )
    retries: int = setting(3, help="retries of an upstream 429/5xx/connection error", parse=int)
    access_ttl: float = setting(
        60.0,
        help="how long a private-image access decision is cached",
        parse=parse_duration,
        metavar="DURATION",
    )
    offline_grant_ttl: float = setting(
        86400.0,
        help="while the upstream is unreachable, how long a credential that proved access to a private "
        "repository may still read it from the cache (0: refuse private images offline)",
        parse=parse_duration,
        metavar="DURATION",
    )
    eviction_interval: float = setting(
        30.0,
        help="how often the size limit is enforced and partial files too old to resume are removed",
        parse=parse_duration,
        metavar="DURATION",
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    log_format: str = setting("json", help="json or text")

    def __post_init__(self) -> None:
        if not self.upstream and not self.insecure_upstream:
            raise ValueError(
                "give at least one --upstream REGISTRY (or --insecure-upstream HOST:PORT): "
                "the proxy never fetches from registries it was not told about"
            )
        unknown = [r for r in self.mirror_registry if not self.allowed(r)]
        if unknown:
            raise ValueError(
                f"--mirror-registry {', '.join(unknown)}: mirror only registries this proxy may fetch "
                "from (add them with --upstream or --insecure-upstream)"
            )
        if self.mirror_registry and not self.containerd_hosts_dir:
            raise ValueError("--mirror-registry needs --containerd-hosts-dir (containerd's config_path)")
        if self.retries < 0:
            raise ValueError("--retries must be 0 or more")
        if self.fallback_peers < 0:
            raise ValueError("--fallback-peers must be 0 or more")
        if self.proxy_prefix and not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}", self.proxy_prefix):
            raise ValueError(f"--proxy-prefix {self.proxy_prefix!r}: give HOST:PORT, e.g. localhost:7439")
        if self.log_format not in ("json", "text"):
            raise ValueError("--log-format must be json or text")

    @property
    def runtime_name(self) -> str:
        """The registry host the runtime pulls rewritten images from (`--proxy-prefix`)."""
        return (self.proxy_prefix or f"localhost:{self.listen[1]}").lower()

    @property
    def own_url(self) -> str:
        """This proxy's own HTTP endpoint, for the node agent's pulls (a wildcard address becomes
        loopback)."""
        host, port = self.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def runtime_local_url(self) -> str:
        """How the runtime reaches this proxy in its hosts.toml: empty (the runtime name, e.g.
        localhost:7439) when it listens on a wildcard or loopback address, else its own address."""
        host = self.listen[0]
        if host in ("", "0.0.0.0", "::", "::1", "localhost") or host.startswith("127."):
            return ""
        return self.own_url

    def allowed(self, registry: str) -> bool:
        """Whether `registry` (host[:port], normalised) may be proxied."""
        return registry in self.upstream or registry in self.insecure_upstream

    def scheme(self, registry: str) -> str:
        return "http" if registry in self.insecure_upstream else "https"
