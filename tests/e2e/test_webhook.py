"""The webhook end to end: a real kube-apiserver calls it over TLS with the caBundle it made itself.

The webhook runs on the host, bound to node 1's bridge address, behind a selector-less Service and
Endpoints (HARNESS.md §7). Test pods have an unsatisfiable nodeSelector: what is checked is the
stored pod, and nothing needs to be pulled.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from imagewarm import certs
from imagewarm.informer import Informer
from imagewarm.kube import Kube
from imagewarm.localcluster.cluster import Cluster
from imagewarm.localcluster.processes import free_ports
from webhook.registration import mutating_webhook_configuration
from webhook.selfcert import CertManager, Material

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "imagewarm-system"
SERVICE = "imagewarm-webhook"
CONFIG_NAME = "imagewarm-e2e"
CONFIG_PATH = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}"
PREFIX = "localhost:7439"


def eventually(check: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.3)


class Webhook:
    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.ip = cluster.nodes[0].ip
        self.port = free_ports(1, host=self.ip)[0]
        self.log = tmp / "webhook.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "webhook",
                "--listen",
                f"{self.ip}:{self.port}",
                "--kubeconfig",
                str(self.cluster.kubeconfig),
                "--webhook-config-name",
                CONFIG_NAME,
                "--namespace",
                NAMESPACE,
                "--service-name",
                SERVICE,
                "--workers",
                "2",
                "--connections",
                "64",
                "--cert-check-interval",
                "5s",
                "--log-format",
                "text",
            ],
            cwd=REPO,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def serving(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the webhook exited:\n{self.logs()}")
        with socket.create_connection((self.ip, self.port), timeout=2):
            return True

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def kube(cluster: Cluster) -> Kube:
    return Kube.from_kubeconfig(cluster.kubeconfig)


@pytest.fixture(scope="module")
def webhook(cluster: Cluster, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    cluster.kubectl("apply", "-f", str(REPO / "charts" / "imagewarm" / "crds" / "sidecarset.yaml"))
    cluster.kubectl(
        "wait", "--for", "condition=Established", "--timeout", "60s", "crd/sidecarsets.imagewarm.io"
    )
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    server = Webhook(cluster, tmp_path_factory.mktemp("webhook"))
    objects = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {"ports": [{"port": 443, "targetPort": server.port}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "subsets": [{"addresses": [{"ip": server.ip}], "ports": [{"port": server.port}]}],
        },
        mutating_webhook_configuration(name=CONFIG_NAME, service_name=SERVICE, namespace=NAMESPACE),
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    server.start()
    LAST_WEBHOOK[:] = [server]
    try:
        eventually(
            lambda: all(w["clientConfig"].get("caBundle") for w in kube.get(CONFIG_PATH)["webhooks"]),
            30,
            "the webhook to patch its caBundle",
        )
        eventually(server.serving, 30, "the webhook to listen")
        yield server
    except BaseException:
        print(server.logs())
        raise
    finally:
        server.stop()
        cluster.kubectl("delete", "mutatingwebhookconfiguration", CONFIG_NAME, "--ignore-not-found")
        cluster.kubectl("delete", "sidecarsets.imagewarm.io", "--all", "--ignore-not-found")


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"wh-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def pod(
    name: str,
    *images: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    init: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": {"imagewarm.test/never": "true"},  # stays Pending: nothing is pulled
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
    }
    if init:
        spec["initContainers"] = [{"name": "init", "image": init}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": spec,
    }


def create(cluster: Cluster, namespace: str, obj: dict[str, Any], *args: str) -> dict[str, Any]:
    out = cluster.kubectl(
        "create", "-n", namespace, "-o", "json", *args, "-f", "-", input=json.dumps(obj)
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


LAST_WEBHOOK: list[Webhook] = []


def rewritten(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj` and return the stored pod; retried while the freshly registered webhook is not
    yet called (HARNESS.md §7: the first creates may race the configuration)."""
    attempt = 0

    def once() -> dict[str, Any] | None:
        nonlocal attempt
        attempt += 1
        candidate = json.loads(json.dumps(obj))
        candidate["metadata"]["name"] = f"{obj['metadata']['name']}-{attempt}"
        stored = create(cluster, namespace, candidate)
        return stored if stored["spec"]["containers"][0]["image"].startswith(PREFIX) else None

    try:
        return eventually(once, 20, "a created pod to be rewritten")  # type: ignore[no-any-return]
    except AssertionError:
        print("webhook log:", *(w.logs() for w in LAST_WEBHOOK), sep="\n")
        apiserver = sorted(cluster.workdir.rglob("*apiserver*.log"))
        for path in apiserver:
            print(
                path,
                "".join(
                    line
                    for line in path.read_text(errors="replace").splitlines(True)
                    if "webhook" in line.lower()
                )[-3000:],
            )
        raise


def images(stored: dict[str, Any], field: str = "containers") -> list[str]:
    return [c["image"] for c in stored["spec"].get(field, [])]


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


def test_server_side_dry_run_is_rewritten_too(webhook: Webhook, cluster: Cluster, namespace: str) -> None:
    rewritten(cluster, namespace, pod("warm", "redis:7"))  # the webhook is being called
    stored = create(cluster, namespace, pod("dry", "redis:7"), "--dry-run=server")
    assert images(stored) == [f"{PREFIX}/docker.io/library/redis:7"]


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
