"""`imagewarm proxy --node-name` against a real API server: once it serves, it removes its node's
startup taint (and only that taint), and only once its `/readyz` answers ready."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY

from localcluster.cluster import Cluster
from proxy import readiness
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


def node_reader_kubeconfig(cluster: Cluster, account: str, path: Path, verbs: tuple[str, ...]) -> Path:
    """A kubeconfig for a new ServiceAccount `account` (namespace default) allowed `verbs` on nodes
    (a ClusterRole and binding of the same name, applied again to change the verbs)."""
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": "default"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": account},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": list(verbs)}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "default"}],
        },
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    token = cluster.kubectl("create", "token", "-n", "default", account, "--duration", "1h").stdout.strip()
    config = json.loads(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": token}
    path.write_text(json.dumps(config))
    return path


def delete_account(cluster: Cluster, account: str) -> None:
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", account, "--ignore-not-found")
    cluster.kubectl("delete", "serviceaccount", "-n", "default", account, "--ignore-not-found")


RBAC_MESSAGE = "its ServiceAccount needs `get` and `patch` on `nodes`"


def test_a_proxy_without_patch_on_nodes_says_so_once_and_serves(cluster: Cluster, tmp_path: Path):
    node = cluster.nodes[-1].name
    account = f"proxy-no-patch-{uuid.uuid4().hex[:6]}"
    kubeconfig = node_reader_kubeconfig(cluster, account, tmp_path / "sa.kubeconfig", ("get",))
    cluster.kubectl("taint", "nodes", node, f"{TAINT}=:NoSchedule")
    proxy = None
    try:
        proxy = start_proxy(
            tmp_path,
            insecure=(cluster.registry.host,),
            workers=1,
            extra=("--node-name", node, "--kubeconfig", str(kubeconfig)),
        )
        deadline = time.monotonic() + 30
        while RBAC_MESSAGE not in proxy.log_tail(200):
            assert time.monotonic() < deadline, proxy.log_tail()
            time.sleep(0.2)
        line = next(line for line in proxy.log_tail(200).splitlines() if RBAC_MESSAGE in line)
        assert "cannot patch resource" in line and account in line  # the API server's own words too
        assert requests.get(f"{proxy.url}/readyz", timeout=5).status_code == 200
        assert requests.get(f"{proxy.url}/v2/", auth=("", ""), timeout=5).status_code == 200
        assert taints(cluster, node).get(TAINT) == "NoSchedule"
        assert proxy.metric("imagewarm_proxy_taint_removal_failures_total", reason="forbidden") == 1
        assert proxy.log_tail(400).count(RBAC_MESSAGE) == 1
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.kubectl("taint", "nodes", node, f"{TAINT}-", check=False)
        delete_account(cluster, account)


def test_forbidden_is_retried_slowly_said_once_and_the_taint_goes_once_rbac_is_granted(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    node = cluster.nodes[-1].name
    account = f"proxy-late-rbac-{uuid.uuid4().hex[:6]}"
    kubeconfig = node_reader_kubeconfig(cluster, account, tmp_path / "sa.kubeconfig", ("get",))
    cluster.kubectl("taint", "nodes", node, f"{TAINT}=:NoSchedule")
    failures = ("imagewarm_proxy_taint_removal_failures_total", {"reason": "forbidden"})
    before = REGISTRY.get_sample_value(*failures) or 0.0
    stop = threading.Event()
    outcome: list[bool] = []
    caplog.set_level(logging.INFO, logger="imagewarm.proxy.readiness")
    worker = threading.Thread(
        target=lambda: outcome.append(
            readiness.keep_removing_taint(node, str(kubeconfig), stop=stop, forbidden_retry=0.05)
        )
    )
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while (REGISTRY.get_sample_value(*failures) or 0.0) < before + 5:
            assert time.monotonic() < deadline and worker.is_alive(), caplog.text
            time.sleep(0.05)
        assert taints(cluster, node).get(TAINT) == "NoSchedule"
        node_reader_kubeconfig(cluster, account, tmp_path / "sa.kubeconfig", ("get", "patch"))
        worker.join(30)
        assert outcome == [True], caplog.text
        assert TAINT not in taints(cluster, node)
        said = [record for record in caplog.records if RBAC_MESSAGE in record.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.ERROR, caplog.text
    finally:
        stop.set()
        worker.join(5)
        cluster.kubectl("taint", "nodes", node, f"{TAINT}-", check=False)
        delete_account(cluster, account)
