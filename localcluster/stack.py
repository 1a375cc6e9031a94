"""imagewarm running on the local cluster: the node proxy and the webhook, as host processes.

The local nodes share the host's network, so one proxy on 127.0.0.1:<port> is every node's
`localhost:<port>`; the webhook listens on node 1's bridge address behind a selector-less Service
(HARNESS.md §7) and registers itself with the configuration `imagewarm webhook
--print-configuration` gives. Both run through the real `imagewarm` command, as users run them.
Used by `imagewarm demo` and the end-to-end tests.

With `peer`, a second proxy (another node's DaemonSet pod, in a real cluster) listens on 127.0.0.2
with the node proxy's port, and the node proxy lists it in the nodes' hosts.toml: pulls fall back to
it while the node proxy is down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagewarm.errors import ImagewarmError
from localcluster import scrape
from localcluster.cluster import Cluster
from localcluster.processes import Daemon, free_port_on, free_ports
from localcluster.registry import Registry

NAMESPACE = "imagewarm-system"
WEBHOOK_SERVICE = "imagewarm-webhook"
WEBHOOK_CONFIGURATION = "imagewarm"
PEER_IP = "127.0.0.2"  # loopback, like 127.0.0.1: every local node reaches it

Progress = Callable[[str], None]


class StackError(ImagewarmError, RuntimeError):
    """A program of the stack did not start; the message carries its log tail."""


def _imagewarm(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagewarm", *args]


def _env() -> dict[str, str]:
    # Flags decide here, not whatever IMAGEWARM_* the caller's shell has.
    return {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEWARM_", "PROMETHEUS_"))}


@dataclass
class Stack:
    cluster: Cluster
    workdir: Path
    proxy_port: int
    proxy: Daemon
    webhook: Daemon | None = None
    peer: Daemon | None = None
    webhook_address: tuple[str, int] | None = None
    progress: Progress = print
    _stopped: bool = field(default=False, repr=False)

    @property
    def proxy_prefix(self) -> str:
        return f"localhost:{self.proxy_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{PEER_IP}:{self.proxy_port}"

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        upstreams: list[Registry],
        *,
        workdir: Path,
        proxy_port: int | None = None,
        webhook: bool = True,
        proxy_args: list[str] | None = None,
        progress: Progress = print,
        peer: bool = False,
    ) -> Stack:
        """Start the proxy (allowed to fetch from `upstreams`, plain HTTP) and, with `webhook`, the
        webhook registered with the cluster; with `peer`, first a peer proxy on PEER_IP (same port,
        same upstreams, its own cache), given to the proxy as `--peer`. Returns when all serve and the
        webhook's caBundle is in place. Raises StackError with the failing program's log tail."""
        workdir.mkdir(parents=True, exist_ok=True)
        port = proxy_port or (free_port_on("127.0.0.1", PEER_IP) if peer else free_ports(1)[0])
        insecure = [arg for registry in upstreams for arg in ("--insecure-upstream", registry.host)]
        argv = _imagewarm("proxy", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(workdir / "cache"))
        argv += insecure
        # The proxy writes the runtime's hosts.toml for localhost:<port> itself (plain HTTP, then any
        # peers), as the DaemonSet does with containerd's config_path mounted.
        certs_dir = cluster.nodes[0].containerd.certs_dir
        argv += ["--containerd-hosts-dir", str(certs_dir), "--proxy-prefix", f"localhost:{port}"]
        share_hosts_entry(cluster, f"localhost:{port}")
        if peer:
            argv += ["--peer", f"http://{PEER_IP}:{port}"]
        argv += ["--workers", "2", "--log-format", "json", *(proxy_args or [])]
        env = {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(_fresh_dir(workdir / "proxy-metrics"))}
        proxy = Daemon("imagewarm-proxy", argv, workdir / "proxy.log", env=env)
        stack = cls(cluster, workdir, port, proxy, progress=progress)
        try:
            if peer:
                stack._start_peer(insecure)
            progress(f"starting the node proxy on 127.0.0.1:{port}")
            proxy.start()
            _wait(proxy, lambda: proxy.wait_http(f"{stack.proxy_url}/readyz", timeout=30))
            if webhook:
                stack._start_webhook()
        except BaseException:
            stack.stop()
            raise
        return stack

    @classmethod
    def webhook_only(
        cls, cluster: Cluster, *, workdir: Path, proxy_port: int, progress: Progress = print
    ) -> Stack:
        """Only the webhook, rewriting images to `localhost:<proxy_port>`, for node proxies started
        elsewhere (localcluster.nodeproxies: one per node, as the chart's DaemonSet). Raises
        StackError."""
        workdir.mkdir(parents=True, exist_ok=True)
        unused = Daemon("imagewarm-proxy (not started here)", ["true"], workdir / "proxy.log")
        stack = cls(cluster, workdir, proxy_port, unused, progress=progress)
        try:
            stack._start_webhook()
        except BaseException:
            stack.stop()
            raise
        return stack

    def _start_peer(self, insecure: list[str]) -> None:
        # No --containerd-hosts-dir: the local nodes share one hosts directory, and the file for
        # localhost:<port> is the node proxy's to write.
        argv = _imagewarm(
            "proxy", "--listen", f"{PEER_IP}:{self.proxy_port}",
            "--cache-dir", str(self.workdir / "peer-cache"), *insecure,
            "--workers", "1", "--log-format", "json",
        )  # fmt: skip
        env = {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(_fresh_dir(self.workdir / "peer-metrics"))}
        self.progress(f"starting a peer proxy on {PEER_IP}:{self.proxy_port}")
        self.peer = Daemon("imagewarm-peer-proxy", argv, self.workdir / "peer.log", env=env).start()
        peer = self.peer
        _wait(peer, lambda: peer.wait_http(f"{self.peer_url}/readyz", timeout=30))

    def restart_proxy(self) -> None:
        """Start the node proxy again after `proxy.stop()` and wait until it is ready. Its metrics
        start from zero (the proxy empties its metrics directory at start). Raises StackError."""
        self.progress(f"restarting the node proxy on 127.0.0.1:{self.proxy_port}")
        self.proxy.start()
        _wait(self.proxy, lambda: self.proxy.wait_http(f"{self.proxy_url}/readyz", timeout=30))

    def _start_webhook(self) -> None:
        ip = self.cluster.nodes[0].ip
        port = free_ports(1, host=ip)[0]
        self.webhook_address = (ip, port)
        flags = [
            "--namespace", NAMESPACE, "--service-name", WEBHOOK_SERVICE,
            "--webhook-config-name", WEBHOOK_CONFIGURATION, "--proxy-prefix", self.proxy_prefix,
        ]  # fmt: skip
        configuration = json.loads(
            _run(_imagewarm("webhook", *flags, "--print-configuration"), self.workdir / "webhook.log")
        )
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE},
            "spec": {"ports": [{"port": 443, "targetPort": port}]},
        }
        endpoints = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE},
            "subsets": [{"addresses": [{"ip": ip}], "ports": [{"port": port}]}],
        }
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        objects = {"apiVersion": "v1", "kind": "List", "items": [service, endpoints, configuration]}
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(objects))
        self.progress(f"starting the webhook on {ip}:{port} (self-managed TLS)")
        argv = _imagewarm(
            "webhook", *flags, "--listen", f"{ip}:{port}", "--kubeconfig", str(self.cluster.kubeconfig),
            "--sidecarsets", "false", "--log-format", "json",
        )  # fmt: skip
        env = {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(_fresh_dir(self.workdir / "webhook-metrics"))}
        self.webhook = Daemon("imagewarm-webhook", argv, self.workdir / "webhook.log", env=env).start()
        webhook = self.webhook
        _wait(webhook, lambda: webhook.wait_port(port, host=ip, timeout=60))
        _wait(webhook, lambda: self._wait_ca_bundle(60))

    def _wait_ca_bundle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cluster.kubectl(
                "get", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "-o", "json", check=False
            ).stdout
            if out and all(w["clientConfig"].get("caBundle") for w in json.loads(out)["webhooks"]):
                return
            time.sleep(0.3)
        raise TimeoutError("the webhook did not patch its caBundle into the MutatingWebhookConfiguration")

    def proxy_metric(self, name: str, **labels: str) -> float:
        """The sum of the proxy's samples of metric `name` whose labels include `labels`."""
        return scrape.metric(self.proxy_url, name, **labels)

    def peer_metric(self, name: str, **labels: str) -> float:
        """As proxy_metric, for the peer proxy (started with `peer=True`)."""
        return scrape.metric(self.peer_url, name, **labels)

    def stop(self) -> None:
        """Stop the programs and unregister the webhook (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self.webhook is not None:
            self.cluster.kubectl(
                "delete", "mutatingwebhookconfiguration", WEBHOOK_CONFIGURATION, "--ignore-not-found",
                check=False,
            )  # fmt: skip
            self.webhook.stop()
        self.proxy.stop()
        if self.peer is not None:
            self.peer.stop()


def share_hosts_entry(cluster: Cluster, name: str) -> None:
    """Make every node read node 1's ``hosts.toml`` for ``name``: this stack's one proxy serves all
    local nodes (they share the host's network), and it writes only node 1's hosts directory."""
    target = cluster.nodes[0].containerd.certs_dir / name
    target.mkdir(parents=True, exist_ok=True)
    for node in cluster.nodes[1:]:
        link = node.containerd.certs_dir / name
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)


def _wait(daemon: Daemon, wait: Callable[[], object]) -> None:
    try:
        wait()
    except Exception as exc:
        raise StackError(f"{daemon.name} did not start: {exc}\n{daemon.log_tail(40)}") from exc


def _run(argv: list[str], log: Path) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60)
    if proc.returncode != 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
        raise StackError(f"`{' '.join(argv[2:])}` failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        for child in path.iterdir():
            child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
