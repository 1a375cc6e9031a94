"""The kubelet of one local node: its KubeletConfiguration and command line.

Settings that matter on this machine kind: cgroup v1 accepted, no QoS cgroups (a container has no
cgroup hierarchy of its own to manage), no eviction or image GC surprises on a small disk, pod logs
and resolv.conf under the node's directory (several kubelets share the host), webhook authn/authz
so the API server's logs/exec calls are checked like in a real cluster.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from localcluster import binaries

# The kubelet's device manager binds this path whatever its --root-dir (Kubernetes' constant
# `pluginapi.KubeletSocket`), after removing what is there: kubelets on one host share it, and only
# one may bind it at a time.
DEVICE_PLUGIN_SOCKET = Path("/var/lib/kubelet/device-plugins/kubelet.sock")


def device_plugin_socket_identity() -> tuple[int, int] | None:
    """(inode, change time in ns) of the device-plugin socket now; None when there is none."""
    try:
        status = os.stat(DEVICE_PLUGIN_SOCKET)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_ctime_ns


def device_plugin_socket_replaced(before: tuple[int, int] | None) -> bool:
    """Whether a kubelet bound the device-plugin socket since its identity was `before`."""
    now = device_plugin_socket_identity()
    return now is not None and now != before


@dataclass(frozen=True)
class KubeletSpec:
    """Where one kubelet lives and what it talks to."""

    name: str
    ip: str
    directory: Path
    containerd_address: str
    kubeconfig: Path
    ca_file: Path
    port: int
    healthz_port: int
    resolv_conf: Path

    @property
    def root_dir(self) -> Path:
        return self.directory / "kubelet"

    @property
    def config_path(self) -> Path:
        return self.directory / "kubelet-config.json"


def configuration(spec: KubeletSpec) -> dict[str, object]:
    endpoint = f"unix://{spec.containerd_address}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failCgroupV1": False,
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": False,
        "localStorageCapacityIsolation": False,
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "address": spec.ip,
        "port": spec.port,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": spec.healthz_port,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(spec.ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "podLogsDir": str(spec.directory / "pod-logs"),
        "resolvConf": str(spec.resolv_conf),
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        # Short status intervals: nodes turn Ready and pods report sooner on a local machine.
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
    }


def argv(spec: KubeletSpec) -> list[str]:
    """Write the node's config file and return the kubelet command line."""
    spec.root_dir.mkdir(parents=True, exist_ok=True)
    (spec.directory / "pod-logs").mkdir(parents=True, exist_ok=True)
    spec.config_path.write_text(json.dumps(configuration(spec), indent=2))
    return [
        str(binaries.KUBERNETES.path("kubelet")),
        "--config", str(spec.config_path),
        "--kubeconfig", str(spec.kubeconfig),
        "--root-dir", str(spec.root_dir),
        "--cert-dir", str(spec.root_dir / "pki"),
        "--hostname-override", spec.name,
        "--node-ip", spec.ip,
        "--v", "1",
    ]  # fmt: skip
