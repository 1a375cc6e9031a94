"""Command lines of the control plane: etcd, kube-apiserver, controller-manager, scheduler, kube-proxy.

Pure functions of paths and ports (files they need are written by the caller or here, stated per
function), so the cluster module only orders, starts and waits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from localcluster import binaries, network
from localcluster.pki import ClusterPKI

ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,"
    "NodeRestriction,Priority,TaintNodesByCondition,PersistentVolumeClaimResize,RuntimeClass,"
    "MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,ResourceQuota,PodSecurity"
)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the control plane (picked free at start)."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    proxy_healthz: int
    proxy_metrics: int


def etcd(directory: Path, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(binaries.ETCD.path("etcd")),
        "--name", "iw",
        "--data-dir", str(directory / "etcd"),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"iw={peer}",
        "--unsafe-no-fsync",
        "--log-level", "warn",
    ]  # fmt: skip


def apiserver(pki: ClusterPKI, ports: Ports, advertise_ip: str) -> list[str]:
    """The API server binds every address (pods reach it at ``advertise_ip``, the `kubernetes`
    Service's endpoint, which must not be loopback)."""
    return [
        str(binaries.KUBERNETES.path("kube-apiserver")),
        "--etcd-servers", f"http://127.0.0.1:{ports.etcd_client}",
        "--bind-address", "0.0.0.0",
        "--secure-port", str(ports.apiserver),
        "--advertise-address", advertise_ip,
        "--tls-cert-file", str(pki.apiserver.cert),
        "--tls-private-key-file", str(pki.apiserver.key),
        "--client-ca-file", str(pki.ca.cert),
        "--kubelet-client-certificate", str(pki.admin.cert),
        "--kubelet-client-key", str(pki.admin.key),
        "--kubelet-preferred-address-types", "InternalIP,Hostname",
        "--service-account-issuer", SERVICE_ACCOUNT_ISSUER,
        "--service-account-key-file", str(pki.sa_public),
        "--service-account-signing-key-file", str(pki.sa_private),
        "--service-cluster-ip-range", network.SERVICE_CIDR,
        "--authorization-mode", "Node,RBAC",
        "--enable-admission-plugins", ADMISSION_PLUGINS,
        "--enable-aggregator-routing=true",
        "--allow-privileged=true",
        "--v", "1",
    ]  # fmt: skip


def controller_manager(pki: ClusterPKI, ports: Ports, kubeconfig: Path) -> list[str]:
    return [
        str(binaries.KUBERNETES.path("kube-controller-manager")),
        "--kubeconfig", str(kubeconfig),
        "--authentication-kubeconfig", str(kubeconfig),
        "--authorization-kubeconfig", str(kubeconfig),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(ports.controller_manager),
        "--leader-elect=false",
        "--service-account-private-key-file", str(pki.sa_private),
        "--root-ca-file", str(pki.ca.cert),
        "--cluster-signing-cert-file", str(pki.ca.cert),
        "--cluster-signing-key-file", str(pki.ca.key),
        "--use-service-account-credentials=true",
        "--controllers", "*",
        "--allocate-node-cidrs=false",
        "--v", "1",
    ]  # fmt: skip


def scheduler(ports: Ports, kubeconfig: Path) -> list[str]:
    return [
        str(binaries.KUBERNETES.path("kube-scheduler")),
        "--kubeconfig", str(kubeconfig),
        "--authentication-kubeconfig", str(kubeconfig),
        "--authorization-kubeconfig", str(kubeconfig),
        "--bind-address", "127.0.0.1",
        "--secure-port", str(ports.scheduler),
        "--leader-elect=false",
        "--v", "1",
    ]  # fmt: skip


def kube_proxy(directory: Path, ports: Ports, kubeconfig: Path, node_name: str) -> list[str]:
    """One kube-proxy serves every node (they share the host network namespace). Writes its config."""
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": node_name,
        "clusterCIDR": network.POD_CIDR,
        "nodePortAddresses": [network.POD_CIDR],
        "iptables": {"localhostNodePorts": False},
        # Zeros: do not touch conntrack sysctls (read-only in a container).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "healthzBindAddress": f"127.0.0.1:{ports.proxy_healthz}",
        "metricsBindAddress": f"127.0.0.1:{ports.proxy_metrics}",
    }
    path = directory / "kube-proxy-config.json"
    path.write_text(json.dumps(config, indent=2))
    return [str(binaries.KUBERNETES.path("kube-proxy")), "--config", str(path), "--v", "1"]
