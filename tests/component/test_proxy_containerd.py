"""containerd 2.2 pulls through the proxy: mirror mode (hosts.toml, `?ns=`) and rewrite mode."""

from __future__ import annotations

import pytest

from localcluster.images import push
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def cached_blobs(proxy) -> set[str]:
    return {
        f"sha256:{path.name}" for path in (proxy.cache_dir / "blobs" / "sha256").rglob("*") if path.is_file()
    }


def test_containerd_pulls_through_the_mirror(containerd, registry, images, proxy_factory):
    image = images.busybox()
    push(registry, "ctr/mirror", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    containerd.set_hosts(registry.host, registry.url, mirrors=[proxy.url])

    containerd.pull(f"{registry.host}/ctr/mirror:v1")

    assert {b.digest for b in image.blobs} <= cached_blobs(proxy)
    assert proxy.metric("imagewarm_proxy_requests_total", route="manifest", status="200") >= 1
    assert sorted(registry.blob_gets("ctr/mirror")) == sorted(b.digest for b in image.blobs)


def test_containerd_pulls_a_rewritten_reference(containerd, registry, images, proxy_factory):
    image = images.busybox()
    digest = push(registry, "ctr/rewrite", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    segment = registry.host.replace(":", "_")

    containerd.pull(f"{proxy.host}/{segment}/ctr/rewrite:v1")
    containerd.pull(f"{proxy.host}/{segment}/ctr/rewrite@{digest}")

    listed = containerd.ctr("images", "ls").stdout
    assert digest in listed
    assert {b.digest for b in image.blobs} <= cached_blobs(proxy)
