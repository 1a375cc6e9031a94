"""The container runtime's fallback to peer proxies when this node's proxy is down.

Rewritten pods pull `localhost:7439/<registry>/<repository>`. If this node's proxy is down (crashed,
restarting, being upgraded), those pulls would fail with ErrImagePull until it is back. containerd
reads `<config_path>/<host>/hosts.toml` on every pull and tries its hosts in order, so the proxy
writes one for the name pods pull from (`--proxy-prefix`): itself first, then a few peer proxies.
The file stays when the proxy stops, which is when it matters. A peer answers such requests in
rewrite mode, because containerd names the host it resolved (`?ns=localhost:7439`), and that name is
every proxy's own.

Mirror mode (`--mirror-registry`): the proxy also writes `<config_path>/<registry>/hosts.toml` for
each mirrored upstream registry: itself, then peers, then the registry itself as `server`, so pods
pulling `registry/repo:tag` unchanged go through the cache and fall back to the registry by
themselves. Such requests arrive as `/v2/<repository>/...?ns=<registry>`.

Each node lists a different few peers (rendezvous hashing of the peers against the node's own
name), so one node's outage spreads over the others instead of landing on the first peer in sorted
order, and a change in the peer set moves few nodes' choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from imagewarm import containerd_hosts
from proxy import metrics

log = logging.getLogger("imagewarm.proxy.fallback")

HEADER = (
    "Written by imagewarm proxy: pulls of {name} try this node's proxy, then peer proxies{last}.\n"
    "Rewritten whenever the peer set changes; edits are overwritten."
)


def choose(peers: Iterable[str], owner: str, limit: int) -> list[str]:
    """Up to `limit` of `peers`, ranked by a hash of (owner, peer): stable for one owner, different
    across owners."""
    unique = set(peers)
    return sorted(unique, key=lambda url: hashlib.sha256(f"{owner}\n{url}".encode()).digest())[:limit]


def fallback_hosts(local_url: str, peers: Iterable[str], owner: str, limit: int) -> list[str]:
    """The hosts the runtime tries, in order: this proxy, then up to `limit` peers."""
    return [local_url, *choose((url for url in peers if url != local_url), owner, limit)]


def render(name: str, hosts: list[str], server: str | None = None) -> str:
    """The hosts.toml for pulls of `name`: `hosts` in order, then `server` (default: the first host,
    this proxy; a mirrored registry's own URL in mirror mode)."""
    last = f", then {server} itself" if server else ""
    return containerd_hosts.render(server or hosts[0], hosts, header=HEADER.format(name=name, last=last))


class RuntimeHosts:
    """`<directory>/<name>/hosts.toml`, rewritten (atomically, only when it changes) by `write`.
    Safe to call from several threads and processes: every writer renames a complete file."""

    def __init__(
        self,
        directory: Path,
        name: str,
        owner: str,
        limit: int,
        *,
        local_url: str = "",
        server: str | None = None,
    ) -> None:
        """`local_url`: how the runtime reaches this proxy (default `http://<name>`); `server`: the
        host tried last (default: this proxy; in mirror mode the registry `name` itself)."""
        self.path = Path(directory) / name / "hosts.toml"
        self.name = name
        self.local_url = local_url or f"http://{name}"
        self.server = server
        self.owner = owner
        self.limit = limit
        self._lock = threading.Lock()

    def write(self, peers: Iterable[str]) -> bool:
        """Returns True when the file changed. Never raises: a failure is logged with what to do."""
        hosts = fallback_hosts(self.local_url, peers, self.owner, self.limit)
        text = render(self.name, hosts, self.server)
        with self._lock:
            try:
                if self.path.read_text() == text:
                    metrics.RUNTIME_FALLBACK_PEERS.set(len(hosts) - 1)
                    return False
            except OSError:
                pass  # absent or unreadable: (re)write it
            temporary = self.path.with_name(f".hosts.toml.{os.getpid()}.{threading.get_ident()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary.write_text(text)
                os.replace(temporary, self.path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)
                metrics.RUNTIME_HOSTS_WRITE_FAILURES.inc()
                log.error(
                    "cannot write the runtime's hosts.toml: pulls will not fall back to peers when this "
                    "proxy is down; mount containerd's config_path (e.g. /etc/containerd/certs.d) "
                    "writable at --containerd-hosts-dir",
                    extra={"path": str(self.path), "error": str(exc)},
                )
                return False
        metrics.RUNTIME_FALLBACK_PEERS.set(len(hosts) - 1)
        log.info("runtime fallback written", extra={"path": str(self.path), "hosts": hosts})
        return True
