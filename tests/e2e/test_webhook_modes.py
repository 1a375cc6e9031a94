"""The webhook end to end in the modes and states the API server can put it in: registered in opt-in
mode, every worker's SidecarSet cache kept current across a rebuild of the CRD's storage, and
answering before that cache could sync. One webhook process for the module
(tests/e2e/webhook_harness.py), one more where a test needs a webhook whose cache cannot sync.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from imagewarm import certs
from imagewarm.kube import Gone, Kube
from localcluster.cluster import Cluster
from tests.e2e import webhook_harness
from tests.e2e.webhook_harness import (
    CONFIG_NAME,
    CONFIG_PATH,
    NAMESPACE,
    PREFIX,
    REPO,
    SECRET_PATH,
    SERVICE,
    SIDECARSETS_PATH,
    Webhook,
    WorkerConnections,
    create,
    eventually,
    images,
    pod,
    rewritten,
    service_for,
    sidecarset,
)
from webhook.registration import mutating_webhook_configuration
from webhook.selfcert import Material

pytestmark = pytest.mark.e2e

# The fixtures, used by name.
kube = webhook_harness.kube
webhook = webhook_harness.webhook

CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/sidecarsets.imagewarm.io"
NOT_SYNCED = "imagewarm: SidecarSet cache not synced yet; no SidecarSet injected"


@pytest.fixture
def other_namespace(namespaces: Callable[[], str]) -> str:
    return namespaces()


def printed_configuration(*flags: str) -> dict[str, Any]:
    """What `imagewarm webhook --print-configuration` prints for this module's webhook and `flags`."""
    out = subprocess.run(
        [sys.executable, "-m", "webhook", "--print-configuration", "--webhook-config-name", CONFIG_NAME,
         "--namespace", NAMESPACE, "--service-name", SERVICE, *flags],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)  # type: ignore[no-any-return]


