"""Two controller processes with leader election on the real API server: one reconciles, the
other waits; the leader killed with SIGKILL mid-job is replaced once its Lease expires, and the
new leader finishes the job without adding again a task that already succeeded."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
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
    job_object,
    node_image,
    unique_image,
    wait_for,
)

pytestmark = pytest.mark.e2e

LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NAMESPACE}/leases/imagewarm-controller"


@pytest.fixture
def replicas(cluster: Cluster, crds_installed: Cluster) -> Iterator[list[ControllerProcess]]:
    args = ("--leader-elect", "--leader-election-namespace", RELEASE_NAMESPACE)
    made = [ControllerProcess(cluster, *args, name=f"controller-{i}") for i in (1, 2)]
    for process in made:
        process.start(ready="")
    try:
        yield made
    finally:
        for process in made:
            process.stop()


def holder(kube: Kube) -> str:
    return str(kube.get(LEASE)["spec"].get("holderIdentity") or "")


def test_a_killed_leader_is_replaced_and_the_job_finishes_without_repeating_tasks(
    kube: Kube, namespace: str, fake_nodes: FakeNodes, replicas: list[ControllerProcess],
    agents: tuple[AgentSim, Held],
) -> None:  # fmt: skip
    sim, _ = agents
    sim.pull_seconds = 2.0
    nodes = [fake_nodes.create({"group": namespace}) for _ in range(4)]
    wait_for("a leader", lambda: any("reconciling" in p.output() for p in replicas))
    [leader] = [p for p in replicas if "reconciling" in p.output()]
    [standby] = [p for p in replicas if p is not leader]
    assert f"_{leader.daemon.pid}_" in holder(kube)
    assert "imagewarm_controller_leader 0.0" in standby.metrics()
    assert "imagewarm_controller_leader 1.0" in leader.metrics()
    wait_for("NodeImages", lambda: all(node_image(kube, n) for n in nodes))
    image, repo = unique_image("failover")
    added: Counter[str] = Counter()
    present: dict[str, bool] = {}
    bumped: list[str] = []
    lock = threading.Lock()

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        node = obj["metadata"]["name"]
        entry = ((obj.get("spec") or {}).get("images") or {}).get(repo) if kind != "DELETED" else None
        with lock:
            if entry and not present.get(node):
                added[node] += 1
            if entry and any(t.get("version", 0) > 0 for t in entry["tags"]):
                bumped.append(node)
            present[node] = bool(entry)

    watcher = Informer(kube, api.NODE_IMAGE.path(), handlers=(on_event,)).start()
    try:
        watcher.wait_synced(30)
        create_job(
            kube,
            namespace,
            "failover",
            image=image,
            parallelism=1,
            selector={"matchLabels": {"group": namespace}},
        )
        wait_for(
            "two nodes done",
            lambda: (
                ((job_object(kube, namespace, "failover") or {}).get("status") or {}).get("succeeded", 0) >= 2
            ),
        )
        os.kill(leader.daemon.pid, signal.SIGKILL)  # type: ignore[arg-type]
        wait_for("the standby takes over", lambda: "reconciling" in standby.output(), timeout=60)
        assert f"_{standby.daemon.pid}_" in holder(kube)
        job = wait_for(
            "job completed by the new leader",
            lambda: condition(j := job_object(kube, namespace, "failover"), "Complete") and j,
        )
        wait_for("tasks compacted", lambda: not any(present.get(n) for n in nodes))
    finally:
        watcher.stop(0.1)
        sim.pull_seconds = 0.3
    assert job["status"]["succeeded"] == 4
    assert {n: added[n] for n in nodes} == dict.fromkeys(nodes, 1), "a task was added twice"
    assert bumped == [], "no task was re-pulled"
    assert "imagewarm_controller_leader 1.0" in standby.metrics()
