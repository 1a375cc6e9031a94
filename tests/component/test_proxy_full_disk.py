"""The proxy (real gunicorn processes, a real docker-registry upstream) on a cache disk with no free
byte left: a real small tmpfs filled to the last page. Manifests and tags keep being served (verified,
not stored), skopeo still copies whole images, and caching resumes once space returns."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imagewarm.digest import Digest
from imagewarm.reference import registry_segment
from localcluster.images import push
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures
from tests.oci_checks import assert_dir_matches, copy_to_dir
from tests.small_disk import small_tmpfs

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

MiB = 1 << 20
SKIPPED = "imagewarm_proxy_disk_full_skipped_writes_total"
FULL_LOG = "cache disk full: manifests and tags are served without being cached"
SPACE_LOG = "cache disk has space again"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "4m") as mount:
        yield mount


def fill(mount: Path) -> Path:
    """Take every free byte of the filesystem at `mount` into one file; unlink it to give space back."""
    filler = mount / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * MiB)  # the last write comes up short, the next one fails
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    stat = os.statvfs(mount)
    assert stat.f_bavail == 0, f"{stat.f_bavail} blocks still free on {mount}"
    return filler


def assert_manifest(response: requests.Response, image, cache: str, *, head: bool = False) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["Content-Type"] == image.media_type
    assert response.headers["Content-Length"] == str(len(image.manifest))
    assert response.headers["X-Imagewarm-Cache"] == cache
    assert response.content == (b"" if head else image.manifest)


def log_count(proxy: proxy_fixtures.ProxyProcess, text: str) -> int:
    return sum(text in line for line in proxy.log_path.read_text(errors="replace").splitlines())


def test_cold_manifests_on_a_full_disk_are_served_uncached_and_cached_once_space_returns(
    registry_factory, images, proxy_factory, small_disk
):
    upstream = registry_factory()
    image = images.synthetic(layers=1, layer_size=100_000, seed=51)
    push(upstream, "full/manifest", "v1", image)
    # One worker: its log must say "full" once however many writes fail, then "space again" once.
    proxy = proxy_factory(insecure=(upstream.host,), cache_dir=small_disk / "cache", workers=1)
    layout = Layout(proxy.cache_dir)
    base = f"{proxy.url}/v2/{registry_segment(upstream.host)}/full/manifest/manifests"
    filler = fill(small_disk)

    for _ in range(2):  # nothing is kept, so every pull is fetched (and verified) again
        assert_manifest(requests.get(f"{base}/v1", timeout=30), image, "uncached")
        assert_manifest(requests.head(f"{base}/v1", timeout=30), image, "uncached", head=True)
        assert_manifest(requests.get(f"{base}/{image.digest}", timeout=30), image, "uncached")
    assert not layout.manifest(image.digest).exists()
    assert not layout.tag(upstream.host, "full/manifest", "v1").exists()
    assert not list(layout.partial_dir.iterdir()), "a failed write must leave no temporary file"
    assert proxy.metric(SKIPPED, kind="manifest") == 6
    assert log_count(proxy, FULL_LOG) == 1, proxy.log_tail()
    assert log_count(proxy, SPACE_LOG) == 0

    filler.unlink()  # space returns: the next fetch is cached
    assert_manifest(requests.get(f"{base}/v1", timeout=30), image, "miss")
    assert layout.manifest(image.digest).exists()
    assert layout.tag(upstream.host, "full/manifest", "v1").exists()
    assert log_count(proxy, SPACE_LOG) == 1, proxy.log_tail()

    upstream.stop()  # served from the cache alone now
    assert_manifest(requests.get(f"{base}/v1", timeout=30), image, "hit")
    assert_manifest(requests.get(f"{base}/{image.digest}", timeout=30), image, "hit")
    assert log_count(proxy, FULL_LOG) == 1


def test_skopeo_copies_whole_images_through_a_full_disk(
    registry, images, skopeo, proxy_factory, small_disk, tmp_path
):
    image = images.synthetic(layers=2, layer_size=2 * MiB, compressed=False, seed=52)
    push(registry, "full/skopeo", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), cache_dir=small_disk / "cache", workers=2)
    layout = Layout(proxy.cache_dir)
    fill(small_disk)
    name = f"{proxy.host}/{registry_segment(registry.host)}/full/skopeo"

    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "tag"), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}@{image.digest}", tmp_path / "digest"), image)
    assert not layout.manifest(image.digest).exists()
    assert not any(layout.blob(Digest.parse(blob.digest)).exists() for blob in image.blobs)
    assert proxy.metric(SKIPPED, kind="manifest") >= 2
    # Every blob of both copies streamed through (the config blob too), none from a cache.
    assert proxy.metric("imagewarm_proxy_uncached_streams_total", reason="disk_full") >= 2 * len(image.blobs)
    assert sorted(registry.blob_gets("full/skopeo")) == sorted(2 * [b.digest for b in image.blobs])


def test_a_cached_tag_past_its_ttl_still_resolves_on_a_full_disk(registry, images, proxy_factory, small_disk):
    first = images.synthetic(layers=1, layer_size=50_000, seed=53)
    second = images.synthetic(layers=1, layer_size=50_000, seed=54)
    push(registry, "full/tag", "v1", first)
    proxy = proxy_factory(
        insecure=(registry.host,), cache_dir=small_disk / "cache", extra=("--tag-ttl", "1s"), workers=1
    )
    url = f"{proxy.url}/v2/{registry_segment(registry.host)}/full/tag/manifests/v1"
    assert_manifest(requests.get(url, timeout=30), first, "miss")
    fill(small_disk)
    time.sleep(1.2)  # past the TTL: the tag is re-checked, and its new check time cannot be written

    def rechecks() -> int:
        return registry.requests().count(("HEAD", "/v2/full/tag/manifests/v1", 200))

    before = rechecks()
    for _ in range(2):
        assert_manifest(requests.get(url, timeout=30), first, "hit")
    assert rechecks() == before + 2  # unrecorded, so re-checked on each pull until space returns
    assert proxy.metric(SKIPPED, kind="tag") == 2

    push(registry, "full/tag", "v1", second)  # a moved tag is still followed, served uncached
    assert_manifest(requests.get(url, timeout=30), second, "uncached")
    assert log_count(proxy, FULL_LOG) == 1, proxy.log_tail()
