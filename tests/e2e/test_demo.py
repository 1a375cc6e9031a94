"""`imagewarm demo`'s steps on the session cluster (the demo's own cluster could not start beside it:
one local cluster per machine), with a small image: every row of its `pulls` table, the pod started
through the peer proxy while the node proxy is down among them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from localcluster.cluster import Cluster
from localcluster.demo import SERVED_BY_PEER, Demo, steps
from localcluster.registry import start_registry

pytestmark = pytest.mark.e2e


def test_the_demo_steps_pull_from_the_cache_through_a_peer_and_with_the_upstream_down(
    cluster: Cluster, tmp_path: Path
) -> None:
    upstream = start_registry(tmp_path / "upstream")
    lines: list[str] = []
    try:
        with ExitStack() as teardown:
            outcome = steps(cluster, upstream, Demo(out=lines.append), teardown, image_size=5 << 20)
    finally:
        upstream.stop()
        _remove_demo_pods_and_images(cluster)
    progress = "\n".join(lines)
    assert outcome.ok, progress

    first, last = cluster.nodes[0].name, cluster.nodes[-1].name
    assert [row[:3] for row in outcome.pulls] == [
        ("demo-1", first, "cache"),
        ("demo-2", last, "cache"),
        ("demo-peer", last, SERVED_BY_PEER),
        ("demo-offline", first, "cache, upstream down"),
    ], progress
    # The kubelet really pulled each image (its Pulled event), none was left on the node.
    assert all(row[3].endswith("s") for row in outcome.pulls), outcome.pulls

    facts = dict(outcome.facts)
    assert facts["pod with the node proxy down"].startswith(f"Running: hello from {last}"), facts
    served, fetched = facts["peer proxy (node proxy down)"].split(": ", 1)[1].split(", ")
    assert int(served.split()[0]) >= 1 and int(fetched.split()[0]) >= 1, facts
    assert facts["upstream blob GETs for 2 pods"] == "0", facts
    assert facts["pod with the upstream down"].startswith(f"Running: hello from {first}"), facts


def _remove_demo_pods_and_images(cluster: Cluster) -> None:
    """Leave the session cluster as found: the local images are deterministic, so a later test's
    image could otherwise share this one's blobs and find them already on a node."""
    pods = ("demo-1", "demo-2", "demo-peer", "demo-offline")
    cluster.kubectl("delete", "pod", *pods, "--ignore-not-found", "--wait=true", "--grace-period=1")
    for node in cluster.nodes:
        listing = node.containerd.ctr("images", "ls", namespace="k8s.io").stdout.splitlines()[1:]
        rows = [line.split() for line in listing]
        digests = {row[2] for row in rows if "/demo/app:" in row[0]}
        names = [row[0] for row in rows if row[2] in digests]
        if names:
            node.containerd.ctr("images", "rm", "--sync", *names, namespace="k8s.io")
