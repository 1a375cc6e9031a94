"""The machine-wide side of a local cluster: an exclusive lock and the cleanup of a killed run.

Bridge names, subnets, ``KUBE-*`` iptables chains and ``/var/lib/kubelet/device-plugins/kubelet.sock``
are machine-wide, so one cluster runs at a time: the lock file is held (``flock``) while it runs and
records its work directory. A record found by the next holder means the previous run was killed
before its teardown: its processes, shims, mounts, bridges and chains are removed then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from localcluster import host, network

LOCK_PATH = Path(os.environ.get("IMAGEWARM_CLUSTER_LOCK", "/tmp/imagewarm-cluster.lock"))
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")


# What the cluster needs from the host, and the Debian package providing it.
REQUIREMENTS = {
    "/usr/sbin/runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/usr/lib/cni/host-local": "containernetworking-plugins",
    "/usr/lib/cni/loopback": "containernetworking-plugins",
    "ip": "iproute2",
    "iptables": "iptables",
    "docker-registry": "docker-registry",
    "/bin/busybox": "busybox-static",
}


def missing_packages() -> list[str]:
    """Debian packages whose programs the cluster needs and this machine lacks (sorted, unique)."""
    missing = {
        package
        for program, package in REQUIREMENTS.items()
        if not (Path(program).exists() if program.startswith("/") else shutil.which(program))
    }
    return sorted(missing)


class MachineLock:
    """The exclusive machine lock; :meth:`record` notes what to clean if this run is killed."""

    def __init__(self, path: Path = LOCK_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, progress: Callable[[str], None]) -> dict[str, str]:
        """Block until the lock is ours; return the record a killed previous run left ({} if none)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another local cluster holds {self.path}; waiting for it to stop")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {}

    def record(self, **fields: str) -> None:
        assert self._fd is not None, "acquire() first"
        data = json.dumps(fields).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Clear the record (a clean teardown happened) and unlock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _sandbox_ids(workdir: Path) -> list[str]:
    """Sandbox and container IDs the CRI plugin of each node's containerd recorded on disk."""
    cri = "containerd/root/io.containerd.grpc.v1.cri"
    return [p.name for kind in ("sandboxes", "containers") for p in workdir.glob(f"*/{cri}/{kind}/*")]


def clean_host(workdir: str | None, ip_forward: str | None, *, remove_workdir: bool = False) -> None:
    """Remove every machine-wide trace of a cluster in ``workdir`` (None: only the shared parts).

    Safe to repeat: processes mentioning ``workdir``, shims of its containerds, its mounts and CNI
    results (and the directory itself with ``remove_workdir``), then our bridges, ``KUBE-*`` chains,
    the kubelet device-plugin socket and CNI results; restores ip_forward."""
    if workdir:
        for pid in host.pids_matching(workdir):
            host.kill_trees([pid])
        host.kill_shims(workdir)
        host.unmount_all(Path(workdir))
        host.remove_cni_results(_sandbox_ids(Path(workdir)))
        if remove_workdir and not host.mounts_under(Path(workdir)):
            shutil.rmtree(workdir, ignore_errors=True)
    for bridge in network.our_bridges():
        network.delete_bridge(bridge)
    network.delete_kube_chains()
    with contextlib.suppress(OSError):
        DEVICE_PLUGIN_SOCKET.unlink()
    network.delete_cni_results()
    host.remove_dead_shim_sockets()
    if ip_forward is not None:
        network.restore_ip_forward(ip_forward)
