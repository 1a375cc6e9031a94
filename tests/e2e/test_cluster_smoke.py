"""The local cluster itself: real pods on real kubelets, scheduling to both nodes, CRDs, DaemonSets."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry

pytestmark = pytest.mark.e2e


def apply(cluster: Cluster, *objects: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def wait_for(what: str, predicate: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def busybox_image(registry: Registry, images: ImageBuilder) -> str:
    push(registry, "smoke/busybox", "1", images.busybox())
    return f"{registry.host}/smoke/busybox:1"


def pod(name: str, image: str, command: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"test": "smoke"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "command": ["sh", "-c", command]}],
            **spec,
        },
    }


def phase(cluster: Cluster, name: str) -> str:
    return get(cluster, "pod", name).get("status", {}).get("phase", "")


def test_pod_runs_from_local_registry_and_its_log_is_read_back(
    cluster: Cluster, registry: Registry, images: ImageBuilder
) -> None:
    image = busybox_image(registry, images)
    name = f"hello-{uuid.uuid4().hex[:6]}"
    apply(cluster, pod(name, image, "echo hello from $(hostname); sleep 600"))
    wait_for(f"pod {name} Running", lambda: phase(cluster, name) == "Running")
    # The log comes through the API server from the kubelet (authenticated, authorised by webhook).
    log = wait_for("the pod's log", lambda: cluster.kubectl("logs", name, check=False).stdout)
    assert log.strip() == f"hello from {name}"
    status = get(cluster, "pod", name)["status"]["containerStatuses"][0]
    assert status["imageID"].startswith(f"{registry.host}/smoke/busybox@sha256:")
    cluster.kubectl("delete", "pod", name, "--wait=false")


def test_a_pod_lands_on_each_node(cluster: Cluster, registry: Registry, images: ImageBuilder) -> None:
    image = busybox_image(registry, images)
    names = {}
    for node in cluster.nodes:
        name = f"on-{node.name}-{uuid.uuid4().hex[:4]}"
        names[name] = node
        selector = {"kubernetes.io/hostname": node.name}
        apply(cluster, pod(name, image, "echo on $(hostname -i)", nodeSelector=selector))
    for name, node in names.items():
        wait_for(f"pod {name} Succeeded", lambda n=name: phase(cluster, n) == "Succeeded")
        status = get(cluster, "pod", name)
        assert status["spec"]["nodeName"] == node.name
        assert status["status"]["hostIP"] == node.ip
        pod_ip = status["status"]["podIP"]
        # Each node's pods get addresses from its own bridge's subnet.
        assert pod_ip.rsplit(".", 1)[0] == node.ip.rsplit(".", 1)[0]
        assert cluster.kubectl("logs", name).stdout.strip() == f"on {pod_ip}"
    cluster.kubectl("delete", "pods", *names, "--wait=false")


def test_a_custom_resource_definition_serves_objects(cluster: Cluster) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.imagewarm.test"},
        "spec": {
            "group": "smoke.imagewarm.test",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                            },
                        }
                    },
                }
            ],
        },
    }
    apply(cluster, crd)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.smoke.imagewarm.test", "--timeout=60s"
    )
    widget = {"apiVersion": "smoke.imagewarm.test/v1", "kind": "Widget", "metadata": {"name": "w1"}}
    apply(cluster, {**widget, "spec": {"size": 3}})
    assert get(cluster, "widget", "w1", "-n", "default")["spec"] == {"size": 3}
    # The schema is enforced: a wrong type is refused by the API server.
    bad = cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({**widget, "metadata": {"name": "w2"}, "spec": {"size": "x"}}),
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "spec.size" in bad.stderr
    cluster.kubectl("delete", "crd", "widgets.smoke.imagewarm.test", "--wait=false")


def test_a_daemonset_runs_one_pod_per_node(
    cluster: Cluster, registry: Registry, images: ImageBuilder
) -> None:
    image = busybox_image(registry, images)
    labels = {"app": "smoke-ds"}
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "smoke-ds", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": image, "command": ["sleep", "600"]}],
                },
            },
        },
    }
    apply(cluster, daemonset)

    def ready_pods() -> list[dict[str, Any]]:
        pods = get(cluster, "pods", "-l", "app=smoke-ds")["items"]
        ready = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        return ready if len(ready) == len(cluster.nodes) else []

    pods = wait_for("a running DaemonSet pod on every node", ready_pods)
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(n.name for n in cluster.nodes)
    status = get(cluster, "daemonset", "smoke-ds")["status"]
    assert status["desiredNumberScheduled"] == len(cluster.nodes)
    cluster.kubectl("delete", "daemonset", "smoke-ds", "--wait=false")


def test_a_service_reaches_a_pod_on_the_other_node(
    cluster: Cluster, registry: Registry, images: ImageBuilder
) -> None:
    """kube-proxy's ClusterIP rules and the host routing between node bridges both work."""
    if len(cluster.nodes) < 2:
        raise AssertionError("this test needs the 2-node cluster fixture")
    image = busybox_image(registry, images)
    server_node, client_node = cluster.nodes[0], cluster.nodes[1]
    serve = "mkdir -p /www && echo served-by-$(hostname) > /www/index.html && httpd -f -p 8080 -h /www"
    server = pod("web", image, serve, nodeSelector={"kubernetes.io/hostname": server_node.name})
    server["metadata"]["labels"] = {"app": "smoke-web"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "smoke-web", "namespace": "default"},
        "spec": {"selector": {"app": "smoke-web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(cluster, server, service)
    wait_for("the web pod Running", lambda: phase(cluster, "web") == "Running")
    cluster_ip = get(cluster, "service", "smoke-web")["spec"]["clusterIP"]
    fetch = (
        f"for i in $(seq 30); do timeout 2 wget -qO- http://{cluster_ip}/ && exit 0; sleep 1; done; exit 1"
    )
    apply(cluster, pod("client", image, fetch, nodeSelector={"kubernetes.io/hostname": client_node.name}))
    wait_for("the client pod to finish", lambda: phase(cluster, "client") in ("Succeeded", "Failed"))
    assert phase(cluster, "client") == "Succeeded", cluster.kubectl("logs", "client", check=False).stdout
    assert cluster.kubectl("logs", "client").stdout.strip() == "served-by-web"
    cluster.kubectl("delete", "pod", "web", "client", "--wait=false")
    cluster.kubectl("delete", "service", "smoke-web")


def test_helm_installs_upgrades_and_uninstalls_a_chart(cluster: Cluster, tmp_path) -> None:
    """The Go-built helm drives the real API server: install, upgrade (a rendered value changes),
    uninstall (the object goes)."""
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    release = f"smoke-{uuid.uuid4().hex[:6]}"

    def greeting() -> str:
        out = cluster.kubectl("get", "configmap", f"{release}-cm", "-o", "json").stdout
        return str(json.loads(out)["data"]["greeting"])

    assert "v3.19.5" in cluster.helm("version", "--short").stdout
    cluster.helm("install", release, str(chart), "--namespace", "default", "--wait")
    assert greeting() == "hello"
    cluster.helm("upgrade", release, str(chart), "--namespace", "default", "--set", "greeting=again")
    assert greeting() == "again"
    assert (
        json.loads(cluster.helm("list", "-n", "default", "-o", "json", "--filter", release).stdout)[0][
            "revision"
        ]
        == "2"
    )
    cluster.helm("uninstall", release, "--namespace", "default", "--wait")
    gone = cluster.kubectl("get", "configmap", f"{release}-cm", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
