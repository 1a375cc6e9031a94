"""The webhook end to end: a real kube-apiserver calls it over TLS with the caBundle it made itself.

The webhook process and the pod helpers: tests/e2e/webhook_harness.py.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from imagewarm import certs
from imagewarm.informer import Informer
from imagewarm.kube import Kube
from localcluster.cluster import Cluster
from tests.e2e import webhook_harness
from tests.e2e.webhook_harness import (
    CONFIG_PATH,
    NAMESPACE,
    PREFIX,
    SECRET_PATH,
    SERVICE,
    Webhook,
    create,
    eventually,
    images,
    pod,
    rewritten,
    sidecarset,
)
from webhook.registration import COMPONENT_LABEL, COMPONENT_VALUE
from webhook.selfcert import CertManager, Material

pytestmark = pytest.mark.e2e

# The fixtures, used by name.
kube = webhook_harness.kube
webhook = webhook_harness.webhook


def test_ca_bundle_is_the_ca_in_the_secret_the_webhook_made(webhook: Webhook, kube: Kube) -> None:
    secret = kube.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/imagewarm-webhook-tls")
    material = Material.from_secret(secret)
    assert material is not None
    bundle = kube.get(CONFIG_PATH)["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == material.ca_bundle


def test_created_pods_are_stored_rewritten_with_the_original_images(
    webhook: Webhook, cluster: Cluster, namespace: str
) -> None:
    digest = "sha256:" + "1" * 64
    stored = rewritten(
        cluster,
        namespace,
        pod("app", "nginx:1.27", f"{cluster.registry.host}/team/api@{digest}", init="busybox:1.36"),
    )
    registry_segment = cluster.registry.host.replace(":", "_")
    assert images(stored) == [
        f"{PREFIX}/docker.io/library/nginx:1.27",
        f"{PREFIX}/{registry_segment}/team/api@{digest}",
    ]
    assert images(stored, "initContainers") == [f"{PREFIX}/docker.io/library/busybox:1.36"]
    assert json.loads(stored["metadata"]["annotations"]["imagewarm.io/original-images"]) == {
        "c0": "nginx:1.27",
        "c1": f"{cluster.registry.host}/team/api@{digest}",
        "init": "busybox:1.36",
    }


def webhook_counters(webhook: Webhook, kube: Kube, sidecarset_name: str) -> dict[str, float]:
    """The webhook's /metrics (every worker's values), served with the CA of its Secret: CREATE
    requests answered, images rewritten, injections of SidecarSet `sidecarset_name`."""
    material = Material.from_secret(kube.get(SECRET_PATH))
    assert material is not None
    context = ssl.create_default_context(cadata=material.ca_bundle.decode())
    context.check_hostname = False  # reached by IP; the certificate names the Service
    connection = http.client.HTTPSConnection(webhook.ip, webhook.port, context=context, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        connection.close()
    wanted = {
        "requests": ("imagewarm_webhook_requests_total", {"operation": "CREATE", "code": "200"}),
        "rewrites": ("imagewarm_webhook_rewrites_total", {}),
        "injections": ("imagewarm_webhook_sidecarset_injections_total", {"sidecarset": sidecarset_name}),
    }
    found = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, (name, labels) in wanted.items():
                if sample.name == name and labels.items() <= sample.labels.items():
                    found[key] += sample.value
    return found


def test_server_side_dry_run_is_answered_like_a_create_and_moves_no_counter(
    webhook: Webhook, cluster: Cluster, kube: Kube, namespace: str
) -> None:
    name = f"dry-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sidecarset(name)))
    try:
        labels = {"sidecar": name}
        # The webhook is being called and its cache has the SidecarSet.
        app = pod("app", "redis:7", labels=labels)
        eventually(
            lambda: len(images(rewritten(cluster, namespace, app))) == 2, 20, "the SidecarSet to be injected"
        )
        before = webhook_counters(webhook, kube, name)
        dry = create(cluster, namespace, pod("dry", "redis:7", labels=labels), "--dry-run=server")
        assert images(dry) == [
            f"{PREFIX}/docker.io/library/redis:7",
            f"{PREFIX}/registry.example.com/log-agent:2.3",
        ]
        after_dry = webhook_counters(webhook, kube, name)
        assert after_dry["requests"] > before["requests"]  # the webhook did answer it
        assert (after_dry["rewrites"], after_dry["injections"]) == (before["rewrites"], before["injections"])
        assert cluster.kubectl("get", "pod", "-n", namespace, "dry", check=False).returncode != 0
        # The same pod created for real moves both (so the check above can fail).
        create(cluster, namespace, pod("real", "redis:7", labels=labels))
        after_real = webhook_counters(webhook, kube, name)
        assert after_real["rewrites"] == before["rewrites"] + 2
        assert after_real["injections"] == before["injections"] + 1
    finally:
        cluster.kubectl("delete", "sidecarsets.imagewarm.io", name, "--ignore-not-found")


def test_imagewarms_own_pods_are_not_sent_to_the_webhook(
    webhook: Webhook, cluster: Cluster, namespace: str
) -> None:
    rewritten(cluster, namespace, pod("warm", "redis:7"))
    own = create(cluster, namespace, pod("proxy", "redis:7", labels={COMPONENT_LABEL: COMPONENT_VALUE}))
    assert images(own) == ["redis:7"]
    assert "imagewarm.io/original-images" not in own["metadata"].get("annotations", {})


def test_skipped_pods_and_opted_out_namespaces_are_untouched(
    webhook: Webhook, cluster: Cluster, namespace: str
) -> None:
    rewritten(cluster, namespace, pod("warm", "redis:7"))
    skipped = create(cluster, namespace, pod("skipped", "redis:7", annotations={"imagewarm.io/skip": "true"}))
    assert images(skipped) == ["redis:7"]
    assert "imagewarm.io/original-images" not in skipped["metadata"]["annotations"]
    cluster.kubectl("label", "namespace", namespace, "imagewarm.io/enabled=false")
    opted_out = create(cluster, namespace, pod("opted-out", "redis:7"))
    assert images(opted_out) == ["redis:7"]
    system = create(cluster, "kube-system", pod(f"wh-{uuid.uuid4().hex[:6]}", "redis:7"))
    cluster.kubectl("delete", "pod", "-n", "kube-system", system["metadata"]["name"], "--wait=false")
    assert images(system) == ["redis:7"]


def test_sidecarset_is_injected(webhook: Webhook, cluster: Cluster, namespace: str) -> None:
    name = f"agent-{uuid.uuid4().hex[:6]}"
    sidecarset = {
        "apiVersion": "imagewarm.io/v1alpha1",
        "kind": "SidecarSet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"sidecar": name}},
            "namespaceSelector": {"matchLabels": {"team": name}},  # read from the namespace informer
            "containers": [
                {
                    "name": "log-agent",
                    "image": "registry.example.com/log-agent:2.3",
                    "podInjectPolicy": "AfterAppContainer",
                    "shareVolumePolicy": {"type": "enabled"},
                    "transferEnv": [{"sourceContainerName": "c0", "envName": "APP"}],
                    "volumeMounts": [{"name": "logs", "mountPath": "/var/log/app"}],
                }
            ],
            "volumes": [{"name": "logs", "emptyDir": {}}],
        },
    }
    cluster.kubectl("label", "namespace", namespace, f"team={name}")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sidecarset))
    try:
        app = pod("web", "nginx:1.27", labels={"sidecar": name})
        app["spec"]["containers"][0]["env"] = [{"name": "APP", "value": "shop"}]
        stored = eventually(
            lambda: (s := rewritten(cluster, namespace, app)) and len(s["spec"]["containers"]) == 2 and s,
            20,
            "the SidecarSet to be injected",
        )
        assert [c["name"] for c in stored["spec"]["containers"]] == ["c0", "log-agent"]
        sidecar = stored["spec"]["containers"][1]
        assert sidecar["image"] == f"{PREFIX}/registry.example.com/log-agent:2.3"
        assert {"name": "APP", "value": "shop"} in sidecar["env"]
        mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
        assert "/var/log/app" in mounts and "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
        assert "logs" in {v["name"] for v in stored["spec"]["volumes"]}
        recorded = json.loads(stored["metadata"]["annotations"]["imagewarm.io/sidecarset-hash"])
        assert recorded[name]["sidecarSetName"] == name and recorded[name]["hash"]
    finally:
        cluster.kubectl("delete", "sidecarsets.imagewarm.io", name, "--ignore-not-found")


def test_ephemeral_container_added_through_the_subresource_is_rewritten(
    webhook: Webhook, cluster: Cluster, namespace: str
) -> None:
    stored = rewritten(cluster, namespace, pod("debug-me", "nginx:1.27"))
    name = stored["metadata"]["name"]
    # What `kubectl debug` sends: a strategic merge patch of the ephemeralcontainers subresource.
    debugger = {"name": "debugger", "image": "busybox:1.36", "stdin": True, "targetContainerName": "c0"}
    cluster.kubectl(
        "patch",
        "pod",
        "-n",
        namespace,
        name,
        "--subresource",
        "ephemeralcontainers",
        "--type",
        "strategic",
        "-p",
        json.dumps({"spec": {"ephemeralContainers": [debugger]}}),
    )
    after = json.loads(cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout)
    assert images(after, "ephemeralContainers") == [f"{PREFIX}/docker.io/library/busybox:1.36"]
    # The API server keeps only spec.ephemeralContainers from an update of this subresource, so the
    # original image cannot be recorded in the annotation there (documented in webhook/mutation.py).
    assert "debugger" not in json.loads(after["metadata"]["annotations"]["imagewarm.io/original-images"])


def test_replicas_starting_at_once_converge_on_one_ca(webhook: Webhook, kube: Kube, tmp_path: Path) -> None:
    secret = f"race-{uuid.uuid4().hex[:6]}"
    results: list[Material] = []
    managers = [
        CertManager(
            kube,
            namespace=NAMESPACE,
            secret_name=secret,
            webhook_config_name="absent",
            dns_names=(f"{SERVICE}.{NAMESPACE}.svc",),
            directory=tmp_path / str(i),
        )
        for i in range(4)
    ]
    threads = [threading.Thread(target=lambda m=m: results.append(m.ensure_secret())) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert (
        len(results) == 4 and len({r.ca_bundle for r in results}) == 1 and len({r.cert for r in results}) == 1
    )
    stored = Material.from_secret(kube.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret}"))
    assert stored == results[0]


def test_informer_follows_the_real_api_server(webhook: Webhook, kube: Kube, cluster: Cluster) -> None:
    informer = Informer(kube, "/api/v1/namespaces", watch_timeout=2).start()  # short watches: several resumes
    try:
        assert informer.wait_synced(10)
        name = f"inf-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", name)
        cluster.kubectl("label", "namespace", name, "seen=yes")
        eventually(
            lambda: (informer.get(name) or {}).get("metadata", {}).get("labels", {}).get("seen") == "yes",
            15,
            "the informer to see the label",
        )
        time.sleep(3)  # at least one watch ended and resumed from its last resourceVersion
        cluster.kubectl("delete", "namespace", name, "--wait=false")
        eventually(
            lambda: informer.get(name) is None or informer.get(name)["metadata"].get("deletionTimestamp"),
            15,
            "the deletion",
        )
        assert informer.lists == 1  # resumed, never needed to relist
    finally:
        informer.stop(1)


def test_self_managed_certificate_is_renewed_before_expiry(webhook: Webhook, kube: Kube) -> None:
    """A certificate about to expire (put in the Secret by hand) is replaced by the webhook's
    certificate keeper, and the new one is served without a restart; the CA stays."""
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/imagewarm-webhook-tls"
    secret = kube.get(path)
    material = Material.from_secret(secret)
    assert material is not None
    dns = f"{SERVICE}.{NAMESPACE}.svc"
    expiring = certs.issue(material.ca, dns, dns_names=[dns], days=2)
    secret["data"]["tls.crt"] = base64.b64encode(expiring.cert_pem).decode()
    secret["data"]["tls.key"] = base64.b64encode(expiring.key_pem).decode()
    kube.replace(path, secret)

    def renewed() -> Material | None:
        current = Material.from_secret(kube.get(path))
        return (
            current
            if current is not None and current.cert not in (expiring.cert_pem, material.cert)
            else None
        )

    new = eventually(renewed, 30, "the keeper to renew the certificate in the Secret")
    assert new.ca_bundle == material.ca_bundle
    assert x509.load_pem_x509_certificate(new.cert).not_valid_after_utc > datetime.datetime.now(
        datetime.UTC
    ) + datetime.timedelta(days=300)

    def served() -> bytes:
        context = ssl.create_default_context(cadata=material.ca_bundle.decode())
        with (
            socket.create_connection((webhook.ip, webhook.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=dns) as tls,
        ):
            return tls.getpeercert(binary_form=True) or b""

    wanted = x509.load_pem_x509_certificate(new.cert).public_bytes(Encoding.DER)
    eventually(lambda: served() == wanted, 30, "the renewed certificate to be served")


def test_z_webhook_stopped_pods_are_still_created_unrewritten(
    webhook: Webhook, cluster: Cluster, namespace: str
) -> None:
    webhook.stop()
    started = time.monotonic()
    stored = create(cluster, namespace, pod("no-webhook", "nginx:1.27"))
    assert images(stored) == ["nginx:1.27"]
    assert time.monotonic() - started < 10
