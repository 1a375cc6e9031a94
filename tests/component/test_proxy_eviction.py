"""`--max-cache-bytes` on a real proxy: least recently used blobs go between the watermarks, a blob
being served stays, and the metrics count it; plus the metric names the proxy promises."""

from __future__ import annotations

import time

import pytest
import requests

from imagewarm.digest import Digest
from localcluster.images import push
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

MiB = 1 << 20


def wait_until(condition, timeout: float = 30, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.05)


def test_eviction_between_watermarks_keeps_a_blob_being_served(registry, images, proxy_factory):
    big_image = images.synthetic(layers=1, layer_size=24 * MiB, compressed=False, seed=51)
    big = big_image.layers[0]
    small = [images.synthetic(layers=1, layer_size=4 * MiB, compressed=False, seed=52 + i) for i in range(4)]
    push(registry, "evict/big", "v1", big_image)
    for i, image in enumerate(small):
        push(registry, f"evict/s{i}", "v1", image)
    layers = [image.layers[0] for image in small]
    three = big.size + sum(layer.size for layer in layers[:3])
    # Eviction starts above 0.9 * limit (the high watermark) and stops at 0.8 * limit (the low one):
    # with this limit, the big blob and three small ones are at the high watermark, a fourth is over,
    # and freeing two small ones gets under the low watermark.
    limit = int(three / 0.9) + 2
    assert big.size + 2 * layers[0].size <= 0.8 * limit < three
    proxy = proxy_factory(
        insecure=(registry.host,),
        workers=2,
        extra=("--max-cache-bytes", str(limit), "--eviction-interval", "0.2s"),
    )
    layout = Layout(proxy.cache_dir)

    def url(repository: str, digest: str) -> str:
        return f"{proxy.url}/v2/{registry.host}/{repository}/blobs/{digest}"

    def cached(digest: str) -> bool:
        return layout.blob(Digest.parse(digest)).exists()

    assert len(requests.get(url("evict/big", big.digest), timeout=60).content) == big.size
    wait_until(lambda: cached(big.digest))
    # A client reads the big blob from the cache slowly: the server is stuck mid-sendfile, holding it.
    reader = requests.get(url("evict/big", big.digest), stream=True, timeout=60)
    assert reader.raw.read(MiB) == big.path.read_bytes()[:MiB]

    layers = [image.layers[0] for image in small]
    for i, layer in enumerate(layers[:3]):  # up to the high watermark, not over it
        assert len(requests.get(url(f"evict/s{i}", layer.digest), timeout=60).content) == layer.size
        wait_until(lambda layer=layer: cached(layer.digest))
        time.sleep(0.05)  # distinct last-use times
    time.sleep(1)  # several eviction passes
    assert all(cached(layer.digest) for layer in layers[:3]) and cached(big.digest)
    assert proxy.metric("imagewarm_proxy_evictions_total") == 0

    assert len(requests.get(url("evict/s3", layers[3].digest), timeout=60).content) == layers[3].size
    # Over the high watermark: the oldest (the big blob) is in use and stays; s0 and s1 go.
    wait_until(lambda: not cached(layers[0].digest) and not cached(layers[1].digest), message="no eviction")
    time.sleep(0.5)
    assert cached(big.digest) and cached(layers[2].digest) and cached(layers[3].digest)
    assert proxy.metric("imagewarm_proxy_evictions_total") == 2
    assert proxy.metric("imagewarm_proxy_evicted_bytes_total") == layers[0].size + layers[1].size
    assert proxy.metric("imagewarm_proxy_cache_bytes") == big.size + layers[2].size + layers[3].size

    # The slow reader still gets every byte of the blob it was reading, and it is still a hit.
    rest = reader.raw.read()
    reader.close()
    assert len(rest) + MiB == big.size
    assert requests.get(url("evict/s0", layers[0].digest), timeout=60).content == layers[0].path.read_bytes()


def test_metrics_named_in_the_issue_are_exposed(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=MiB, seed=53)
    push(registry, "metrics/app", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    base = f"{proxy.url}/v2/{registry.host}/metrics/app"
    layer = image.layers[0].digest
    for _ in range(2):  # a miss, then a hit
        assert requests.get(f"{base}/manifests/v1", timeout=30).status_code == 200
        assert requests.get(f"{base}/blobs/{layer}", timeout=30).status_code == 200
    text = proxy.metrics()
    for name in (
        "imagewarm_proxy_requests_total",
        "imagewarm_proxy_cache_hit_bytes_total",
        "imagewarm_proxy_cache_miss_bytes_total",
        "imagewarm_proxy_upstream_bytes_total",
        "imagewarm_proxy_upstream_fetch_seconds_bucket",
        "imagewarm_proxy_inflight_fetches",
        "imagewarm_proxy_cache_bytes",
        "imagewarm_proxy_evictions_total",
        "imagewarm_proxy_evicted_bytes_total",
        "imagewarm_proxy_auth_decisions_total",
    ):
        assert f"\n{name}" in text, name
    assert proxy.metric("imagewarm_proxy_requests_total", route="blob", status="200") == 2
    assert proxy.metric("imagewarm_proxy_cache_hit_bytes_total", kind="blob") == image.layers[0].size
    assert proxy.metric("imagewarm_proxy_upstream_bytes_total") == image.layers[0].size
    assert proxy.metric("imagewarm_proxy_inflight_fetches") == 0
