"""ImageListPullJob -> one ImagePullJob per image, and SidecarSet -> pre-pull jobs, on the real
API server with the controller process and simulated node agents."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

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
    unique_image,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def running(controller: ControllerProcess, agents: tuple[AgentSim, Held]) -> None:
    """Every test here runs with the module's controller and simulated agents."""


def children(kube: Kube, namespace: str, list_name: str) -> dict[str, dict[str, Any]]:
    """image -> child ImagePullJob of the list job."""
    items = kube.get(api.IMAGE_PULL_JOB.path(namespace=namespace))["items"]
    return {
        j["spec"]["image"]: j
        for j in items
        if any(
            o["kind"] == "ImageListPullJob" and o["name"] == list_name
            for o in j["metadata"].get("ownerReferences") or []
        )
    }


def prepull_jobs(kube: Kube, sidecarset: str) -> list[dict[str, Any]]:
    items = kube.get(api.IMAGE_PULL_JOB.path(namespace=RELEASE_NAMESPACE))["items"]
    return [j for j in items if j["metadata"].get("labels", {}).get("imagewarm.io/sidecarset") == sidecarset]


def test_image_list_pull_job(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    held, held_repo = unique_image("held")
    failing, failing_repo = unique_image("failing")
    rules.held.add(held_repo)
    rules.failures[failing_repo] = "unauthorized: authentication required; give the job pullSecrets"
    body = {
        "apiVersion": api.api_version(), "kind": "ImageListPullJob", "metadata": {"name": "list"},
        "spec": {"images": [held, failing], "selector": {"names": [node]}, "parallelism": 1},
    }  # fmt: skip
    kube.create(api.IMAGE_LIST_PULL_JOB.path(namespace=namespace), body)
    kids = wait_for("two children", lambda: len(c := children(kube, namespace, "list")) == 2 and c)
    assert kids[held]["spec"]["selector"] == {"names": [node]}
    assert all(k["metadata"]["name"].startswith("list-") for k in kids.values())
    listed = wait_for(
        "failed image reported",
        lambda: (
            (j := job_object(kube, namespace, "list", api.IMAGE_LIST_PULL_JOB))
            and (j.get("status") or {}).get("failedImageStatuses")
            and j
        ),
    )
    [failed] = listed["status"]["failedImageStatuses"]
    assert failed["name"] == failing and "unauthorized" in failed["message"]
    assert (listed["status"]["desired"], listed["status"]["completed"], listed["status"]["active"]) == (
        2,
        1,
        1,
    )
    # A template edit reaches the unfinished child; an image leaving the list takes its job along.
    kube.patch(
        api.IMAGE_LIST_PULL_JOB.path("list", namespace),
        {"spec": {"images": [held], "pullPolicy": {"timeoutSeconds": 42}}},
    )
    wait_for("the removed image's job deleted", lambda: list(children(kube, namespace, "list")) == [held])
    wait_for(
        "template synced",
        lambda: children(kube, namespace, "list")[held]["spec"]["pullPolicy"]["timeoutSeconds"] == 42,
    )
    rules.held.discard(held_repo)
    done = wait_for(
        "list completed",
        lambda: (
            (j := job_object(kube, namespace, "list", api.IMAGE_LIST_PULL_JOB))
            and (j.get("status") or {}).get("completionTime")
            and j
        ),
    )
    status = done["status"]
    assert (status["desired"], status["completed"], status["succeeded"], status["active"]) == (1, 1, 1, 0)
    assert status["failedImageStatuses"] == []


def test_sidecarset_prepulls_its_images_on_the_nodes_of_its_pods_in_every_namespace(
    kube: Kube, cluster: Cluster, namespaces: Callable[[], str], fake_nodes: FakeNodes
) -> None:
    a, b, c = fake_nodes.create(), fake_nodes.create(), fake_nodes.create()
    wait_for("NodeImages", lambda: all(node_image(kube, n) for n in (a, b, c)))
    team_x, team_y, other = namespaces(), namespaces(), namespaces()
    for ns in (team_x, team_y):
        cluster.kubectl("label", "namespace", ns, f"team={team_x}")
    for ns, node, labels in (
        (team_x, a, {"app": "web"}),
        (team_y, b, {"app": "web"}),
        (other, c, {"app": "web"}),
    ):
        pod = {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.example.com/web:1"}]},
        }  # fmt: skip
        kube.create(f"/api/v1/namespaces/{ns}/pods", pod)
    first, first_repo = unique_image("sidecar")
    name = f"logs-{team_x}"
    sidecarset = {
        "apiVersion": api.api_version(), "kind": "SidecarSet",
        "metadata": {"name": name, "annotations": {api.PREDOWNLOAD_PARALLELISM_ANNOTATION: "2",
                                                   api.PREDOWNLOAD_TIMEOUT_ANNOTATION: "120"}},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "namespaceSelector": {"matchLabels": {"team": team_x}},
                 "containers": [{"name": "log", "image": first}]},
    }  # fmt: skip
    created = kube.create(api.SIDECAR_SET.path(), sidecarset)
    try:
        jobs = wait_for("pre-pull job", lambda: prepull_jobs(kube, name))
        [job] = jobs
        assert job["spec"]["image"] == first and job["spec"]["parallelism"] == 2
        assert job["spec"]["pullPolicy"]["timeoutSeconds"] == 120
        assert job["spec"]["completionPolicy"] == {"type": "Always", "ttlSecondsAfterFinished": 600}
        [owner] = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("SidecarSet", created["metadata"]["uid"])
        done = wait_for(
            "pre-pull completed",
            lambda: (
                condition(j := job_object(kube, RELEASE_NAMESPACE, job["metadata"]["name"]), "Complete") and j
            ),
        )
        assert done["status"]["desired"] == 2, "the nodes of the selected pods in both team namespaces"
        assert done["status"]["succeeded"] == 2
        # An image change pre-pulls the new image; the old image's job is left as it is.
        second, _ = unique_image("sidecar")
        kube.patch(api.SIDECAR_SET.path(name), {"spec": {"containers": [{"name": "log", "image": second}]}})
        wait_for(
            "a job for the new image",
            lambda: {j["spec"]["image"] for j in prepull_jobs(kube, name)} == {first, second},
        )

        def recorded() -> Any:
            annotations = kube.get(api.SIDECAR_SET.path(name))["metadata"].get("annotations") or {}
            return json.loads(annotations.get("imagewarm.io/prepulled-images", "[]"))

        wait_for("the pre-pulled images recorded", lambda: recorded() == [second])
        assert tasks_of(kube, first_repo) == {}, "the finished job's tasks were compacted"
    finally:
        kube.delete(api.SIDECAR_SET.path(name))
