"""`imagewarm proxy --peers-from NS/SVC` against a real API server: the peers are the ready endpoints of
the Service's EndpointSlices, followed by a watch. Proxies run on the host, bound to node 1's bridge
address (the API server refuses loopback endpoint addresses), behind a selector-less Service whose
EndpointSlice the test writes by hand; the upstream is a real docker-registry whose log shows who
fetched what."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from imagewarm.reference import registry_segment
from localcluster.cluster import Cluster
from localcluster.images import push
from tests.component import proxy_fixtures

pytestmark = pytest.mark.e2e
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

SERVICE = "imagewarm-proxy"


def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def blob_url(proxy, registry, repository: str, digest: str) -> str:
    return f"{proxy.url}/v2/{registry_segment(registry.host)}/{repository}/blobs/{digest}"


def endpoint_slice(namespace: str, ip: str, port: int, *, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{SERVICE}-peers",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": SERVICE},
        },
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9100, "protocol": "TCP"}, {"name": "proxy", "port": port}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
    }


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"peers-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": name},
            "spec": {"ports": [{"name": "proxy", "port": 7439}]},
        },
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_a_new_proxy_finds_its_peers_through_the_services_endpointslices(
    cluster: Cluster, namespace: str, registry_factory, images, proxy_factory, tmp_path
):
    upstream = registry_factory()
    image = images.synthetic(layers=2, layer_size=1 << 20, seed=90)
    push(upstream, "peers/discovered", "v1", image)
    first, second = image.layers
    ip = cluster.nodes[0].ip
    neighbour = proxy_factory(insecure=(upstream.host,), workers=1, ip=ip)
    for layer in (first, second):
        assert requests.get(blob_url(neighbour, upstream, "peers/discovered", layer.digest), timeout=30).ok
    apply(cluster, endpoint_slice(namespace, ip, neighbour.port, ready=True))
    discovering = ("--peers-from", f"{namespace}/{SERVICE}", "--kubeconfig", str(cluster.kubeconfig))
    discovering += ("--containerd-hosts-dir", str(tmp_path / "certs.d"), "--proxy-prefix", "localhost:7439")
    hosts = tmp_path / "certs.d" / "localhost:7439" / "hosts.toml"
    neighbour_entry = f'[host."http://{ip}:{neighbour.port}"]'

    new_node = proxy_factory(insecure=(upstream.host,), workers=1, ip=ip, extra=discovering)
    try:
        eventually(lambda: new_node.metric("imagewarm_proxy_peers") == 1, "the neighbour to be discovered")

        got = requests.get(blob_url(new_node, upstream, "peers/discovered", first.digest), timeout=30)

        assert got.status_code == 200 and got.content == first.read_bytes()
        # Only the neighbour's fetch.
        assert len(upstream.blob_gets("peers/discovered", digest=first.digest)) == 1
        assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="hit") == 1
        assert "discovered peer set changed" in new_node.log_tail(200)
        # The runtime's fallback list follows the discovered peers.
        eventually(lambda: neighbour_entry in hosts.read_text(), "the neighbour in the runtime's hosts.toml")

        apply(cluster, endpoint_slice(namespace, ip, neighbour.port, ready=False))
        eventually(lambda: new_node.metric("imagewarm_proxy_peers") == 0, "the neighbour to be dropped")
        eventually(lambda: neighbour_entry not in hosts.read_text(), "the neighbour out of hosts.toml")
        # This proxy stays listed, first: at its own address, as it listens on one (nodes sharing a
        # network namespace cannot all listen on localhost:7439).
        assert hosts.read_text().index(f'[host."{new_node.url}"]') == hosts.read_text().index("[host.")

        # The neighbour has this blob cached too, but is no longer a peer: the upstream serves it.
        got = requests.get(blob_url(new_node, upstream, "peers/discovered", second.digest), timeout=30)

        assert got.status_code == 200 and got.content == second.read_bytes()
        assert len(upstream.blob_gets("peers/discovered", digest=second.digest)) == 2
        assert new_node.metric("imagewarm_proxy_peer_fetches_total") == 1  # the neighbour was not asked
    except BaseException:
        print(new_node.log_tail(100))
        raise
