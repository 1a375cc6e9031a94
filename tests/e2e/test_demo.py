"""`imagewarm demo`'s steps on the session cluster (the demo's own cluster could not start beside it:
one local cluster per machine), with small images: the product image installed with helm, pods
pulled cold, warmed by an ImagePullJob, from the cache, through a peer while their node proxy is
down, and with the upstream stopped; a SidecarSet's image pre-pulled before a pod gets it injected.
The assertions read the cluster itself (pods, NodeImage statuses, the upstream's log), not only what
the demo printed."""

from __future__ import annotations

import datetime
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from localcluster.chart import NAMESPACE as RELEASE_NAMESPACE
from localcluster.cluster import Cluster
from localcluster.demo import summary
from localcluster.demosteps import NAMESPACE, Demo, steps
from localcluster.registry import start_registry

pytestmark = pytest.mark.e2e


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return result


def completed(tag: dict[str, Any]) -> datetime.datetime | None:
    """When a NodeImage status entry says its pull succeeded, or None."""
    if tag.get("phase") != "Succeeded" or not tag.get("completionTime"):
        return None
    return datetime.datetime.fromisoformat(tag["completionTime"].replace("Z", "+00:00"))


@pytest.mark.timeout(1500)  # with the session cluster's start, which may wait for the machine lock
def test_the_demo_steps_through_the_helm_installed_product(cluster: Cluster, tmp_path: Path) -> None:
    upstream = start_registry(tmp_path / "upstream")
    lines: list[str] = []
    first, second = cluster.nodes[0].name, cluster.nodes[1].name
    demo = Demo(out=lines.append)
    with ExitStack() as teardown:
        teardown.callback(upstream.stop)
        outcome = steps(cluster, upstream, demo, teardown, image_size=12 << 20, sidecar_size=3 << 20)
        progress = "\n".join(lines)
        print(progress)  # shown when the test fails

        # Every sample pod that is still there runs, the last two among them.
        pods = get(cluster, "pods", "-n", NAMESPACE)["items"]
        phases = {p["metadata"]["name"]: p["status"]["phase"] for p in pods}
        assert outcome.pod("peer").name in phases and outcome.pod("offline").name in phases, phases
        assert set(phases.values()) == {"Running"}, phases
        # The offline pod runs with the upstream stopped.
        assert not upstream.running
        offline = next(p for p in pods if p["metadata"]["name"] == outcome.pod("offline").name)
        assert offline["spec"]["nodeName"] == first
        assert offline["status"]["containerStatuses"][0]["ready"]

        # The SidecarSet's image was on both nodes (their agents said so: the NodeImage statuses the
        # step read before it created the pod) before the pod was created, and the pod got it.
        sidecar_pod = outcome.pod("sidecar")
        assert sidecar_pod.original["logger"].endswith("/demo/logger:1")
        assert set(outcome.prepulled) == {first, second}
        for node, tag in outcome.prepulled.items():
            done = completed(tag)
            assert done is not None and done <= sidecar_pod.created, (node, tag, sidecar_pod.created)
        # The pre-pull job finished without a failure. (Its tasks follow the pods it selects until it
        # finishes: the later steps replace the sample pods, so what the NodeImages say now depends
        # on when the job finished; the statuses above were read when it mattered.)
        logger = sidecar_pod.original["logger"]
        jobs = get(cluster, "imagepulljobs", "-n", RELEASE_NAMESPACE)["items"]
        [job] = [j for j in jobs if j["spec"]["image"] == logger]
        status = job.get("status") or {}
        assert status.get("completionTime") and not status.get("failed"), status
        assert status.get("succeeded") == status.get("desired") >= 1, status

    assert outcome.ok, progress
    assert [(p.step, p.node) for p in outcome.pods] == [
        ("cold", first),
        ("warm", second),
        ("sidecar", first),
        ("peer", second),
        ("offline", first),
    ], progress
    # Each pod's image was rewritten to the node proxy, the original kept in the annotation.
    for pod in outcome.pods:
        assert pod.images["app"].startswith("localhost:7439/") and pod.original["app"].endswith("/demo/app:1")
    # The kubelet really pulled every time (none found the image already on its node) but the
    # sidecar pod's app, whose node kept it.
    for step in ("cold", "warm", "peer", "offline"):
        assert outcome.pod(step).pulls["app"].endswith("s"), outcome.pod(step).pulls
    assert outcome.pod("sidecar").pulls["logger"].endswith("s")
    # Only the cold pull fetched blobs from the upstream; warm, sidecar and peer fetched none.
    assert outcome.pod("cold").upstream_blob_gets >= 1
    for step in ("warm", "sidecar", "peer"):
        assert outcome.pod(step).upstream_blob_gets == 0, step
    claims = dict(outcome.checks)
    peer_claim = next(c for c in claims if c.startswith(f"the pod on {second} was served by {first}'s proxy"))
    assert claims[peer_claim]
    facts = dict(outcome.facts)
    assert float(facts["hit ratio (bytes)"].rstrip("%")) > 50, facts
    assert "NAME" in outcome.views["nodeimages"] and first in outcome.views["nodeimages"], outcome.views
    assert "sample-warm" in outcome.views["imagepulljobs"], outcome.views
    assert "cold" in summary(outcome, demo)
