"""The controller on the real API server: NodeImages for Nodes, ImagePullJobs expanded into
NodeImage tasks, completed by simulated node agents that write status through the API exactly
as docs/DESIGN.md says (localcluster/agentsim.py; the real agent is tested with the proxy)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from imagewarm import api
from imagewarm.informer import Informer
from imagewarm.kube import Kube
from localcluster.agentsim import AgentSim
from localcluster.cluster import Cluster
from tests.fixtures.controller import (
    RELEASE_NAMESPACE,
    ControllerProcess,
    FakeNodes,
    Held,
    condition,
    create_job,
    dumps,
    events_for,
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


def finished(kube: Kube, namespace: str, name: str, kind: str = "Complete") -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        f"job {namespace}/{name} {kind}",
        lambda: (j := job_object(kube, namespace, name)) is not None and condition(j, kind) and j,
    )


# --- Node -> NodeImage -------------------------------------------------------------------------


def test_a_node_image_per_node_with_labels_synced_and_deleted_with_the_node(
    kube: Kube, cluster: Cluster, fake_nodes: FakeNodes
) -> None:
    for real in ("iw-node-1", "iw-node-2"):
        wait_for(f"NodeImage {real}", lambda r=real: node_image(kube, r))
    name = fake_nodes.create({"pool": "a"})
    created = wait_for("the new node's NodeImage", lambda: node_image(kube, name))
    assert created["metadata"]["labels"]["pool"] == "a"
    [owner] = created["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("Node", name)
    cluster.kubectl("label", "node", name, "pool=b", "zone=z1", "--overwrite")
    wait_for(
        "labels synced",
        lambda: (
            ((node_image(kube, name) or {}).get("metadata", {}).get("labels") or {}).get("zone") == "z1"
            and node_image(kube, name)["metadata"]["labels"]["pool"] == "b"
        ),  # type: ignore[index]
    )
    cluster.kubectl("label", "node", name, "zone-")
    wait_for("label removed", lambda: "zone" not in (node_image(kube, name) or {})["metadata"]["labels"])
    fake_nodes.delete(name)
    wait_for("NodeImage deleted with its Node", lambda: node_image(kube, name) is None)


# --- ImagePullJob ------------------------------------------------------------------------------


def test_a_job_over_every_node_completes_and_its_tasks_are_compacted(kube: Kube, namespace: str) -> None:
    image, name = unique_image()
    nodes = sorted(n["metadata"]["name"] for n in kube.get("/api/v1/nodes")["items"])
    create_job(kube, namespace, "all", image=image, parallelism="100%")
    job = finished(kube, namespace, "all")
    status = job["status"]
    assert (status["desired"], status["succeeded"], status["failed"], status["active"]) == (
        len(nodes), len(nodes), 0, 0
    )  # fmt: skip
    assert status["message"] == f"{len(nodes)}/{len(nodes)} nodes succeeded"
    assert status["startTime"] and status["completionTime"]
    assert condition(job, "Complete")["reason"] == "AllNodesSucceeded"  # type: ignore[index]
    assert "imagewarm.io/nodeimage-tasks" in job["metadata"]["finalizers"]
    reasons = wait_for(
        "events",
        lambda: {e["reason"] for e in events_for(kube, namespace, "all")} >= {"JobStarted", "JobCompleted"},
    )
    assert reasons
    # The finished job's tasks leave the NodeImages (they would grow with every job otherwise).
    wait_for("tasks removed after completion", lambda: tasks_of(kube, name) == {})
    assert job_object(kube, namespace, "all")["status"]["succeeded"] == len(nodes)  # type: ignore[index]


def test_selector_by_names_labels_and_pods(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    a = fake_nodes.create({"pool": "warm"})
    b = fake_nodes.create({"pool": "warm"})
    c = fake_nodes.create({"pool": "cold"})
    by_names, names_repo = unique_image("names")
    by_labels, labels_repo = unique_image("labels")
    by_pods, pods_repo = unique_image("pods")
    for repo in (names_repo, labels_repo, pods_repo):
        rules.held.add(repo)  # tasks stay so the targets can be read off the NodeImages
    wait_for("NodeImages", lambda: all(node_image(kube, n) for n in (a, b, c)))
    create_job(
        kube, namespace, "names", image=by_names, parallelism=10, selector={"names": [a, c, "no-such-node"]}
    )
    warm = {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["warm"]}]}
    create_job(kube, namespace, "labels", image=by_labels, parallelism=10, selector=warm)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": b, "containers": [{"name": "c", "image": "registry.example.com/web:1"}]},
    }  # fmt: skip
    kube.create(f"/api/v1/namespaces/{namespace}/pods", pod)
    other = {
        **pod,
        "metadata": {"name": "other", "labels": {"app": "other"}},
        "spec": {**pod["spec"], "nodeName": c},
    }
    kube.create(f"/api/v1/namespaces/{namespace}/pods", other)
    create_job(
        kube, namespace, "pods", image=by_pods, parallelism=10, podSelector={"matchLabels": {"app": "web"}}
    )
    wait_for("tasks by names", lambda: set(tasks_of(kube, names_repo)) == {a, c})
    wait_for("tasks by labels", lambda: set(tasks_of(kube, labels_repo)) == {a, b})
    wait_for("tasks by pods", lambda: set(tasks_of(kube, pods_repo)) == {b})
    assert job_object(kube, namespace, "names")["status"]["desired"] == 2  # type: ignore[index]
    # Selector edit: the job follows the new selector (kruise#2221) and releases the old node.
    kube.patch(
        api.IMAGE_PULL_JOB.path("labels", namespace),
        {"spec": {"selector": {"matchExpressions": None, "matchLabels": {"pool": "cold"}}}},
    )
    wait_for("tasks follow the edited selector", lambda: set(tasks_of(kube, labels_repo)) == {c})
    # A matching pod on another node: that node is a target too.
    kube.patch(f"/api/v1/namespaces/{namespace}/pods/other", {"metadata": {"labels": {"app": "web"}}})
    wait_for("pod label change reaches the job", lambda: set(tasks_of(kube, pods_repo)) == {b, c})
    for repo in (names_repo, labels_repo, pods_repo):
        rules.held.discard(repo)
    finished(kube, namespace, "pods")


def test_parallelism_one_never_runs_two_nodes_at_once(
    kube: Kube, namespace: str, fake_nodes: FakeNodes
) -> None:
    nodes = [fake_nodes.create({"group": namespace}) for _ in range(4)]
    wait_for("NodeImages", lambda: all(node_image(kube, n) for n in nodes))
    image, repo = unique_image("serial")
    active: dict[str, bool] = {}
    most = [0]
    lock = threading.Lock()

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        entry = ((obj.get("spec") or {}).get("images") or {}).get(repo)
        statuses = ((obj.get("status") or {}).get("imageStatuses") or {}).get(repo) or {}
        done = {t["tag"]: t for t in statuses.get("tags") or [] if t.get("phase") in ("Succeeded", "Failed")}
        running = (
            bool(entry)
            and kind != "DELETED"
            and not all(
                t["tag"] in done and done[t["tag"]].get("version", 0) >= t.get("version", 0)
                for t in entry["tags"]
            )
        )
        with lock:
            active[obj["metadata"]["name"]] = running
            most[0] = max(most[0], sum(active.values()))

    watcher = Informer(kube, api.NODE_IMAGE.path(), handlers=(on_event,)).start()
    try:
        watcher.wait_synced(30)
        create_job(
            kube,
            namespace,
            "serial",
            image=image,
            parallelism=1,
            selector={"matchLabels": {"group": namespace}},
        )
        job = finished(kube, namespace, "serial")
    finally:
        watcher.stop(0.1)
    assert job["status"]["succeeded"] == 4
    assert most[0] == 1, f"{most[0]} nodes pulled at once under parallelism 1"


def test_parallelism_zero_pauses_and_percent_resumes(
    kube: Kube, namespace: str, fake_nodes: FakeNodes
) -> None:
    nodes = [fake_nodes.create({"group": namespace}) for _ in range(3)]
    wait_for("NodeImages", lambda: all(node_image(kube, n) for n in nodes))
    image, repo = unique_image("paused")
    create_job(
        kube, namespace, "paused", image=image, parallelism=0, selector={"matchLabels": {"group": namespace}}
    )
    job = wait_for(
        "paused status",
        lambda: (
            (j := job_object(kube, namespace, "paused")) and (j.get("status") or {}).get("desired") == 3 and j
        ),
    )
    assert "paused" in job["status"]["message"] and job["status"]["active"] == 0
    assert tasks_of(kube, repo) == {}
    kube.patch(api.IMAGE_PULL_JOB.path("paused", namespace), {"spec": {"parallelism": "50%"}})
    job = finished(kube, namespace, "paused")
    assert job["status"]["succeeded"] == 3


def test_spec_edit_reaches_existing_tasks_and_failures_are_reported(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    a, b = fake_nodes.create(), fake_nodes.create()
    wait_for("NodeImages", lambda: node_image(kube, a) and node_image(kube, b))
    image, repo = unique_image("edit")
    rules.held.add(repo)
    rules.failures[f"{b}/{repo}"] = (
        "manifest unknown: tag 1 not found upstream after 3 attempts; check the image name"
    )
    create_job(kube, namespace, "edit", image=image, parallelism=2, selector={"names": [a, b]},
               pullPolicy={"backoffLimit": 1, "timeoutSeconds": 600})  # fmt: skip
    wait_for("tasks", lambda: len(tasks_of(kube, repo)) == 2)
    kube.patch(
        api.IMAGE_PULL_JOB.path("edit", namespace),
        {"spec": {"pullPolicy": {"backoffLimit": 5, "timeoutSeconds": 30}}},
    )
    wait_for(
        "edited pull policy on the existing tasks",
        lambda: (
            all(
                e["tags"][0]["pullPolicy"] == {"backoffLimit": 5, "timeoutSeconds": 30}
                for e in tasks_of(kube, repo).values()
            )
            and len(tasks_of(kube, repo)) == 2
        ),
    )
    rules.held.discard(repo)
    job = finished(kube, namespace, "edit", "Failed")
    status = job["status"]
    assert (status["succeeded"], status["failed"], status["failedNodes"]) == (1, 1, [b])
    assert f"{b}: manifest unknown" in status["message"]
    assert condition(job, "Failed")["reason"] == "NodesFailed"  # type: ignore[index]
    wait_for(
        "NodeFailed event",
        lambda: any(
            e["reason"] == "NodeFailed" and b in e["message"] for e in events_for(kube, namespace, "edit")
        ),
    )


def test_deadline_fails_the_remaining_nodes_and_ttl_deletes_the_job(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    image, repo = unique_image("slow")
    rules.held.add(repo)
    policy = {"type": "Always", "activeDeadlineSeconds": 3, "ttlSecondsAfterFinished": 4}
    create_job(kube, namespace, "slow", image=image, selector={"names": [node]}, completionPolicy=policy)
    job = finished(kube, namespace, "slow", "Failed")
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    assert job["status"]["failedNodes"] == [node]
    assert "activeDeadlineSeconds (3s) passed" in job["status"]["message"]
    wait_for("tasks removed", lambda: tasks_of(kube, repo) == {})
    wait_for("job deleted after its TTL", lambda: job_object(kube, namespace, "slow") is None)
    rules.held.discard(repo)


def test_never_job_repulls_and_reaches_nodes_that_join_later(
    kube: Kube, namespace: str, fake_nodes: FakeNodes
) -> None:
    first = fake_nodes.create({"group": namespace})
    wait_for("NodeImage", lambda: node_image(kube, first))
    image, repo = unique_image("never")
    group = {"matchLabels": {"group": namespace}}
    create_job(
        kube,
        namespace,
        "never",
        image=image,
        parallelism=5,
        selector=group,
        completionPolicy={"type": "Never"},
    )
    wait_for(
        "first node succeeded",
        lambda: (job_object(kube, namespace, "never") or {}).get("status", {}).get("succeeded") == 1,
    )
    later = fake_nodes.create({"group": namespace})
    wait_for(
        "the joining node pulls too",
        lambda: (job_object(kube, namespace, "never") or {}).get("status", {}).get("succeeded") == 2,
    )
    job = job_object(kube, namespace, "never")
    assert condition(job, "Complete") is None and condition(job, "Failed") is None
    # --repull-period 20s: the task's version goes up and the node pulls again.
    wait_for(
        "a re-pull",
        lambda: tasks_of(kube, repo).get(first, {"tags": [{}]})["tags"][0].get("version", 0) >= 1,
        timeout=90,
    )
    assert later in tasks_of(kube, repo)


def test_two_jobs_share_a_task_and_deleting_one_keeps_the_other(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, agents: tuple[AgentSim, Held]
) -> None:
    _, rules = agents
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    image, repo = unique_image("shared")
    rules.held.add(repo)
    create_job(
        kube, namespace, "one", image=image, selector={"names": [node]}, pullPolicy={"timeoutSeconds": 100}
    )
    create_job(
        kube,
        namespace,
        "two",
        image=image,
        selector={"names": [node]},
        pullPolicy={"timeoutSeconds": 50, "backoffLimit": 7},
    )
    entry = wait_for(
        "one entry owned by both jobs",
        lambda: (e := tasks_of(kube, repo).get(node)) and len(e["tags"][0]["ownerReferences"]) == 2 and e,
    )
    [tag] = entry["tags"]
    assert sorted(r["name"] for r in tag["ownerReferences"]) == ["one", "two"]
    assert tag["pullPolicy"] == {"timeoutSeconds": 50, "backoffLimit": 7}, "the strictest of the owners"
    kube.delete(api.IMAGE_PULL_JOB.path("two", namespace))
    wait_for("job two gone (finalizer done)", lambda: job_object(kube, namespace, "two") is None)
    [tag] = tasks_of(kube, repo)[node]["tags"]
    assert [r["name"] for r in tag["ownerReferences"]] == ["one"]
    assert tag["pullPolicy"] == {"timeoutSeconds": 100, "backoffLimit": 3}
    kube.delete(api.IMAGE_PULL_JOB.path("one", namespace))
    wait_for("the last owner's deletion removes the task", lambda: tasks_of(kube, repo) == {})
    rules.held.discard(repo)


def test_invalid_spec_is_a_warning_and_a_status_message(kube: Kube, namespace: str) -> None:
    create_job(kube, namespace, "bad", image="registry.example.com/app:1",
               selector={"matchExpressions": [{"key": "pool", "operator": "In", "values": []}]})  # fmt: skip
    job = wait_for(
        "status message",
        lambda: (j := job_object(kube, namespace, "bad")) and (j.get("status") or {}).get("message") and j,
    )
    assert job["status"]["message"].startswith("invalid spec: spec.selector: operator In needs values")
    wait_for(
        "InvalidSpec event",
        lambda: [e for e in events_for(kube, namespace, "bad") if e["reason"] == "InvalidSpec"],
    )


def test_pull_secrets_are_copied_to_the_release_namespace_and_collected(
    kube: Kube,
    namespace: str,
    fake_nodes: FakeNodes,
    controller: ControllerProcess,
    agents: tuple[AgentSim, Held],
) -> None:
    import base64

    _, rules = agents
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    password = "s3cret-" + namespace
    config = {"auths": {"registry.example.com": {"username": "u", "password": password}}}
    data = base64.b64encode(dumps(config).encode()).decode()
    kube.create(f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": data},
    })  # fmt: skip
    image, repo = unique_image("private")
    rules.held.add(repo)
    create_job(kube, namespace, "private", image=image, selector={"names": [node]}, pullSecrets=["creds"])
    entry = wait_for("task with secrets", lambda: tasks_of(kube, repo).get(node))
    [ref] = entry["pullSecrets"]
    assert ref["namespace"] == RELEASE_NAMESPACE
    copy = kube.get(f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{ref['name']}")
    assert copy["data"] == {".dockerconfigjson": data} and copy["type"] == "kubernetes.io/dockerconfigjson"
    assert copy["metadata"]["labels"]["imagewarm.io/pull-secret-of"] == f"{namespace}.creds"
    version = copy["metadata"]["resourceVersion"]
    rules.held.discard(repo)
    finished(kube, namespace, "private")
    assert (
        kube.get(f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets/{ref['name']}")["metadata"][
            "resourceVersion"
        ]
        == version
    ), "no rewrite of an unchanged copy"
    kube.delete(api.IMAGE_PULL_JOB.path("private", namespace))
    wait_for(
        "copy collected with the job",
        lambda: (
            not [
                s
                for s in kube.get(f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets")["items"]
                if s["metadata"]["name"] == ref["name"]
            ]
        ),
    )
    everything = dumps(kube.get(api.NODE_IMAGE.path())) + controller.output()
    assert password not in everything and data not in everything


def test_image_pull_policy_always_pulls_again_where_another_job_already_pulled(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, controller: ControllerProcess
) -> None:
    node = fake_nodes.create()
    wait_for("NodeImage", lambda: node_image(kube, node))
    image, repo = unique_image("always")
    never = {"type": "Never"}
    create_job(kube, namespace, "keep", image=image, selector={"names": [node]}, completionPolicy=never)
    wait_for(
        "first pull",
        lambda: ((job_object(kube, namespace, "keep") or {}).get("status") or {}).get("succeeded") == 1,
    )
    assert tasks_of(kube, repo)[node]["tags"][0]["version"] == 0
    # IfNotPresent joins the task and takes its result; Always makes the agent resolve the tag again.
    create_job(kube, namespace, "same", image=image, selector={"names": [node]})
    assert finished(kube, namespace, "same")["status"]["succeeded"] == 1
    assert tasks_of(kube, repo)[node]["tags"][0]["version"] == 0, "IfNotPresent: no second pull"
    create_job(kube, namespace, "fresh", image=image, selector={"names": [node]}, imagePullPolicy="Always")
    assert finished(kube, namespace, "fresh")["status"]["succeeded"] == 1
    assert tasks_of(kube, repo)[node]["tags"][0]["version"] == 1
    metrics = controller.metrics()
    assert 'imagewarm_controller_reconciles_total{kind="imagepulljobs",result="success"}' in metrics
    assert 'imagewarm_controller_api_requests_total{code="200",verb="patch"}' in metrics
    assert "imagewarm_controller_leader 1.0" in metrics
    assert 'imagewarm_controller_tasks{phase="Succeeded"}' in metrics
