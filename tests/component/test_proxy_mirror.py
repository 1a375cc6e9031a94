"""Mirror mode (`--mirror-registry`): the proxy writes containerd's hosts.toml for an upstream registry,
itself first and the registry itself last, so a real containerd pulling an image by its own,
unrewritten name goes through the cache, and goes straight to the registry while the proxy is down."""

from __future__ import annotations

import signal
import tomllib

import pytest

from localcluster.images import push
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def test_containerd_pulls_an_unrewritten_image_through_the_mirror_then_from_the_registry_itself(
    containerd, registry_factory, images, proxy_factory
):
    upstream = registry_factory()
    first, second = images.synthetic(layers=2, layer_size=200_000, seed=131), images.busybox()
    push(upstream, "ctr/mirror", "v1", first)
    push(upstream, "ctr/mirror", "v2", second)
    proxy = proxy_factory(
        insecure=(upstream.host,),
        workers=2,
        extra=(
            *("--containerd-hosts-dir", str(containerd.certs_dir)),
            *("--mirror-registry", upstream.host),
        ),
    )

    hosts = containerd.certs_dir / upstream.host / "hosts.toml"
    parsed = tomllib.loads(hosts.read_text())
    # No peers here: the proxy (by the name pods pull from, as it listens on loopback), then the registry.
    assert list(parsed["host"]) == [f"http://localhost:{proxy.port}"]
    assert parsed["server"] == upstream.url

    containerd.pull(f"{upstream.host}/ctr/mirror:v1")
    mirrored = proxy.metric("imagewarm_proxy_requests_total", route="blob", status="200")
    assert mirrored == len(first.blobs), proxy.log_tail()
    assert proxy.metric("imagewarm_proxy_cache_miss_bytes_total", kind="blob") == sum(
        b.size for b in first.blobs
    )
    assert sorted(upstream.blob_gets("ctr/mirror")) == sorted(b.digest for b in first.blobs)

    # The proxy crashes: the runtime goes to the registry itself (the `server`), by itself.
    proxy.stop(signal.SIGKILL)
    containerd.pull(f"{upstream.host}/ctr/mirror:v2")
    assert sorted(upstream.blob_gets("ctr/mirror")) == sorted(b.digest for b in first.blobs + second.blobs)
    listed = containerd.ctr("images", "ls").stdout
    assert f"{upstream.host}/ctr/mirror:v1" in listed and f"{upstream.host}/ctr/mirror:v2" in listed


def test_a_mirrored_registry_must_be_an_upstream(tmp_path):
    with pytest.raises(RuntimeError, match="mirror only registries this proxy may fetch from"):
        proxy_fixtures.start_proxy(
            tmp_path,
            insecure=("127.0.0.1:1",),
            extra=("--containerd-hosts-dir", str(tmp_path / "certs.d"), "--mirror-registry", "ghcr.io"),
            port=1,
        )
