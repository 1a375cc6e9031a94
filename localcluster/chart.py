"""The Helm chart (charts/imagewarm) on the local cluster: the values that make it work there, and
install / upgrade / uninstall through the real `helm`.

The local nodes share one network namespace and one filesystem, unlike real nodes, so each node's
proxy listens on its node's address (`$(HOST_IP)`, from `status.hostIP`) instead of 0.0.0.0, and its
cache and containerd's registry hosts directory are per-node subdirectories (`subPathExpr:
$(NODE_NAME)`) of one host directory: node N's containerd reads `<cluster.certs_root>/N`. Everything
else is the chart's defaults, as on a real cluster. Used by the end-to-end tests and the demo.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imagewarm.errors import ImagewarmError
from localcluster.cluster import Cluster
from localcluster.network import node_ip

CHART = Path(__file__).resolve().parent.parent / "charts" / "imagewarm"
RELEASE = "imagewarm"
NAMESPACE = "imagewarm"  # not imagewarm-system: the host-process Stack and the webhook tests use that one
PROXY_PORT = 7439


class HelmError(ImagewarmError, RuntimeError):
    """helm failed; the message carries its output."""


def split_reference(reference: str) -> tuple[str, str]:
    """`docker.io/library/imagewarm:0.1.0` -> (`docker.io/library/imagewarm`, `0.1.0`)."""
    repository, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError(f"{reference!r}: expected REPOSITORY:TAG")
    return repository, tag


def harness_values(
    *,
    image: str,
    certs_root: Path,
    cache_root: Path,
    insecure_upstreams: Sequence[str],
    mode: str = "rewrite",
    mirror_registries: Sequence[str] = (),
    controller: bool = True,
    image_proxy: bool = True,
) -> dict[str, Any]:
    """Chart values for the local cluster: `image` (REPOSITORY:TAG, imported onto every node, so
    never pulled), the upstreams as plain-HTTP registries, per-node listen address and host paths.
    `image_proxy`: the controller reads image sizes through node 1's proxy (off where a test counts
    each proxy's requests)."""
    repository, tag = split_reference(image)
    return {
        "mode": mode,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "upstreams": [],
        "insecureUpstreams": list(insecure_upstreams),
        "mirror": {"registries": list(mirror_registries)},
        "proxy": {
            "port": PROXY_PORT,
            "listenAddress": "$(HOST_IP)",
            "cache": {"hostPath": str(cache_root), "perNodeSubPath": True, "maxBytes": "2Gi"},
            "containerdHostsDir": {"hostPath": str(certs_root), "perNodeSubPath": True},
            "workers": 2,
            # Two cores for everything here: ask the scheduler for little.
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        },
        "webhook": {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}},
        "controller": {
            "enabled": controller,
            # No cluster DNS here: node 1's proxy by its address (hostNetwork, $(HOST_IP)).
            "imageProxy": f"http://{node_ip(1)}:{PROXY_PORT}" if image_proxy else "none",
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        },
    }


def template(values: dict[str, Any], *args: str, namespace: str = NAMESPACE) -> str:
    """`helm template` of the chart with `values` (and more helm arguments); raises HelmError."""
    from localcluster import binaries

    binaries.ensure((binaries.HELM,))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(values, file)
        file.flush()
        argv = [str(binaries.HELM.path("helm")), "template", RELEASE, str(CHART), "--namespace", namespace]
        argv += ["--kube-version", binaries.KUBERNETES_VERSION, "--values", file.name, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise HelmError(f"helm template failed: {proc.stderr.strip()}")
    return proc.stdout


class Release:
    """The chart installed on a local cluster as release RELEASE in NAMESPACE."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._revision = 0

    def _helm(self, *args: str, timeout: float = 300) -> str:
        proc = self.cluster.helm(*args, check=False, timeout=timeout)
        if proc.returncode != 0:
            raise HelmError(f"helm {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def _values_file(self, values: dict[str, Any]) -> Path:
        self._revision += 1
        path = self.workdir / f"values-{self._revision}.json"
        path.write_text(json.dumps(values, indent=2))
        return path

    def install(self, values: dict[str, Any], *, wait: bool = True, timeout: str = "3m") -> str:
        """`helm install` (the namespace created), waiting for every pod Ready with `wait`."""
        # A release namespace still terminating (an earlier uninstall deleted it) refuses new objects.
        phase = self.cluster.kubectl(
            "get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False
        ).stdout.strip()
        if phase == "Terminating":
            self.cluster.kubectl(
                "wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=180s", check=False, timeout=200
            )
        args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace"]
        args += ["--values", str(self._values_file(values))]
        if wait:
            args += ["--wait", "--timeout", timeout]
        out = self._helm(*args)
        if wait:
            self.wait_rolled_out(timeout)
        return out

    def upgrade(self, values: dict[str, Any], *, wait: bool = True, timeout: str = "3m") -> str:
        args = ["upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE]
        args += ["--values", str(self._values_file(values))]
        if wait:
            args += ["--wait", "--timeout", timeout]
        out = self._helm(*args)
        if wait:
            self.wait_rolled_out(timeout)
        return out

    def wait_rolled_out(self, timeout: str = "3m") -> None:
        """Wait until every DaemonSet and Deployment of the release has all its pods updated and
        Ready. `helm --wait` does not: it counts a DaemonSet ready with `maxUnavailable` pods
        still missing (the proxy's is 1), so one node's proxy may still be starting."""
        selector = f"app.kubernetes.io/instance={RELEASE}"
        names = self.cluster.kubectl(
            "get", "daemonsets,deployments", "-n", NAMESPACE, "-l", selector, "-o", "name"
        ).stdout.split()
        for name in names:
            proc = self.cluster.kubectl(
                "rollout", "status", name, "-n", NAMESPACE, f"--timeout={timeout}", check=False, timeout=300
            )
            if proc.returncode != 0:
                raise HelmError(f"{name} did not roll out: {(proc.stderr or proc.stdout).strip()}")

    def uninstall(self, *, wait: bool = True) -> str:
        args = ["uninstall", RELEASE, "--namespace", NAMESPACE]
        return self._helm(*([*args, "--wait"] if wait else args))

    def pods(self, component: str) -> list[dict[str, Any]]:
        """The release's pods of one component (proxy, webhook, controller)."""
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
        out = self.cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def proxy_url(self, node_ip: str) -> str:
        """A node's proxy (it listens on the node's address)."""
        return f"http://{node_ip}:{PROXY_PORT}"
