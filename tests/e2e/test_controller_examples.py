"""Every example in examples/ applied to the real API server behaves as its comment says, with the
controller process and simulated node agents (localcluster/agentsim.py)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagewarm import api
from imagewarm.kube import Kube
from localcluster.agentsim import AgentSim
from localcluster.cluster import Cluster
from tests.fixtures.controller import (
    RELEASE_NAMESPACE,
    ControllerProcess,
    FakeNodes,
    Held,
    condition,
    job_object,
    node_image,
    tasks_of,
    wait_for,
)

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def running(controller: ControllerProcess, agents: tuple[AgentSim, Held]) -> None:
    """Every test here runs with the module's controller and simulated agents."""


def example(name: str) -> dict[str, Any]:
    [doc] = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return doc  # type: ignore[no-any-return]


def apply_job(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    obj = example(name)
    kind = api.IMAGE_PULL_JOB if obj["kind"] == "ImagePullJob" else api.IMAGE_LIST_PULL_JOB
    return kube.create(kind.path(namespace=namespace), obj)


def all_nodes(kube: Kube) -> int:
    return len(kube.get("/api/v1/nodes")["items"])


def completed(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        f"{name} Complete", lambda: condition(j := job_object(kube, namespace, name), "Complete") and j
    )


def test_gpu_nodes_example_pulls_only_on_the_selected_nodes(
    kube: Kube, namespace: str, fake_nodes: FakeNodes
) -> None:
    gpu = fake_nodes.create({"node.example.com/pool": "gpu"})
    fake_nodes.create({"node.example.com/pool": "gpu", "node.example.com/maintenance": "true"})
    fake_nodes.create({"node.example.com/pool": "cpu"})
    wait_for("NodeImage", lambda: node_image(kube, gpu))
    name = apply_job(kube, namespace, "imagepulljob-gpu-nodes.yaml")["metadata"]["name"]
    job = completed(kube, namespace, name)
    assert (job["status"]["desired"], job["status"]["succeeded"]) == (1, 1)


def test_named_nodes_example(kube: Kube, namespace: str, fake_nodes: FakeNodes) -> None:
    for node in ("worker-1", "worker-2"):
        fake_nodes.create(name=node)
    wait_for("NodeImages", lambda: node_image(kube, "worker-1") and node_image(kube, "worker-2"))
    job = completed(
        kube, namespace, apply_job(kube, namespace, "imagepulljob-named-nodes.yaml")["metadata"]["name"]
    )
    assert (job["status"]["desired"], job["status"]["succeeded"]) == (2, 2)


def test_percent_example_pulls_the_digest_everywhere(
    kube: Kube, namespace: str, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    repo = "registry.example.com/web/frontend"
    rules.held.add(repo)
    name = apply_job(kube, namespace, "imagepulljob-percent.yaml")["metadata"]["name"]
    nodes = all_nodes(kube)
    # 25% of the nodes, rounded up, at a time: here that is one node.
    limit = -(-nodes // 4)
    entries = wait_for(f"{limit} task(s)", lambda: len(e := tasks_of(kube, repo)) == limit and e)
    [tag] = next(iter(entries.values()))["tags"]
    assert tag["tag"] == "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    rules.held.discard(repo)
    job = completed(kube, namespace, name)
    assert job["status"]["succeeded"] == nodes


def test_release_example_passes_its_policy_to_the_tasks(
    kube: Kube, namespace: str, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    repo = "registry.example.com/shop/checkout"
    rules.held.add(repo)
    name = apply_job(kube, namespace, "imagepulljob-release.yaml")["metadata"]["name"]
    entries = wait_for("tasks", lambda: tasks_of(kube, repo))
    for entry in entries.values():
        assert entry["tags"][0]["pullPolicy"] == {
            "backoffLimit": 2,
            "timeoutSeconds": 900,
            "activeDeadlineSeconds": 1800,
        }
    rules.held.discard(repo)
    job = completed(kube, namespace, name)
    assert job["status"]["succeeded"] == all_nodes(kube)
    assert job_object(kube, namespace, name) is not None, "kept for ttlSecondsAfterFinished (an hour)"


def test_base_image_example_never_completes_and_covers_new_nodes(
    kube: Kube, namespace: str, fake_nodes: FakeNodes
) -> None:
    name = apply_job(kube, namespace, "imagepulljob-base-image.yaml")["metadata"]["name"]
    wait_for(
        "every node",
        lambda: (
            ((job_object(kube, namespace, name) or {}).get("status") or {}).get("succeeded")
            == all_nodes(kube)
        ),
    )
    fake_nodes.create()
    wait_for(
        "the new node too",
        lambda: (
            ((job_object(kube, namespace, name) or {}).get("status") or {}).get("succeeded")
            == all_nodes(kube)
        ),
    )
    job = job_object(kube, namespace, name)
    assert condition(job, "Complete") is None and "completionTime" not in job["status"]  # type: ignore[index]


def test_private_example_copies_its_pull_secret(kube: Kube, namespace: str) -> None:
    config = base64.b64encode(b'{"auths":{"registry.corp.example.com":{"auth":"dTpw"}}}').decode()
    kube.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "corp-registry"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": config},
        },
    )
    name = apply_job(kube, namespace, "imagepulljob-private.yaml")["metadata"]["name"]
    completed(kube, namespace, name)
    copies = kube.get(
        f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets",
        labelSelector=f"imagewarm.io/pull-secret-of={namespace}.corp-registry",
    )
    [copy] = copies["items"]
    assert copy["data"] == {".dockerconfigjson": config}


def test_where_pods_run_example(kube: Kube, namespace: str, fake_nodes: FakeNodes) -> None:
    runs, idle = fake_nodes.create(), fake_nodes.create()
    wait_for("NodeImages", lambda: node_image(kube, runs) and node_image(kube, idle))
    for pod_name, node, component in (("api", runs, "api"), ("web", idle, "frontend")):
        kube.create(
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "labels": {
                        "app.kubernetes.io/name": "payments-api",
                        "app.kubernetes.io/component": component,
                    },
                },
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "c", "image": "registry.example.com/payments/api:2.9"}],
                },
            },
        )
    name = apply_job(kube, namespace, "imagepulljob-where-pods-run.yaml")["metadata"]["name"]
    job = completed(kube, namespace, name)
    assert (job["status"]["desired"], job["status"]["succeeded"]) == (1, 1)


