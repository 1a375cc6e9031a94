"""A node's proxy is down, and pods still start: the real kubelet (CRI, containerd's config_path)
pulls a rewritten image through a peer proxy, listed by the node's proxy in containerd's hosts.toml
before it went down. The local nodes share the host's network, so the peer listens on 127.0.0.2 with
the node proxy's port, as DaemonSet pods on other nodes would on theirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagewarm.localcluster.cluster import Cluster
from imagewarm.localcluster.images import ImageBuilder, push
from imagewarm.localcluster.processes import free_port_on
from imagewarm.localcluster.registry import Registry, start_registry
from imagewarm.localcluster.stack import Stack
from imagewarm.reference import registry_segment
from tests.component.proxy_fixtures import ProxyProcess, start_proxy
from tests.e2e.test_pull_through import run_pod

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    registry = start_registry(tmp_path / "upstream")
    yield registry
    registry.stop()


@pytest.fixture
def port() -> int:
    return free_port_on("127.0.0.1", "127.0.0.2")


@pytest.fixture
def peer(upstream: Registry, port: int, tmp_path: Path) -> Iterator[ProxyProcess]:
    proxy = start_proxy(tmp_path / "peer", insecure=(upstream.host,), ip="127.0.0.2", port=port, workers=1)
    yield proxy
    proxy.stop()


def test_a_pod_starts_through_a_peer_while_its_nodes_proxy_is_down(
    cluster: Cluster, upstream: Registry, peer: ProxyProcess, port: int, tmp_path: Path
) -> None:
    image = ImageBuilder(tmp_path / "images").busybox(data_size=2 << 20)
    push(upstream, "team/fallback", "1", image)
    stack = Stack.start(
        cluster, [upstream], workdir=tmp_path / "stack", proxy_port=port, webhook=False,
        proxy_args=["--peer", peer.url],
    )  # fmt: skip
    try:
        hosts = cluster.nodes[0].containerd.certs_dir / stack.proxy_prefix / "hosts.toml"
        assert peer.url in hosts.read_text()
        stack.proxy.stop()  # the node's proxy is down (a crash, an upgrade)

        rewritten = f"{stack.proxy_prefix}/{registry_segment(upstream.host)}/team/fallback:1"
        pod = run_pod(cluster, rewritten, cluster.nodes[0].name)
    finally:
        stack.stop()

    assert pod["status"]["containerStatuses"][0]["image"].endswith("team/fallback:1")
    assert peer.metric("imagewarm_proxy_requests_total", route="manifest", status="200") >= 1
    # What the node lacked (busybox's own layer may be there from other pods) came through the peer,
    # which fetched each blob upstream once.
    fetched = upstream.blob_gets("team/fallback")
    assert fetched and len(fetched) == len(set(fetched)) and set(fetched) <= {b.digest for b in image.blobs}
    assert peer.metric("imagewarm_proxy_requests_total", route="blob", status="200") >= len(fetched)
