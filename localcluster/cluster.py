"""A real local Kubernetes cluster: etcd, API server, controller-manager, scheduler, kube-proxy and
one kubelet on its own containerd per node, all on this machine.

    cluster = Cluster.start(nodes=2)        # blocks until nodes are Ready; prints progress
    cluster.kubectl("get", "pods", "-A")
    cluster.stop()                          # leaves no process, mount, bridge or chain behind

Node ``i`` (from 1) is ``iw-node-<i>`` at ``10.244.<i>.1`` (bridge ``iwbr<i>``). The pause image
comes from a local registry (``cluster.registry``); nothing is pulled from the internet. While a
cluster runs it holds the machine lock (``machine.py``); a second one waits for it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcluster import binaries, controlplane, kubelet, machine, network, pki
from localcluster.containerd import Containerd
from localcluster.processes import Daemon, DaemonError, free_ports
from localcluster.registry import Registry, start_registry

PAUSE_REPOSITORY, PAUSE_TAG = "pause", "3.10"
Progress = Callable[[str], None]


class ClusterError(RuntimeError):
    """The cluster did not come up; the message names the component and carries its log tail."""


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[3:])} failed ({self.returncode}): {(self.stderr or '').strip()}"


def _print_progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@dataclass
class Node:
    """One local node: its name, InternalIP, containerd and kubelet."""

    name: str
    ip: str
    index: int
    directory: Path
    containerd: Containerd
    kubelet: Daemon | None = None


@dataclass
class Cluster:
    workdir: Path
    registry: Registry
    kubeconfig: Path
    nodes: list[Node] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    own_registry: bool = False
    remove_workdir: bool = False
    progress: Progress = _print_progress
    _lock: machine.MachineLock = field(default_factory=machine.MachineLock)
    _ip_forward: str = "0"
    _stopped: bool = False
    _starter: threading.Thread | None = None
    _containerd_error: str | None = None

    # --- start --------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        nodes: int = 2,
        *,
        registry: Registry | None = None,
        progress: Progress | None = None,
        timeout: float = 180,
    ) -> Cluster:
        """Start a cluster of ``nodes`` nodes with its files under ``workdir`` (default: a new
        ``/tmp/iwk-*``, removed by stop()). Returns once the API server is ready, every node is
        Ready and the ``default`` ServiceAccount exists.

        ``registry``: where the pause image is pushed (default: a registry of our own, stopped with
        the cluster). Raises ClusterError (after tearing down what started) naming the component
        that failed, with its log tail."""
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be between 1 and 200, not {nodes}")
        if os.geteuid() != 0:
            raise ClusterError("the local cluster needs root (bridges, mounts, iptables): run it as root")
        missing = machine.missing_packages()
        if missing:
            raise ClusterError(
                f"the local cluster needs these Debian packages: apt-get install {' '.join(missing)}"
            )
        report = progress or _print_progress
        created = workdir is None
        workdir = Path(workdir or tempfile.mkdtemp(prefix="iwk-", dir="/tmp")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        lock = machine.MachineLock()
        leftover = lock.acquire(report)
        try:
            if leftover:
                report(f"cleaning up after a killed cluster run in {leftover.get('workdir')}")
            machine.clean_host(leftover.get("workdir"), leftover.get("ip_forward"),
                               remove_workdir=leftover.get("remove_workdir") == "yes")  # fmt: skip
            ip_forward = network.read_ip_forward()
            lock.record(
                workdir=str(workdir), ip_forward=ip_forward, remove_workdir="yes" if created else "no"
            )
        except BaseException:
            lock.release()
            raise
        own = registry is None
        try:
            registry = registry or start_registry(workdir / "registry")
        except BaseException:
            machine.clean_host(str(workdir), ip_forward)
            lock.release()
            raise
        self = cls(workdir=workdir, registry=registry, kubeconfig=workdir / "admin.kubeconfig",
                   own_registry=own, remove_workdir=created, progress=report,
                   _lock=lock, _ip_forward=ip_forward)  # fmt: skip
        # A caller that never calls stop() still gets the full teardown when the interpreter exits.
        atexit.register(self.stop)
        try:
            self._bring_up(nodes, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _bring_up(self, count: int, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        binaries.ensure((binaries.KUBERNETES, binaries.ETCD, binaries.CONTAINERD))
        pause = self._push_pause_image()
        names = [f"iw-node-{i}" for i in range(1, count + 1)]
        for i in range(1, count + 1):
            network.create_bridge(i)
        self.progress(f"bridges {', '.join(network.bridge_name(i) for i in range(1, count + 1))} up")
        creds = pki.create(self.workdir / "pki", names, [network.node_ip(i) for i in range(1, count + 1)])
        ports = controlplane.Ports(*free_ports(7))
        server = f"https://127.0.0.1:{ports.apiserver}"

        def kubeconfig(name: str, user: pki.Pair) -> Path:
            return pki.write_kubeconfig(self.workdir / f"{name}.kubeconfig", server, creds.ca.cert, user)

        kubeconfig("admin", creds.admin)
        etcd = self._daemon("etcd", controlplane.etcd(self.workdir, ports))
        # containerds do not need the API server: start them while etcd and the API server boot.
        self._starter = threading.Thread(target=self._start_containerds, args=(names, pause), daemon=True)
        self._starter.start()
        self._wait(etcd, lambda: etcd.wait_port(ports.etcd_client, timeout=30))
        apiserver = self._daemon("kube-apiserver", controlplane.apiserver(creds, ports, network.node_ip(1)))
        self._wait_for(apiserver, "/readyz", lambda: self._raw_ok("/readyz"), deadline)
        self.progress(f"kube-apiserver ready at {server} ({time.monotonic() - started:.1f}s)")
        manager = self._daemon(
            "kube-controller-manager",
            controlplane.controller_manager(
                creds, ports, kubeconfig("controller-manager", creds.controller_manager)
            ),
        )
        self._daemon(
            "kube-scheduler", controlplane.scheduler(ports, kubeconfig("scheduler", creds.scheduler))
        )
        self._starter.join()
        if len(self.nodes) != count:
            raise ClusterError(self._containerd_error or "containerd did not start")
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")  # pods never query a real DNS server
        kubelet_ports = free_ports(2 * count)
        for node, port, healthz in zip(self.nodes, kubelet_ports[::2], kubelet_ports[1::2], strict=True):
            network.write_cni_config(
                node.directory / "cni" / "net.d", node.directory / "cni" / "ipam", node.index, node.name
            )
            spec = kubelet.KubeletSpec(
                name=node.name, ip=node.ip, directory=node.directory,
                containerd_address=node.containerd.address,
                kubeconfig=kubeconfig(f"kubelet-{node.name}", creds.kubelets[node.name]),
                ca_file=creds.ca.cert, port=port, healthz_port=healthz, resolv_conf=resolv,
            )  # fmt: skip
            # Every kubelet binds the one fixed device-plugin socket path (removing what is there
            # first): started together, the second can lose the race (EADDRINUSE). One at a time.
            socket_before = kubelet.device_plugin_socket_identity()
            node.kubelet = self._daemon(f"kubelet {node.name}", kubelet.argv(spec))
            bound = functools.partial(kubelet.device_plugin_socket_replaced, socket_before)
            self._wait_for(node.kubelet, kubelet.DEVICE_PLUGIN_SOCKET.name, bound, deadline)
            self.progress(f"kubelet {node.name} bound {kubelet.DEVICE_PLUGIN_SOCKET}")
        self._daemon(
            "kube-proxy",
            controlplane.kube_proxy(
                self.workdir, ports, kubeconfig("kube-proxy", creds.kube_proxy), names[0]
            ),
        )
        for node in self.nodes:
            assert node.kubelet is not None
            ready = functools.partial(self._node_ready, node.name)
            self._wait_for(node.kubelet, f"node {node.name} Ready", ready, deadline)
        self.progress(f"{count} node(s) Ready ({time.monotonic() - started:.1f}s)")
        self._wait_for(manager, "the default ServiceAccount",
                       lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                       deadline)  # fmt: skip
        self.progress(f"cluster up in {time.monotonic() - started:.1f}s (kubeconfig {self.kubeconfig})")

    def _start_containerds(self, names: Sequence[str], pause: str) -> None:
        try:
            for i, name in enumerate(names, start=1):
                directory = self.workdir / f"n{i}"
                runtime = Containerd.start(
                    directory / "containerd", certs_dir=self.certs_root / name, sandbox_image=pause,
                    cni_conf_dir=directory / "cni" / "net.d", namespace="k8s.io",
                )  # fmt: skip
                self.nodes.append(Node(name, network.node_ip(i), i, directory, runtime))
            self.trust_registry(self.registry)
            self.progress(f"{len(names)} containerd(s) running")
        except Exception as exc:  # reported by the starting thread, which owns the error path
            self._containerd_error = f"containerd failed to start: {exc}"

    def _push_pause_image(self) -> str:
        from localcluster.images import ImageBuilder, push

        builder = ImageBuilder(binaries.cache_root() / "images")  # shared: built once per machine
        push(self.registry, PAUSE_REPOSITORY, PAUSE_TAG, builder.pause())
        ref = f"{self.registry.host}/{PAUSE_REPOSITORY}:{PAUSE_TAG}"
        self.progress(f"pause image pushed to {ref}")
        return ref

    def _daemon(self, name: str, argv: list[str]) -> Daemon:
        env = {
            **os.environ,
            "PATH": ":".join([*binaries.path_entries(), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
        }
        log = self.workdir / "logs" / f"{name.replace(' ', '-')}.log"
        daemon = Daemon(name, argv, log, env=env).start()
        self.daemons.append(daemon)
        self.progress(f"started {name} (pid {daemon.pid})")
        return daemon

    def _wait(self, daemon: Daemon, wait: Callable[[], None]) -> None:
        try:
            wait()
        except DaemonError as exc:
            raise ClusterError(str(exc)) from None

    def _wait_for(self, daemon: Daemon, what: str, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            problem = None if daemon.running else "exited"
            if problem is None and time.monotonic() > deadline:
                problem = "timed out"
            if problem:
                raise ClusterError(
                    f"{daemon.name} {problem} while waiting for {what}; "
                    f"its log {daemon.log_path} ends with:\n{daemon.log_tail()}"
                )
            time.sleep(0.25)

    def _raw_ok(self, path: str) -> bool:
        return self.kubectl("get", "--raw", path, check=False, timeout=5).returncode == 0

    def _node_ready(self, name: str) -> bool:
        proc = self.kubectl("get", "node", name, "-o", "json", check=False, timeout=10)
        if proc.returncode != 0:
            return False
        conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # --- use ----------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as cluster admin. Raises KubectlError (with stderr) on failure if ``check``."""
        argv = [str(binaries.KUBERNETES.path("kubectl")), "--kubeconfig", str(self.kubeconfig), *args]
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            if check:
                raise
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {exc.timeout}s")
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (its state and caches under the work directory)."""
        binaries.ensure((binaries.HELM,))
        home = self.workdir / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
               "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}  # fmt: skip
        argv = [str(binaries.HELM.path("helm")), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` authenticated as cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]

    @property
    def certs_root(self) -> Path:
        """Parent of the nodes' registry hosts directories: node ``N``'s containerd reads
        ``<certs_root>/N`` (its ``config_path``), as a real node reads ``/etc/containerd/certs.d``.
        Each node has its own, so each can pull from its own node proxy (a DaemonSet mounts
        ``certs_root`` with ``subPathExpr: $(NODE_NAME)``)."""
        return self.workdir / "certs.d"

    def trust_registry(self, registry: Registry) -> None:
        """Let every node pull from ``registry`` over plain HTTP (its ``hosts.toml`` in each node's
        registry hosts directory; containerd re-reads it on each pull)."""
        for node in self.nodes:
            node.containerd.set_hosts(registry.host, registry.url)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Tear everything down: kubelets, containers and shims, the control plane, containerds,
        mounts (deepest first), bridges, ``KUBE-*`` chains; restore ip_forward; release the lock.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self.progress("tearing down")
        if self._starter is not None:
            self._starter.join()
        kubelets = [n.kubelet for n in self.nodes if n.kubelet is not None]
        for daemon in kubelets:
            daemon.stop(timeout=5)
        for node in self.nodes:
            node.containerd.kill_containers()
        for daemon in reversed(self.daemons):
            if daemon not in kubelets:
                daemon.stop()
        for node in self.nodes:
            node.containerd.stop()
        if self.own_registry:
            with contextlib.suppress(Exception):
                self.registry.stop()
        machine.clean_host(str(self.workdir), self._ip_forward)
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._lock.release()
        self.progress("torn down")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