def set_namespace_selector(kube: Kube, selector: dict[str, Any]) -> None:
    # A JSON patch of this one field: the webhook's certificate keeper owns the caBundle beside it.
    kube.patch(
        CONFIG_PATH,
        [{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": selector}],
        kind="json",
    )


def test_opt_in_mode_rewrites_only_namespaces_labelled_enabled(
    webhook: Webhook, cluster: Cluster, kube: Kube, namespace: str, other_namespace: str
) -> None:
    opt_in = printed_configuration("--opt-in")["webhooks"][0]["namespaceSelector"]
    default = kube.get(CONFIG_PATH)["webhooks"][0]["namespaceSelector"]
    assert opt_in != default
    unlabelled, enabled = namespace, other_namespace
    cluster.kubectl("label", "namespace", enabled, "imagewarm.io/enabled=true")
    rewritten(cluster, unlabelled, pod("warm", "redis:7"))  # the default registration rewrites it
    set_namespace_selector(kube, opt_in)
    try:
        untouched = eventually(
            lambda: (
                (p := create(cluster, unlabelled, pod(f"p-{uuid.uuid4().hex[:6]}", "redis:7")))
                and images(p) == ["redis:7"]
                and p
            ),
            20,
            "the API server to apply the opt-in registration",
        )
        assert "imagewarm.io/original-images" not in untouched["metadata"].get("annotations", {})
        stored = rewritten(cluster, enabled, pod("in", "redis:7"))
        assert images(stored) == [f"{PREFIX}/docker.io/library/redis:7"]
        assert images(create(cluster, unlabelled, pod("still-out", "redis:7"))) == ["redis:7"]
    finally:
        set_namespace_selector(kube, default)
        rewritten(cluster, unlabelled, pod("back", "redis:7"))


def hold_storage(kube: Kube, path: str) -> ssl.SSLSocket:
    """Start a create at `path` whose body never arrives: until the socket is closed, the API server's
    handler holds the storage it started on. A CRD's old storage is torn down only once no such
    request is in flight (or after twice the request timeout: 120 s by default)."""
    url = urlparse(kube.server)
    assert url.hostname and url.port and kube.cert is not None
    context = ssl.create_default_context(cafile=kube.verify if isinstance(kube.verify, str) else None)
    context.load_cert_chain(*kube.cert)
    raw = socket.create_connection((url.hostname, url.port))
    held = context.wrap_socket(raw, server_hostname=url.hostname)
    held.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{".encode()
    )
    return held


def watch_answered_gone(kube: Kube, resource_version: str) -> bool:
    try:
        for _ in kube.watch(SIDECARSETS_PATH, resource_version, timeout_seconds=1):
            pass
    except Gone:
        return True
    return False


def injected_by_every_worker(workers: WorkerConnections, app: dict[str, Any], image: str) -> bool:
    return all(images(admitted)[1:] == [f"{PREFIX}/{image}"] for admitted in workers.admitted(app).values())


def per_worker(metrics: str, name: str, cache: str = "sidecarsets") -> dict[int, float]:
    """The values of the gauge `name` for `cache`, by worker pid (multiprocess mode "liveall")."""
    found = {}
    for labels, value in re.findall(rf"^{name}{{(.*)}} (\S+)$", metrics, re.MULTILINE):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parsed.get("cache") == cache:
            found[int(parsed["pid"])] = float(value)
    return found


def test_every_worker_injects_sidecarsets_changed_across_a_crd_storage_rebuild(
    webhook: Webhook, cluster: Cluster, kube: Kube, namespace: str
) -> None:
    """A changed CRD spec makes the API server build the resource a new storage (a new watch cache,
    which answers 410 Gone to a watch from before it) and tear down the old one once no short request
    uses it, at most 2 x the request timeout later. Until then the watches on the old storage stay
    open and keep delivering every change (both storages read the same etcd keys); when it goes, they
    end. A worker resumes on the new storage and lists again only if it is answered 410: when events
    or bookmarks from the old storage took its resourceVersion past the new watch cache's start, the
    watch just resumes, and a worker that first listed after the rebuild has nothing to expire.
    Counting relists therefore says nothing. What must hold is that every gunicorn worker (each has
    its own cache) injects what changed, before and after the old storage goes."""
    workers = WorkerConnections(webhook, kube)
    name = f"rebuilt-{uuid.uuid4().hex[:6]}"
    path = f"{SIDECARSETS_PATH}/{name}"
    app = pod("app", "nginx:1.27", labels={"sidecar": name})
    column = "/spec/versions/0/additionalPrinterColumns/0/description"
    original = kube.get(CRD_PATH)["spec"]["versions"][0]["additionalPrinterColumns"][0]["description"]
    before = kube.get(SIDECARSETS_PATH)["metadata"]["resourceVersion"]
    watches_before = {pid: state["watches"] for pid, state in workers.states().items()}
    held = hold_storage(kube, SIDECARSETS_PATH)

    def change(image: str) -> str:
        obj = sidecarset(name, image=f"registry.example.com/{image}")
        obj["metadata"]["resourceVersion"] = kube.get(path)["metadata"]["resourceVersion"]
        return str(kube.replace(path, obj)["metadata"]["resourceVersion"])

    try:
        kube.patch(
            CRD_PATH, [{"op": "replace", "path": column, "value": f"{original} ({name})"}], kind="json"
        )
        eventually(
            lambda: watch_answered_gone(kube, before), 30, "the new storage to answer 410 to an old watch"
        )
        # Right after the rebuild, while the held request keeps the old storage (and the workers'
        # watches on it) alive: a new SidecarSet, then a change of it.
        kube.create(SIDECARSETS_PATH, sidecarset(name))
        change("log-agent:2.4")
        eventually(
            lambda: injected_by_every_worker(workers, app, "registry.example.com/log-agent:2.4"),
            30,
            "every webhook worker to inject the SidecarSet changed after the rebuild",
        )
        held.close()  # the old storage goes, and with it every watch on it
        eventually(
            lambda: all(s["watches"] > watches_before[pid] for pid, s in workers.states().items()),
            30,
            "every worker's watch on the old storage to end",
        )
        version = int(change("log-agent:2.5"))
        eventually(
            lambda: injected_by_every_worker(workers, app, "registry.example.com/log-agent:2.5"),
            30,
            "every webhook worker, resumed on the new storage, to inject the next change",
        )
        stored = rewritten(cluster, namespace, app)
        assert images(stored) == [
            f"{PREFIX}/docker.io/library/nginx:1.27",
            f"{PREFIX}/registry.example.com/log-agent:2.5",
        ]
        # The per-worker probe an operator sees: every live worker's cache, by pid.
        metrics = workers.metrics()
        versions = per_worker(metrics, "imagewarm_webhook_cache_resource_version")
        assert set(versions) == set(workers.connections)  # the workers, not the master
        assert all(value >= version for value in versions.values()), versions
        assert set(per_worker(metrics, "imagewarm_webhook_cache_lists")) == set(versions)
        assert set(per_worker(metrics, "imagewarm_webhook_cache_objects", "namespaces")) == set(versions)
        print("each worker's cache:", workers.states())
    finally:
        held.close()
        workers.close()
        kube.patch(CRD_PATH, [{"op": "replace", "path": column, "value": original}], kind="json")
        cluster.kubectl("delete", "sidecarsets.imagewarm.io", name, "--ignore-not-found")


def forbidden_kubeconfig(cluster: Cluster, account: str, path: Path) -> Path:
    """A kubeconfig for a new ServiceAccount `account` without any role: the API server answers its
    list of SidecarSets 403, as when the chart's RBAC is missing."""
    cluster.kubectl("create", "serviceaccount", "-n", NAMESPACE, account)
    token = cluster.kubectl("create", "token", "-n", NAMESPACE, account, "--duration", "1h").stdout.strip()
    config = json.loads(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": token}
    path.write_text(json.dumps(config))
    return path


def register(cluster: Cluster, server: Webhook, name: str, ca_bundle: bytes, namespace: str) -> None:
    """Register `server` as webhook configuration `name`, behind its own Service, for `namespace` only."""
    configuration = mutating_webhook_configuration(
        name=name, service_name=name, namespace=NAMESPACE, ca_bundle=ca_bundle
    )
    configuration["webhooks"][0]["namespaceSelector"] = {
        "matchLabels": {"kubernetes.io/metadata.name": namespace}
    }
    objects = [*service_for(name, server), configuration]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def test_before_the_sidecarset_cache_syncs_pods_are_rewritten_not_injected_with_a_warning(
    webhook: Webhook, cluster: Cluster, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    name = f"unsynced-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sidecarset(name)))
    labels = {"sidecar": name}
    eventually(
        lambda: len(images(rewritten(cluster, namespace, pod("app", "nginx:1.27", labels=labels)))) == 2,
        20,
        "the synced webhook to inject the SidecarSet",
    )
    # A second webhook whose caches may list nothing, registered for this namespace alone (which
    # the first one now leaves alone), serving a certificate from the first one's CA.
    material = Material.from_secret(kube.get(SECRET_PATH))
    assert material is not None
    serving = certs.issue(material.ca, f"{name}.{NAMESPACE}.svc", dns_names=[f"{name}.{NAMESPACE}.svc"])
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "tls.crt").write_bytes(serving.cert_pem)
    (tls / "tls.key").write_bytes(serving.key_pem)
    unsynced = Webhook(
        cluster,
        tmp_path,
        kubeconfig=forbidden_kubeconfig(cluster, name, tmp_path / "kubeconfig"),
        tls_dir=tls,
    )
    unsynced.start()
    try:
        eventually(unsynced.serving, 30, "the second webhook to listen")
        cluster.kubectl("label", "namespace", namespace, "imagewarm.io/enabled=false")
        register(cluster, unsynced, name, material.ca_bundle, namespace)

        def answered_by_unsynced() -> tuple[dict[str, Any], str] | None:
            result = cluster.kubectl(
                "create", "-n", namespace, "-o", "json", "-f", "-",
                input=json.dumps(pod(f"app-{uuid.uuid4().hex[:6]}", "nginx:1.27", labels=labels)),
            )  # fmt: skip
            return (json.loads(result.stdout), result.stderr) if NOT_SYNCED in result.stderr else None

        try:
            stored, warnings = eventually(answered_by_unsynced, 20, "the second webhook to be called")
        except AssertionError:
            print("second webhook log:", unsynced.logs(), sep="\n")
            raise
        assert images(stored) == [f"{PREFIX}/docker.io/library/nginx:1.27"]  # rewritten, not injected
        assert "imagewarm.io/sidecarset-hash" not in stored["metadata"]["annotations"]
        assert json.loads(stored["metadata"]["annotations"]["imagewarm.io/original-images"]) == {
            "c0": "nginx:1.27"
        }
        assert f"Warning: {NOT_SYNCED}" in warnings
        assert "is forbidden" in unsynced.logs()  # why it cannot sync
    finally:
        unsynced.stop()
        cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
        cluster.kubectl(
            "delete", "-n", NAMESPACE, "service,endpoints,serviceaccount", name, "--ignore-not-found"
        )
        cluster.kubectl("delete", "sidecarsets.imagewarm.io", name, "--ignore-not-found")
