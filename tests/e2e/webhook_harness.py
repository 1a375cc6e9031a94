"""The webhook as the end-to-end tests run it: a `python -m webhook` process on the host, registered
with the harness's real API server, and helpers to create pods through that API server.

The webhook binds node 1's bridge address, behind a selector-less Service and Endpoints (HARNESS.md
§7). Test pods have an unsatisfiable nodeSelector: what is checked is the stored pod, and nothing
needs to be pulled. Test modules use the fixtures by name (`webhook = webhook_harness.webhook`).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from imagewarm.kube import Kube
from localcluster.cluster import Cluster
from localcluster.processes import free_ports
from webhook.registration import mutating_webhook_configuration
from webhook.selfcert import Material

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "imagewarm-system"
SERVICE = "imagewarm-webhook"
CONFIG_NAME = "imagewarm-e2e"
CONFIG_PATH = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}"
ENDPOINTS_PATH = f"/api/v1/namespaces/{NAMESPACE}/endpoints/{SERVICE}"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/imagewarm-webhook-tls"
SIDECARSETS_PATH = "/apis/imagewarm.io/v1alpha1/sidecarsets"
SIDECARSET_CRD = REPO / "charts" / "imagewarm" / "crds" / "sidecarset.yaml"
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
    """One webhook process. `kubeconfig` (default: the cluster's admin) is what its caches and its
    self-managed certificates use; with `tls_dir` it serves the certificate found there instead."""

    def __init__(
        self, cluster: Cluster, tmp: Path, *, kubeconfig: Path | None = None, tls_dir: Path | None = None
    ) -> None:
        self.cluster = cluster
        self.ip = cluster.nodes[0].ip
        self.port = free_ports(1, host=self.ip)[0]
        self.log = tmp / "webhook.log"
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.tls_dir = tls_dir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        tls: Sequence[str] = ("--tls-dir", str(self.tls_dir)) if self.tls_dir else ()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "webhook",
                "--listen",
                f"{self.ip}:{self.port}",
                "--kubeconfig",
                str(self.kubeconfig),
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
                *tls,
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

    def log_lines(self, text: str) -> int:
        """How many lines of the whole log contain `text`."""
        return sum(text in line for line in self.log.read_text(errors="replace").splitlines())


class WorkerConnections:
    """One keep-alive HTTPS connection to each of a webhook's gunicorn workers (`/healthz` says which
    worker answered; a connection stays with the worker that accepted it), to ask each worker what
    its own caches make of a pod. `workers` is how many the webhook runs."""

    def __init__(self, server: Webhook, kube: Kube, workers: int = 2) -> None:
        material = Material.from_secret(kube.get(SECRET_PATH))
        assert material is not None, "the webhook has not written its certificate Secret"
        context = ssl.create_default_context(cadata=material.ca_bundle.decode())
        context.check_hostname = False  # the certificate names the Service; we dial its endpoint
        self.connections: dict[int, http.client.HTTPSConnection] = {}
        for _ in range(50):  # the workers balance new connections: this takes a few tries
            connection = http.client.HTTPSConnection(server.ip, server.port, timeout=10, context=context)
            pid = self._get(connection, "/healthz")["worker"]
            if pid in self.connections:
                connection.close()
            else:
                self.connections[pid] = connection
            if len(self.connections) == workers:
                return
        raise AssertionError(f"reached {len(self.connections)} of the webhook's {workers} workers")

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()

    @staticmethod
    def _get(connection: http.client.HTTPSConnection, path: str) -> dict[str, Any]:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())  # type: ignore[no-any-return]

    def metrics(self) -> str:
        """`/metrics` as one worker shows it (with every worker's per-pid gauges)."""
        connection = next(iter(self.connections.values()))
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()

    def states(self) -> dict[int, dict[str, Any]]:
        """Each worker's SidecarSet cache state, by pid (also keeps the connections from idling out)."""
        return {pid: self._get(c, "/healthz")["sidecarsetCache"] for pid, c in self.connections.items()}

    def admitted(self, obj: dict[str, Any], namespace: str = "default") -> dict[int, dict[str, Any]]:
        """The pod `obj` as each worker would admit it (its patch applied), by pid."""
        result = {}
        for pid, connection in self.connections.items():
            candidate = json.loads(json.dumps(obj))
            candidate["metadata"]["namespace"] = namespace
            review = {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": str(uuid.uuid4()),
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "operation": "CREATE",
                    "namespace": namespace,
                    "object": candidate,
                },
            }
            connection.request(
                "POST", "/mutate", body=json.dumps(review), headers={"Content-Type": "application/json"}
            )
            answer = json.loads(connection.getresponse().read())["response"]
            patch = json.loads(base64.b64decode(answer["patch"])) if answer.get("patch") else []
            result[pid] = jsonpatch.apply_patch(candidate, patch)
        return result


@pytest.fixture(scope="module")
def kube(cluster: Cluster) -> Kube:
    return Kube.from_kubeconfig(cluster.kubeconfig)


@pytest.fixture(scope="module")
def webhook(cluster: Cluster, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    cluster.kubectl("apply", "-f", str(SIDECARSET_CRD))
    cluster.kubectl(
        "wait", "--for", "condition=Established", "--timeout", "60s", "crd/sidecarsets.imagewarm.io"
    )
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    server = Webhook(cluster, tmp_path_factory.mktemp("webhook"))
    objects = [
        *service_for(SERVICE, server),
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


def service_for(name: str, server: Webhook) -> list[dict[str, Any]]:
    """A selector-less Service `name` and its Endpoints, reaching `server` on the host (HARNESS.md §7).
    A new Service, not re-pointed Endpoints: the API server follows EndpointSlices, and a changed
    Endpoints object takes ~20 s to reach them."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"ports": [{"port": 443, "targetPort": server.port}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "subsets": [{"addresses": [{"ip": server.ip}], "ports": [{"port": server.port}]}],
        },
    ]


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


def sidecarset(name: str, image: str = "registry.example.com/log-agent:2.3") -> dict[str, Any]:
    """A SidecarSet injecting one container into pods labelled `sidecar=<name>`."""
    return {
        "apiVersion": "imagewarm.io/v1alpha1",
        "kind": "SidecarSet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"sidecar": name}},
            "containers": [{"name": "agent", "image": image, "podInjectPolicy": "AfterAppContainer"}],
        },
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
