"""The product image on the real cluster: imported into both nodes' containerd (never pulled), a pod
`image: imagewarm:<version>` runs its entrypoint on each node, as nonroot with a read-only root."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from localcluster import productimage
from localcluster.cluster import Cluster

pytestmark = pytest.mark.e2e


def pod(name: str, namespace: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{
                "name": "imagewarm", "image": image, "imagePullPolicy": "Never", "args": ["--version"],
                "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip


def test_pods_of_the_imported_product_image_run_on_every_node(cluster: Cluster, namespace: str) -> None:
    image = productimage.build_product_image()
    productimage.import_into(cluster, image)
    names = {node.name: f"version-{node.index}" for node in cluster.nodes}
    items = [pod(name, namespace, node, image.reference) for node, name in names.items()]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    deadline = time.monotonic() + 120
    for node, name in names.items():
        while True:
            status = json.loads(cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout)[
                "status"
            ]
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            assert time.monotonic() < deadline, f"pod {name} on {node} did not finish: {status}"
            time.sleep(0.5)
        assert status["phase"] == "Succeeded", status
        (container,) = status["containerStatuses"]
        assert container["image"] == image.name
        # An imported image has no repository digest: the CRI reports it by its config's digest.
        assert container["imageID"].endswith((image.digest, image.image.config.digest)), container
        log = cluster.kubectl("logs", "-n", namespace, name).stdout
        assert log.strip() == f"imagewarm {image.tag}", f"{node}: {log}"
