"""The local cluster's PKI and kubeconfigs, written as files the Kubernetes binaries read.

One CA signs everything: the API server's serving certificate, a client certificate per
identity (admin in ``system:masters``, one ``system:node:<name>`` per kubelet for the Node
authorizer, the controller-manager, scheduler and kube-proxy under their built-in RBAC names)
and the service-account token key pair (RSA, which every Kubernetes version accepts).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagewarm import certs

# The first address of the service CIDR: the `kubernetes` Service's ClusterIP, which pods dial.
KUBERNETES_SERVICE_IP = "10.96.0.1"
_APISERVER_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """Paths of every credential the cluster uses (all under one directory)."""

    directory: Path
    ca: Pair
    apiserver: Pair
    admin: Pair
    kubelets: dict[str, Pair]
    controller_manager: Pair
    scheduler: Pair
    kube_proxy: Pair
    sa_private: Path
    sa_public: Path


def _write(directory: Path, name: str, pair: certs.CertKey) -> Pair:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    key.chmod(0o600)
    return Pair(cert, key)


def create(directory: Path, node_names: Sequence[str], apiserver_ips: Sequence[str]) -> ClusterPKI:
    """Make a fresh CA and every certificate under ``directory`` (created if missing).

    ``apiserver_ips`` are extra IP SANs of the API server (the addresses pods and kubelets dial);
    127.0.0.1 and the ``kubernetes`` Service IP are always included."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = certs.new_ca("imagewarm-local-cluster-ca")

    def client(cn: str, *organizations: str) -> certs.CertKey:
        return certs.issue(ca, cn, organizations=organizations, server=False, client=True)

    ips = list(dict.fromkeys(["127.0.0.1", KUBERNETES_SERVICE_IP, *apiserver_ips]))
    apiserver = certs.issue(ca, "kube-apiserver", dns_names=_APISERVER_DNS, ip_addresses=ips, server=True)
    sa_private, sa_public = certs.rsa_key_pair()
    (directory / "sa.key").write_bytes(sa_private)
    (directory / "sa.key").chmod(0o600)
    (directory / "sa.pub").write_bytes(sa_public)
    return ClusterPKI(
        directory=directory,
        ca=_write(directory, "ca", ca),
        apiserver=_write(directory, "apiserver", apiserver),
        admin=_write(directory, "admin", client("imagewarm-admin", "system:masters")),
        kubelets={
            name: _write(directory, f"kubelet-{name}", client(f"system:node:{name}", "system:nodes"))
            for name in node_names
        },
        controller_manager=_write(directory, "controller-manager", client("system:kube-controller-manager")),
        scheduler=_write(directory, "scheduler", client("system:kube-scheduler")),
        kube_proxy=_write(directory, "kube-proxy", client("system:kube-proxy")),
        sa_private=directory / "sa.key",
        sa_public=directory / "sa.pub",
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: Pair, *, name: str = "imagewarm") -> Path:
    """Write a self-contained kubeconfig (credentials embedded) for ``user`` at ``server``.

    Written as JSON, which every kubeconfig reader (kubectl, client-go, the Python client) accepts."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [
            {
                "name": name,
                "user": {"client-certificate-data": _b64(user.cert), "client-key-data": _b64(user.key)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path
