"""A node's proxy is down, and pods still start: the real kubelet (CRI, containerd's config_path)
pulls a rewritten image through a peer proxy, listed by the node's proxy in containerd's hosts.toml
before it went down. The stack's peer listens on 127.0.0.2 with the node proxy's port, as DaemonSet
pods on other nodes would on theirs (the local nodes share the host's network)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagewarm.reference import registry_segment
from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry, start_registry
from localcluster.stack import Stack
from tests.e2e.test_pull_through import run_pod

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    registry = start_registry(tmp_path / "upstream")
    yield registry
    registry.stop()


def test_a_pod_starts_through_a_peer_while_its_nodes_proxy_is_down(
    cluster: Cluster, upstream: Registry, tmp_path: Path
) -> None:
    image = ImageBuilder(tmp_path / "images").busybox(data_size=2 << 20)
    push(upstream, "team/fallback", "1", image)
    stack = Stack.start(cluster, [upstream], workdir=tmp_path / "stack", webhook=False, peer=True)
    try:
        hosts = cluster.nodes[0].containerd.certs_dir / stack.proxy_prefix / "hosts.toml"
        assert stack.peer_url in hosts.read_text()
        stack.proxy.stop()  # the node's proxy is down (a crash, an upgrade)

        rewritten = f"{stack.proxy_prefix}/{registry_segment(upstream.host)}/team/fallback:1"
        pod = run_pod(cluster, rewritten, cluster.nodes[0].name)

        assert pod["status"]["containerStatuses"][0]["image"].endswith("team/fallback:1")
        assert stack.peer_metric("imagewarm_proxy_requests_total", route="manifest", status="200") >= 1
        # What the node lacked (busybox's own layer may be there from other pods) came through the
        # peer, which fetched each blob upstream once.
        fetched = upstream.blob_gets("team/fallback")
        assert fetched and len(fetched) == len(set(fetched))
        assert set(fetched) <= {b.digest for b in image.blobs}
        assert stack.peer_metric("imagewarm_proxy_requests_total", route="blob", status="200") >= len(fetched)
    finally:
        stack.stop()
