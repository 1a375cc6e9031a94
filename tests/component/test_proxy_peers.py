"""Peer fetching: a node's proxy asks other nodes' proxies (`--peer`) for a blob it misses before the
upstream. Real proxies and a real docker-registry; the upstream's access log shows who fetched what."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from imagewarm.reference import registry_segment
from localcluster.images import push
from localcluster.processes import free_ports
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def blob_url(proxy, registry, repository: str, digest: str) -> str:
    return f"{proxy.url}/v2/{registry_segment(registry.host)}/{repository}/blobs/{digest}"


def test_a_miss_is_served_from_a_peer_that_has_the_blob_not_from_the_upstream(
    registry, images, proxy_factory
):
    image = images.synthetic(layers=1, layer_size=3 << 20, seed=80)
    push(registry, "peer/app", "v1", image)
    layer = image.layers[0]
    neighbour = proxy_factory(insecure=(registry.host,), workers=1)
    assert requests.get(blob_url(neighbour, registry, "peer/app", layer.digest), timeout=30).ok
    assert len(registry.blob_gets("peer/app")) == 1
    new_node = proxy_factory(insecure=(registry.host,), workers=1, extra=("--peer", neighbour.url))

    got = requests.get(blob_url(new_node, registry, "peer/app", layer.digest), timeout=30)

    assert got.status_code == 200 and got.content == layer.read_bytes()
    assert got.headers["X-Imagewarm-Cache"] == "miss"  # new to this node, cached now
    assert len(registry.blob_gets("peer/app")) == 1  # the upstream served it once, to the neighbour
    assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="hit") == 1
    assert new_node.metric("imagewarm_proxy_upstream_bytes_total", registry="peers") == layer.size
    again = requests.get(blob_url(new_node, registry, "peer/app", layer.digest), timeout=30)
    assert again.headers["X-Imagewarm-Cache"] == "hit" and again.content == layer.read_bytes()


def test_peers_without_the_blob_or_down_leave_the_miss_to_the_upstream(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=1 << 20, seed=81)
    push(registry, "peer/cold", "v1", image)
    layer = image.layers[0]
    empty = proxy_factory(insecure=(registry.host,), workers=1)
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    new_node = proxy_factory(
        insecure=(registry.host,), workers=1, extra=("--peer", down, "--peer", empty.url)
    )

    got = requests.get(blob_url(new_node, registry, "peer/cold", layer.digest), timeout=30)

    assert got.status_code == 200 and got.content == layer.read_bytes()
    # Only the new node's fetch: the empty peer fetched nothing.
    assert len(registry.blob_gets("peer/cold")) == 1
    assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="unreachable") == 1
    assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="miss") == 1


def test_a_peer_request_is_answered_from_the_cache_only(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=500_000, seed=82)
    push(registry, "peer/only", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    url = blob_url(proxy, registry, "peer/only", image.layers[0].digest)

    asked = requests.get(url, headers={"X-Imagewarm-Peer": "1"}, timeout=30)

    assert asked.status_code == 404 and asked.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert len(registry.blob_gets("peer/only")) == 0


def test_peers_do_not_leak_private_blobs(auth_registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=500_000, seed=83)
    push(auth_registry, "peer/private", "v1", image)
    layer = image.layers[0]
    creds = (auth_registry.username, auth_registry.password)
    neighbour = proxy_factory(insecure=(auth_registry.host,), workers=1)
    assert requests.get(
        blob_url(neighbour, auth_registry, "peer/private", layer.digest), auth=creds, timeout=30
    ).ok
    new_node = proxy_factory(insecure=(auth_registry.host,), workers=1, extra=("--peer", neighbour.url))
    url = blob_url(new_node, auth_registry, "peer/private", layer.digest)

    # Anonymous: refused before any peer is asked; and the neighbour refuses a peer request without them.
    assert requests.get(url, timeout=30).status_code == 401
    direct = blob_url(neighbour, auth_registry, "peer/private", layer.digest)
    assert requests.get(direct, headers={"X-Imagewarm-Peer": "1"}, timeout=30).status_code == 401
    assert new_node.metric("imagewarm_proxy_peer_fetches_total") == 0

    # With credentials: served from the neighbour, which checked them too.
    got = requests.get(url, auth=creds, timeout=30)
    assert got.status_code == 200 and got.content == layer.read_bytes()
    assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="hit") == 1


def test_with_the_upstream_down_a_new_node_still_gets_a_public_blob_from_a_peer(
    registry_factory, images, proxy_factory
):
    upstream = registry_factory()
    image = images.synthetic(layers=1, layer_size=1 << 20, seed=84)
    push(upstream, "peer/offline", "v1", image)
    layer = image.layers[0]
    neighbour = proxy_factory(insecure=(upstream.host,), workers=1)
    assert requests.get(blob_url(neighbour, upstream, "peer/offline", layer.digest), timeout=30).ok
    peering = ("--peer", neighbour.url, "--retries", "0")
    new_node = proxy_factory(insecure=(upstream.host,), workers=1, extra=peering)
    upstream.stop()

    got = requests.get(blob_url(new_node, upstream, "peer/offline", layer.digest), timeout=60)

    # The new node cannot ask the upstream who may read it; the neighbour knows the repository is public.
    assert got.status_code == 200 and got.content == layer.read_bytes()
    assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="hit") == 1


class _LyingPeer(BaseHTTPRequestHandler):
    """A peer that claims every blob and sends the right number of wrong bytes."""

    served = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        size = int(self.server.size)  # type: ignore[attr-defined]
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(b"\0" * size)


def test_a_peer_sending_bytes_that_do_not_verify_fails_one_transfer_then_is_set_aside(
    registry, images, proxy_factory
):
    image = images.synthetic(layers=1, layer_size=1 << 20, seed=85)
    push(registry, "peer/liar", "v1", image)
    layer = image.layers[0]
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _LyingPeer)
    liar.size = layer.size  # type: ignore[attr-defined]
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        peering = ("--peer", f"http://127.0.0.1:{liar.server_address[1]}")
        new_node = proxy_factory(insecure=(registry.host,), workers=1, extra=peering)
        url = blob_url(new_node, registry, "peer/liar", layer.digest)

        # The wrong bytes never pass as the blob: the proxy streams them while it verifies, holds the
        # last chunk back, and on the mismatch drops the connection short of Content-Length, so the
        # client sees a broken transfer (never a clean 200) and nothing is cached.
        first = requests.get(url, timeout=30, stream=True)
        assert first.status_code == 200 and first.headers["Content-Length"] == str(layer.size)
        assert first.headers["X-Imagewarm-Cache"] == "miss"
        received = 0
        with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
            for chunk in first.iter_content(1 << 16):
                received += len(chunk)
        assert 0 <= received < layer.size
        assert not [path for path in Layout(new_node.cache_dir).blobs_dir.rglob("*") if path.is_file()]
        assert new_node.metric("imagewarm_proxy_peer_fetches_total", result="failed") == 1

        # The next pull skips that peer and gets the real blob from the upstream.
        second = requests.get(url, timeout=30)
        assert second.status_code == 200 and second.content == layer.read_bytes()
        assert _LyingPeer.served == 1
        assert len(registry.blob_gets("peer/liar")) == 1
    finally:
        liar.shutdown()
