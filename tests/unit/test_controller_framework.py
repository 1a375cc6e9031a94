"""The controller's small framework pieces: request verbs for the API metrics, the Pod and Node
transforms (what the caches keep), settings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.caches import slim_node, slim_pod
from controller.config import ControllerConfig
from imagewarm import api
from imagewarm.config import ConfigError, from_arguments
from imagewarm.kube import request_verb


@pytest.mark.parametrize(
    ("method", "path", "verb"),
    [
        ("GET", "/api/v1/nodes", "list"),
        ("GET", "/api/v1/nodes/n1", "get"),
        ("GET", "/api/v1/namespaces", "list"),
        ("GET", "/api/v1/namespaces/ns", "get"),
        ("GET", "/api/v1/namespaces/ns/secrets", "list"),
        ("GET", "/api/v1/namespaces/ns/secrets/s", "get"),
        ("GET", "/apis/imagewarm.io/v1alpha1/nodeimages", "list"),
        ("GET", "/apis/imagewarm.io/v1alpha1/nodeimages/n1", "get"),
        ("GET", "/apis/imagewarm.io/v1alpha1/namespaces/ns/imagepulljobs", "list"),
        ("GET", "/apis/imagewarm.io/v1alpha1/namespaces/ns/imagepulljobs/j/status", "get"),
        ("PATCH", "/apis/imagewarm.io/v1alpha1/nodeimages/n1", "patch"),
        ("POST", "/api/v1/namespaces/ns/events", "create"),
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l", "update"),
        ("DELETE", "/api/v1/namespaces/ns/secrets/s", "delete"),
    ],
)
def test_request_verbs(method: str, path: str, verb: str) -> None:
    assert request_verb(method, path) == verb


def test_slim_pod_keeps_only_what_the_controller_reads() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7", "labels": {"app": "web"},
            "annotations": {api.ORIGINAL_IMAGES_ANNOTATION: '{"c":"nginx"}', "big": "x" * 1000},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx", "env": [{"name": "A"}]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready"}]},
    }  # fmt: skip
    assert slim_pod(pod) == {
        "metadata": {
            "name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "web"},
            "annotations": {api.ORIGINAL_IMAGES_ANNOTATION: '{"c":"nginx"}'},
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx"}], "initContainers": []},
        "status": {"phase": "Running"},
    }  # fmt: skip


def test_pods_of_one_template_share_their_common_parts() -> None:
    def pod(name: str, labels: dict[str, str], image: str, phase: str = "Pending") -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": "ns", "uid": name, "labels": dict(labels),
                         "annotations": {api.ORIGINAL_IMAGES_ANNOTATION: json.dumps({"c": image})}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": image}]},
            "status": {"phase": phase},
        }  # fmt: skip

    a = slim_pod(pod("a", {"app": "web"}, "nginx"))
    b = slim_pod(pod("b", {"app": "web"}, "nginx"))
    c = slim_pod(pod("c", {"app": "db"}, "postgres", "Running"))
    for part in (("metadata", "labels"), ("metadata", "annotations"), ("spec", "containers"), ("status",)):
        first, second, other = (_dig(p, part) for p in (a, b, c))
        assert first is second and first == second  # one object for both pods
        assert other != first
    assert a["metadata"] is not b["metadata"] and a["metadata"]["name"] == "a"


def _dig(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def test_slim_node_keeps_labels_and_platform() -> None:
    node = {
        "metadata": {"name": "n1", "uid": "u", "resourceVersion": "3", "labels": {"pool": "a"}},
        "status": {"nodeInfo": {"operatingSystem": "linux", "architecture": "amd64", "kernelVersion": "6"},
                   "images": [{"names": ["x"]}]},
    }  # fmt: skip
    assert slim_node(node) == {
        "metadata": {"name": "n1", "uid": "u", "resourceVersion": "3", "labels": {"pool": "a"}},
        "status": {"nodeInfo": {"operatingSystem": "linux", "architecture": "amd64"}},
    }


def test_controller_settings() -> None:
    environ = {"IMAGEWARM_REPULL_PERIOD": "30s", "IMAGEWARM_NAMESPACE": "iw"}
    config = from_arguments(ControllerConfig, None, environ)
    assert config.repull_period == 30 and config.release_namespace == "iw"
    assert config.unused_image_ttl == 720 * 3600 and config.metrics_listen == ("0.0.0.0", 8080)
    with pytest.raises(ConfigError, match="lease-duration"):
        from_arguments(ControllerConfig, None, {"IMAGEWARM_RENEW_DEADLINE": "20s"})


def test_custom_resources_are_cached_without_managed_fields() -> None:
    from controller.caches import CACHES, without_managed_fields

    whole = {"metadata": {"name": "n1", "resourceVersion": "4", "managedFields": [{"manager": "agent"}]},
             "spec": {"images": {}}}  # fmt: skip
    kept = without_managed_fields(whole)
    assert kept == {"metadata": {"name": "n1", "resourceVersion": "4"}, "spec": {"images": {}}}
    assert "managedFields" in whole["metadata"]  # the object as received is left as it was
    assert all(spec.transform is not None for spec in CACHES)  # every cache keeps less than all
