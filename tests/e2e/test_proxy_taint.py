"""`imagewarm proxy --node-name` against a real API server: once it serves, it removes its node's
startup taint (and only that taint), and only once its `/readyz` answers ready."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from localcluster.cluster import Cluster
from proxy.cache.paths import Layout
from proxy.cache.store import BlobStore
from tests.component.proxy_fixtures import start_proxy

pytestmark = pytest.mark.e2e

TAINT = "imagewarm.io/proxy-not-ready"
OTHER = "example.com/keep-me"


def taints(cluster: Cluster, node: str) -> dict[str, str]:
    spec = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)["spec"]
    return {taint["key"]: taint["effect"] for taint in spec.get("taints") or []}


def test_proxy_removes_its_startup_taint_once_it_serves(cluster: Cluster, tmp_path: Path):
    node = cluster.nodes[-1].name
    cluster.kubectl("taint", "nodes", node, f"{TAINT}=:NoSchedule", f"{OTHER}=yes:NoSchedule")
    proxy = None
    try:
        assert taints(cluster, node).get(TAINT) == "NoSchedule"
        proxy = start_proxy(
            tmp_path,
            insecure=(cluster.registry.host,),
            workers=1,
            extra=("--node-name", node, "--kubeconfig", str(cluster.kubeconfig)),
        )
        assert requests.get(f"{proxy.url}/readyz", timeout=5).status_code == 200
        deadline = time.monotonic() + 30
        while TAINT in taints(cluster, node):
            assert time.monotonic() < deadline, f"the taint is still there:\n{proxy.log_tail()}"
            time.sleep(0.2)
        assert taints(cluster, node).get(OTHER) == "NoSchedule"  # other taints are left alone
        assert "removed the startup taint" in proxy.log_tail(200)
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.kubectl("taint", "nodes", node, f"{TAINT}-", f"{OTHER}-", check=False)


def test_the_taint_stays_while_readyz_says_not_ready(cluster: Cluster, tmp_path: Path):
    """A proxy whose cache cannot take fills (its `partial` directory a read-only bind mount) serves
    `/healthz` but not `/readyz`, and keeps its node tainted until `/readyz` answers ready."""
    node = cluster.nodes[-1].name
    cache_dir = tmp_path / "cache"
    BlobStore(cache_dir).close()  # the layout exists, so the proxy starts on it
    partial = str(Layout(cache_dir).partial_dir)
    cluster.kubectl("taint", "nodes", node, f"{TAINT}=:NoSchedule")
    subprocess.run(["mount", "--bind", partial, partial], check=True)
    mounted = True
    proxy = None
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", partial], check=True)
        proxy = start_proxy(
            tmp_path,
            cache_dir=cache_dir,
            insecure=(cluster.registry.host,),
            workers=1,
            ready=False,
            extra=("--node-name", node, "--kubeconfig", str(cluster.kubeconfig)),
        )
        assert requests.get(f"{proxy.url}/readyz", timeout=5).status_code == 503
        deadline = time.monotonic() + 30
        while "the startup taint stays until /readyz answers ready" not in proxy.log_tail(200):
            assert time.monotonic() < deadline, proxy.log_tail()
            time.sleep(0.2)
        assert taints(cluster, node).get(TAINT) == "NoSchedule"  # it waited, and took no action
        subprocess.run(["umount", partial], check=True)
        mounted = False
        assert requests.get(f"{proxy.url}/readyz", timeout=5).status_code == 200
        deadline = time.monotonic() + 30
        while TAINT in taints(cluster, node):
            assert time.monotonic() < deadline, f"the taint is still there:\n{proxy.log_tail()}"
            time.sleep(0.2)
    finally:
        if mounted:
            subprocess.run(["umount", partial], check=False)
        if proxy is not None:
            proxy.stop()
        cluster.kubectl("taint", "nodes", node, f"{TAINT}-", check=False)