def test_image_list_example(kube: Kube, namespace: str, fake_nodes: FakeNodes) -> None:
    node = fake_nodes.create({"node.example.com/monitoring": "enabled"})
    wait_for("NodeImage", lambda: node_image(kube, node))
    name = apply_job(kube, namespace, "imagelistpulljob.yaml")["metadata"]["name"]
    listed = wait_for(
        "the list completed",
        lambda: (
            (j := job_object(kube, namespace, name, api.IMAGE_LIST_PULL_JOB))
            and (j.get("status") or {}).get("completionTime")
            and j
        ),
    )
    status = listed["status"]
    assert (status["desired"], status["completed"], status["succeeded"], status["failedImageStatuses"]) == (
        3,
        3,
        3,
        [],
    )
    children = kube.get(api.IMAGE_PULL_JOB.path(namespace=namespace))["items"]
    assert sorted(c["spec"]["image"] for c in children) == sorted(
        example("imagelistpulljob.yaml")["spec"]["images"]
    )
    assert all(c["status"]["desired"] == 1 and c["spec"]["pullPolicy"]["backoffLimit"] == 1 for c in children)


def test_sidecarset_example_prepulls_where_its_pods_run(
    kube: Kube, cluster: Cluster, namespace: str, fake_nodes: FakeNodes
) -> None:
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    cluster.kubectl("label", "namespace", namespace, "logs.example.com/collect=true")
    kube.create(
        f"/api/v1/namespaces/{namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "app", "labels": {"logs.example.com/ship": "true"}},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "registry.example.com/app:1"}],
            },
        },
    )
    sidecarset = kube.create(api.SIDECAR_SET.path(), example("sidecarset.yaml"))
    name = sidecarset["metadata"]["name"]
    try:

        def prepull() -> list[dict[str, Any]]:
            items = kube.get(api.IMAGE_PULL_JOB.path(namespace=RELEASE_NAMESPACE))["items"]
            return [
                j for j in items if (j["metadata"].get("labels") or {}).get("imagewarm.io/sidecarset") == name
            ]

        [job] = wait_for("the pre-pull job", prepull)
        assert job["spec"]["image"] == "registry.example.com/observability/log-shipper:2.4.1"
        assert job["spec"]["parallelism"] == 10 and job["spec"]["pullPolicy"]["timeoutSeconds"] == 300
        done = completed(kube, RELEASE_NAMESPACE, job["metadata"]["name"])
        assert (done["status"]["desired"], done["status"]["succeeded"]) == (1, 1)
    finally:
        kube.delete(api.SIDECAR_SET.path(name))


def test_nodeimage_task_example_is_run_by_the_agent(
    kube: Kube, cluster: Cluster, fake_nodes: FakeNodes
) -> None:
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    cluster.kubectl(
        "patch", "nodeimage", node, "--type=merge", "--patch-file", str(EXAMPLES / "nodeimage-task.yaml")
    )
    names = list(example("nodeimage-task.yaml")["spec"]["images"])

    def reported() -> bool:
        statuses = ((node_image(kube, node) or {}).get("status") or {}).get("imageStatuses") or {}
        return all(
            t["phase"] == "Succeeded"
            for n in names
            for t in (statuses.get(n) or {"tags": [{"phase": ""}]})["tags"]
        )

    wait_for("the task reported Succeeded", reported)


EXAMPLE_FILES: Callable[[], list[str]] = lambda: sorted(p.name for p in EXAMPLES.glob("*.yaml"))  # noqa: E731


def test_every_controller_example_is_covered() -> None:
    covered = {
        "imagepulljob-gpu-nodes.yaml",
        "imagepulljob-named-nodes.yaml",
        "imagepulljob-percent.yaml",
        "imagepulljob-release.yaml",
        "imagepulljob-base-image.yaml",
        "imagepulljob-private.yaml",
        "imagepulljob-where-pods-run.yaml",
        "imagelistpulljob.yaml",
        "sidecarset.yaml",
        "nodeimage-task.yaml",
        "cachedimage.yaml",  # the inventory side (CachedImage) is tested with its reconciler
    }
    assert set(EXAMPLE_FILES()) == covered
