"""The runtime falls back to a peer proxy while the node's own proxy is down (`--containerd-hosts-dir`):
the proxy writes containerd's hosts.toml for the name pods pull from, itself first, then its peers;
a real containerd pulls through it, and after the proxy is killed (SIGKILL: a crash) pulls of
rewritten images still succeed, through the peer. As in a cluster, both proxies listen on the same
port (here on 127.0.0.1 and 127.0.0.2), so the peer takes `?ns=127.0.0.1:PORT` as its own name."""

from __future__ import annotations

import signal

import pytest

from imagewarm.reference import registry_segment
from localcluster.images import push
from localcluster.processes import free_port_on
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def manifest_gets(proxy) -> float:
    return proxy.metric("imagewarm_proxy_requests_total", route="manifest", status="200")


def test_containerd_falls_back_to_a_peer_while_the_nodes_proxy_is_down(
    containerd, registry, images, proxy_factory
):
    first, second = images.busybox(), images.synthetic(layers=2, layer_size=300_000, seed=97)
    push(registry, "ctr/fallback", "v1", first)
    push(registry, "ctr/fallback", "v2", second)
    port = free_port_on("127.0.0.1", "127.0.0.2")
    peer = proxy_factory(insecure=(registry.host,), workers=1, ip="127.0.0.2", port=port)
    name = f"127.0.0.1:{port}"
    local = proxy_factory(
        insecure=(registry.host,),
        workers=2,
        port=port,
        extra=(
            *("--peer", peer.url, "--containerd-hosts-dir", str(containerd.certs_dir)),
            *("--proxy-prefix", name),
        ),
    )

    hosts = containerd.certs_dir / name / "hosts.toml"
    text = hosts.read_text()
    assert text.index(f'[host."http://{name}"]') < text.index(f'[host."{peer.url}"]'), text
    assert local.metric("imagewarm_proxy_runtime_fallback_peers") == 1
    assert local.metric("imagewarm_proxy_runtime_hosts_write_failures_total") == 0
    rewritten = f"{name}/{registry_segment(registry.host)}/ctr/fallback"

    # Up: the node's own proxy serves, the peer is not asked.
    containerd.pull(f"{rewritten}:v1")
    assert manifest_gets(local) >= 1
    assert manifest_gets(peer) == 0

    local.stop(signal.SIGKILL)
    containerd.pull(f"{rewritten}:v2")  # would fail with "connection refused" without the fallback

    assert manifest_gets(peer) >= 1
    assert hosts.read_text() == text  # the file outlives the proxy that wrote it
    assert sorted(registry.blob_gets("ctr/fallback")) == sorted(b.digest for b in first.blobs + second.blobs)
    listed = containerd.ctr("images", "ls").stdout
    assert f"{rewritten}:v1" in listed and f"{rewritten}:v2" in listed
