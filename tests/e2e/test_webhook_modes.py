"""The webhook end to end in the modes and states the API server can put it in: registered in opt-in
mode, its SidecarSet cache relisting after its watch expired, and answering before that cache could
sync. One webhook process for the module (tests/e2e/webhook_harness.py), one more where a test needs
a webhook whose cache cannot sync.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagewarm import certs
from imagewarm.informer import Informer
from imagewarm.kube import Kube
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
RELISTED = "watch expired; listing again informer=sidecarsets"  # the informer's log line (text format)
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


def test_sidecarset_cache_relists_after_its_watch_expired(
    webhook: Webhook, cluster: Cluster, kube: Kube, namespace: str
) -> None:
    """The API server's watch cache, not etcd, answers watches, so compacting etcd expires nothing.
    What does: a changed CRD spec makes the API server rebuild the resource's storage. The new watch
    cache starts at the current revision, every open watch on the old one ends, and a watch resumed
    from an earlier resourceVersion is answered 410 Gone: the informer must list again."""
    relisted_before = webhook.log_lines(RELISTED)
    name = f"relist-{uuid.uuid4().hex[:6]}"
    column = "/spec/versions/0/additionalPrinterColumns/0/description"
    original = kube.get(CRD_PATH)["spec"]["versions"][0]["additionalPrinterColumns"][0]["description"]
    informer = Informer(kube, SIDECARSETS_PATH, name="e2e-sidecarsets", watch_timeout=5).start()
    try:
        assert informer.wait_synced(10) and informer.lists == 1
        kube.patch(
            CRD_PATH, [{"op": "replace", "path": column, "value": f"{original} ({name})"}], kind="json"
        )
        eventually(lambda: informer.lists == 2, 30, "the informer to get 410 Gone and list again")
        # Created while the watches are down and the caches relisting: seen by the relist or the
        # watch resumed after it, never lost between them.
        cluster.kubectl("apply", "-f", "-", input=json.dumps(sidecarset(name)))
        eventually(lambda: informer.get(name) is not None, 15, "the informer to see the new SidecarSet")
        app = pod("app", "nginx:1.27", labels={"sidecar": name})
        stored = eventually(
            lambda: (s := rewritten(cluster, namespace, app)) and len(images(s)) == 2 and s,
            20,
            "the webhook to inject the SidecarSet created meanwhile",
        )
        assert images(stored) == [
            f"{PREFIX}/docker.io/library/nginx:1.27",
            f"{PREFIX}/registry.example.com/log-agent:2.3",
        ]
        # Both gunicorn workers have their own cache; each got 410 and listed again.
        eventually(
            lambda: webhook.log_lines(RELISTED) >= relisted_before + 2, 10, "both webhook workers to relist"
        )
        assert informer.lists == 2  # one relist, then the watch resumed
    finally:
        informer.stop(1)
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
