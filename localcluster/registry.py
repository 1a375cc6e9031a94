"""Real OCI registries for tests and benchmarks: Debian's ``docker-registry`` (distribution 2.8).

``start_registry(workdir)`` gives a running registry on a loopback port with its own storage and
log; ``Registry.requests()`` reads its access log so tests can assert what was fetched, and
``stop()``/``start()`` restart it on the same port with the same content.

``start_registry(workdir, token=True)`` runs it with ``auth.token``: distribution only *verifies*
bearer tokens, so our own ``TokenServer`` (localcluster.tokenserver) issues them, started
and stopped with the registry.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcluster.processes import Daemon, MissingTool, free_ports
from localcluster.tokenserver import TokenServer

REGISTRY_BINARY = "docker-registry"

# Apache combined log line written by the registry's access logger:
#   127.0.0.1 - - [23/Nov/2026:18:29:16 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(r'\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass
class Registry:
    """A ``docker-registry`` process and its storage under ``workdir``.

    ``username``/``password`` are set when it requires htpasswd basic auth or bearer tokens (then
    ``token_server`` issues them, and runs while the registry does); ``proxy_remote_url`` when it
    is a pull-through cache of another registry.
    """

    workdir: Path
    port: int
    username: str | None = None
    password: str | None = None
    proxy_remote_url: str | None = None
    token_server: TokenServer | None = None
    daemon: Daemon = field(init=False)

    def __post_init__(self) -> None:
        self.daemon = Daemon(
            f"registry:{self.port}",
            [REGISTRY_BINARY, "serve", self.config_path],
            self.log_path,
        )

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(username, password)`` for ``requests``, or None for an open registry."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def running(self) -> bool:
        return self.daemon.running

    def start(self, timeout: float = 30) -> Registry:
        """Start (or restart) on the same port and storage; returns once ``/v2/`` answers."""
        if self.token_server is not None:
            self.token_server.start()
        self.daemon.start()
        # The log line first: another process holding the port would answer /v2/ for us.
        self.daemon.wait_log(f"listening on {self.host}", timeout)
        self.daemon.wait_http(f"{self.url}/v2/", timeout)
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop the process (and its token server); storage and log stay for a later ``start()``."""
        self.daemon.stop(timeout)
        if self.token_server is not None:
            self.token_server.stop()

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request served since the registry was first started, oldest first.

        Tuples are ``(method, path, status)``; ``path`` includes the query string. Take
        ``len(registry.requests())`` before an action to look only at what it caused.
        """
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            match = _ACCESS_LINE.search(line)
            if match:
                found.append((match["method"], match["path"], int(match["status"])))
        return found

    def blob_gets(self, repository: str = "", *, digest: str = "", since: int = 0) -> list[str]:
        """The digests of the blobs this registry served (GET, 200) after its first `since` requests,
        oldest first: of `repository` and of `digest` when given."""
        served = []
        for method, path, status in self.requests()[since:]:
            name, sep, served_digest = path.partition("?")[0].removeprefix("/v2/").rpartition("/blobs/")
            if method != "GET" or status != 200 or not sep:
                continue
            if (repository and name != repository) or (digest and served_digest != digest):
                continue
            served.append(served_digest)
        return served

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry (distribution accepts only bcrypt)."""
    if shutil.which("htpasswd") is None:
        raise MissingTool("htpasswd not found: install the Debian package apache2-utils")
    result = subprocess.run(
        ["htpasswd", "-Bbn", username, password], capture_output=True, text=True, check=True
    )
    return result.stdout.strip() + "\n"


def _token_auth(registry: Registry, server: TokenServer) -> dict[str, Any]:
    """distribution's ``auth.token`` section trusting ``server``'s signing CA."""
    bundle = server.write_root_bundle(registry.workdir / "token-root.pem")
    return {
        "token": {
            "realm": server.realm,
            "service": server.service,
            "issuer": server.issuer,
            "rootcertbundle": str(bundle),
        }
    }


def _config(
    registry: Registry, htpasswd: Path | None, proxy_username: str | None, proxy_password: str | None
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(registry.storage_dir)},
            "delete": {"enabled": True},
        },
        "http": {
            "addr": registry.host,
            # Fixed secret: an upload started before a restart can still be finished after it.
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "imagewarm-test", "path": str(htpasswd)}}
    if registry.token_server is not None:
        config["auth"] = _token_auth(registry, registry.token_server)
    if registry.proxy_remote_url is not None:
        proxy: dict[str, str] = {"remoteurl": registry.proxy_remote_url}
        if proxy_username is not None:
            proxy["username"] = proxy_username
        if proxy_password is not None:
            proxy["password"] = proxy_password
        config["proxy"] = proxy
    return config


def start_registry(
    workdir: Path,
    *,
    auth: bool = False,
    proxy_remote_url: str | None = None,
    proxy_username: str | None = None,
    proxy_password: str | None = None,
    port: int | None = None,
    timeout: float = 30,
    token: bool = False,
) -> Registry:
    """Start a registry storing under ``workdir`` (created) and return it once it serves.

    ``auth``: require htpasswd basic auth with a generated ``username``/``password``.
    ``token``: require bearer tokens (``auth.token``) from a ``TokenServer`` started alongside
    (``registry.token_server``): ``username``/``password`` may push and pull anything, anonymous
    clients may pull repositories under ``public/`` only.
    ``proxy_remote_url``: run as a pull-through cache of that registry (pushes are then refused),
    with ``proxy_username``/``proxy_password`` as upstream credentials. distribution 2.8 sends
    those only to bearer-token upstreams, not to basic-auth ones (distribution/distribution#3153),
    so a pull-through cache of an ``auth=True`` registry answers 500 "authentication required".
    Raises ``DaemonError`` with the log tail if it does not come up.
    """
    if shutil.which(REGISTRY_BINARY) is None:
        raise MissingTool(f"{REGISTRY_BINARY} not found: install the Debian package docker-registry")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    registry = Registry(
        workdir=workdir,
        port=port if port is not None else free_ports(1)[0],
        proxy_remote_url=proxy_remote_url,
    )
    if auth and token:
        raise ValueError("choose one of auth=True (htpasswd basic auth) and token=True (bearer tokens)")
    htpasswd = None
    if token:
        registry.username = "iw-user"
        registry.password = secrets.token_urlsafe(12)
        registry.token_server = TokenServer(
            service=f"imagewarm-test-registry-{registry.port}", users={registry.username: registry.password}
        ).start()
    if auth:
        registry.username = "iw-user"
        registry.password = secrets.token_urlsafe(12)
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(_htpasswd_line(registry.username, registry.password))
    registry.storage_dir.mkdir(exist_ok=True)
    config = _config(registry, htpasswd, proxy_username, proxy_password)
    # JSON is YAML: no YAML library needed at run time.
    registry.config_path.write_text(json.dumps(config, indent=2))
    try:
        return registry.start(timeout)
    except BaseException:
        if registry.token_server is not None:
            registry.token_server.stop()
        raise
