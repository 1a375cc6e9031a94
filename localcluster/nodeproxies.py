"""One `imagewarm proxy` per node, each with its node agent, as the chart's DaemonSet runs them.

Real nodes (with a kubelet): the proxy listens on the node's address (`10.244.<i>.1:<port>`, the
same port on every node, as a DaemonSet's hostPort), runs `--node-name <node> --kubeconfig <admin>`,
and writes that node's containerd hosts directory (`cluster.certs_root / <node>`), so the kubelet
of each node pulls `localhost:<port>/...` from its own node's proxy.

Agent-only nodes: Node objects created through the API (no kubelet; `add_agent_node`), each with
its own proxy and agent on a loopback address of its own (`127.0.0.<10+i>`), for the control
plane at more nodes than this machine can run kubelets for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localcluster import scrape
from localcluster.cluster import Cluster
from localcluster.processes import Daemon, free_port_on
from localcluster.stack import _env, _fresh_dir, _imagewarm

Progress = Callable[[str], None]
AGENT_NODE_LABEL = "imagewarm.io/agent-only"


@dataclass
class NodeProxy:
    node: str
    ip: str
    port: int
    workdir: Path
    argv: list[str]
    daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    def start(self, timeout: float = 30) -> NodeProxy:
        """Start (or restart) it and wait until it is ready. Its metrics start from zero."""
        env = {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(_fresh_dir(self.workdir / "metrics"))}
        self.daemon = Daemon(f"imagewarm-proxy {self.node}", self.argv, self.log_path, env=env).start()
        daemon = self.daemon
        try:
            daemon.wait_http(f"{self.url}/readyz", timeout=timeout, statuses=[200])
        except Exception as exc:
            raise RuntimeError(
                f"the proxy of {self.node} did not start: {exc}\n{daemon.log_tail(40)}"
            ) from exc
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def kill(self) -> None:
        """SIGKILL its whole process group (master, workers, agent): a crash mid-transfer."""
        if self.daemon is not None:
            self.daemon.kill()

    def agent_pids(self) -> list[int]:
        """The node agent processes its master started (there must be exactly one)."""
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(
                    line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
                )
                cmdline = (status.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.daemon and int(fields.get("PPid", "0")) == self.daemon.pid and b"proxy.agent" in cmdline:
                found.append(int(status.parent.name))
        return found

    def metric(self, name: str, **labels: str) -> float:
        """The sum of its samples of metric `name` whose labels include `labels`."""
        return scrape.metric(self.url, name, **labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class NodeProxies:
    cluster: Cluster
    workdir: Path
    port: int
    upstreams: tuple[str, ...]
    proxy_args: tuple[str, ...] = ()
    progress: Progress = print
    proxies: dict[str, NodeProxy] = field(default_factory=dict)
    agent_nodes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The registry host rewritten images name: `localhost:<port>`."""
        return f"localhost:{self.port}"

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        upstreams: Sequence[str],
        *,
        workdir: Path,
        proxy_args: Sequence[str] = (),
        progress: Progress = print,
    ) -> NodeProxies:
        """A proxy with its agent on every real node of `cluster`, allowed to fetch from the plain
        HTTP registries `upstreams` (host:port). Returns once all are ready."""
        ips = [node.ip for node in cluster.nodes] + [f"127.0.0.{10 + i}" for i in range(8)]
        started = cls(cluster, workdir, free_port_on(*ips), tuple(upstreams), tuple(proxy_args), progress)
        try:
            for node in cluster.nodes:
                hosts_dir = node.containerd.certs_dir
                started._start(node.name, node.ip, ["--containerd-hosts-dir", str(hosts_dir)])
        except BaseException:
            started.stop()
            raise
        return started

    def _start(self, node: str, ip: str, extra: list[str], args: Sequence[str] = ()) -> NodeProxy:
        insecure = [arg for host in self.upstreams for arg in ("--insecure-upstream", host)]
        argv = _imagewarm(
            "proxy", "--listen", f"{ip}:{self.port}", "--cache-dir", str(self.workdir / node / "cache"),
            *insecure, "--node-name", node, "--kubeconfig", str(self.cluster.kubeconfig),
            "--proxy-prefix", self.prefix, "--workers", "2", "--log-format", "json",
            *extra, *self.proxy_args, *args,
        )  # fmt: skip
        proxy = NodeProxy(node, ip, self.port, self.workdir / node, argv)
        self.proxies[node] = proxy
        self.progress(f"starting the proxy and agent of {node} on {ip}:{self.port}")
        return proxy.start()

    def add_agent_node(
        self, name: str, labels: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> NodeProxy:
        """A Node object `name` (no kubelet) and its own proxy with agent. `args` go to that proxy."""
        index = len(self.agent_nodes)
        if index >= 8:
            raise ValueError("at most 8 agent-only nodes")
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {AGENT_NODE_LABEL: "true", **(labels or {})}},
            # No kubelet: no pod may land there.
            "spec": {"unschedulable": True, "taints": [{"key": AGENT_NODE_LABEL, "value": "true",
                                                        "effect": "NoSchedule"}]},
        }  # fmt: skip
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
        self.agent_nodes.append(name)
        return self._start(name, f"127.0.0.{10 + index}", [], args)

    def __getitem__(self, node: str) -> NodeProxy:
        return self.proxies[node]

    def stop(self) -> None:
        """Stop every proxy and delete the agent-only Node objects (idempotent)."""
        for proxy in self.proxies.values():
            proxy.stop()
        for name in self.agent_nodes:
            self.cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
        self.agent_nodes.clear()
