"""The proxy against real upstreams and clients: docker-registry, skopeo (rewrite and mirror paths)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time

import pytest
import requests

from imagewarm.reference import registry_segment
from localcluster.images import push
from tests.component import proxy_fixtures
from tests.oci_checks import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def test_skopeo_copies_through_the_proxy_by_tag_and_digest(registry, images, skopeo, proxy_factory, tmp_path):
    image = images.synthetic(layers=2, layer_size=512 << 10, seed=11)
    push(registry, "pull/basic", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,))
    name = f"{proxy.host}/{registry_segment(registry.host)}/pull/basic"

    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "cold"), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "warm"), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}@{image.digest}", tmp_path / "digest"), image)

    # Each blob came from the upstream once; the warm copies were served from the cache.
    assert sorted(registry.blob_gets("pull/basic")) == sorted(b.digest for b in image.blobs)
    assert proxy.metric("imagewarm_proxy_cache_hit_bytes_total", kind="blob") >= 2 * sum(
        b.size for b in image.layers
    )


def test_manifest_headers_and_blob_ranges(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=300_000, seed=12)
    push(registry, "pull/headers", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,))
    base = f"{proxy.url}/v2/{registry.host}/pull/headers"
    auth = ("", "")

    head = requests.head(f"{base}/manifests/v1", auth=auth, timeout=10)
    got = requests.get(f"{base}/manifests/v1", auth=auth, timeout=10)
    for response in (head, got):
        assert response.status_code == 200
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == image.media_type
        assert response.headers["Content-Length"] == str(len(image.manifest))
        assert response.headers["ETag"] == f'"{image.digest}"'
    assert got.content == image.manifest and head.content == b""

    layer = image.layers[0]
    data = layer.read_bytes()
    cold_range = requests.get(f"{base}/blobs/{layer.digest}", headers={"Range": "bytes=10-19"}, timeout=10)
    assert cold_range.status_code == 206 and cold_range.content == data[10:20]
    full = requests.get(f"{base}/blobs/{layer.digest}", timeout=10)
    assert full.status_code == 200 and full.content == data
    assert full.headers["Accept-Ranges"] == "bytes"
    part = requests.get(f"{base}/blobs/{layer.digest}", headers={"Range": "bytes=100-"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:]
    assert part.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    suffix = requests.get(f"{base}/blobs/{layer.digest}", headers={"Range": "bytes=-5"}, timeout=10)
    assert suffix.content == data[-5:]
    bad = requests.get(f"{base}/blobs/{layer.digest}", headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    blob_head = requests.head(f"{base}/blobs/{layer.digest}", timeout=10)
    assert blob_head.status_code == 200 and blob_head.headers["Content-Length"] == str(len(data))
    # Where the bytes came from, per answer.
    cache = "X-Imagewarm-Cache"
    assert [r.headers[cache] for r in (head, got)] == ["miss", "hit"]
    blobs = (cold_range, full, part, blob_head)
    assert [r.headers[cache] for r in blobs] == ["uncached", "miss", "hit", "hit"]


@pytest.mark.parametrize(
    "path, code, status",
    [
        ("/v2/{host}/../etc/manifests/v1", "NAME_INVALID", 400),
        ("/v2/{host}/Upper/manifests/v1", "NAME_INVALID", 400),
        ("/v2/{host}/ok/blobs/sha256:abc", "DIGEST_INVALID", 400),
        ("/v2/{host}/ok/manifests/sha256:xyz", "DIGEST_INVALID", 400),
        ("/v2/evil.example.com/ok/manifests/v1", "DENIED", 403),
        ("/v2/ok/manifests/v1?ns=evil.example.com", "DENIED", 403),
        ("/v2/{host}/pull/none/manifests/v1", "MANIFEST_UNKNOWN", 404),
    ],
)
def test_bad_requests_get_oci_errors(registry, proxy_factory, path, code, status):
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    url = proxy.url + path.format(host=registry_segment(registry.host))
    response = requests.get(url, auth=("", ""), timeout=10)
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["code"] == code


@pytest.mark.parametrize(
    "path",
    [
        "/v2/{host}/ok/blobs/sha256:" + "a" * 64 + "/..",
        "/v2/{host}/ok/manifests/v1/.",
        "/v2/{host}/./ok/manifests/v1",
    ],
)
def test_dot_segments_are_name_invalid(registry, proxy_factory, path):
    """Sent verbatim (http.client: requests would resolve a trailing dot segment before sending)."""
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    connection = http.client.HTTPConnection(proxy.ip, proxy.port, timeout=10)
    try:
        connection.request("GET", path.format(host=registry_segment(registry.host)))
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert (response.status, body["errors"][0]["code"]) == (400, "NAME_INVALID"), body


def test_mirror_mode_path_with_ns(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=100_000, seed=13)
    push(registry, "pull/mirror", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    got = requests.get(f"{proxy.url}/v2/pull/mirror/manifests/v1", params={"ns": registry.host}, timeout=10)
    assert got.status_code == 200 and got.content == image.manifest
    blob = requests.get(
        f"{proxy.url}/v2/pull/mirror/blobs/{image.layers[0].digest}", params={"ns": registry.host}, timeout=10
    )
    assert blob.content == image.layers[0].read_bytes()


def test_multi_platform_index(registry, images, skopeo, proxy_factory, tmp_path):
    amd = images.synthetic(layers=1, layer_size=100_000, seed=14)
    arm = images.synthetic(layers=1, layer_size=100_000, seed=15)
    index = images.index({"linux/amd64": amd, "linux/arm64": arm})
    push(registry, "pull/multi", "v1", index)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    name = f"{proxy.host}/{registry_segment(registry.host)}/pull/multi:v1"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}")
    assert raw.stdout.encode() == index.manifest
    copied = copy_to_dir(skopeo, name, tmp_path / "all", "--all")
    assert (copied / "manifest.json").read_bytes() == index.manifest
    for image in (amd, arm):
        assert (copied / f"{image.digest.split(':')[1]}.manifest.json").read_bytes() == image.manifest


def test_moved_tag_is_seen_after_the_tag_ttl(registry, images, proxy_factory):
    first = images.synthetic(layers=1, layer_size=50_000, seed=16)
    second = images.synthetic(layers=1, layer_size=50_000, seed=17)
    push(registry, "pull/moving", "v1", first)
    proxy = proxy_factory(insecure=(registry.host,), extra=("--tag-ttl", "2s"), workers=1)
    url = f"{proxy.url}/v2/{registry.host}/pull/moving/manifests/v1"
    assert requests.get(url, timeout=10).headers["Docker-Content-Digest"] == first.digest
    push(registry, "pull/moving", "v1", second)
    assert requests.get(url, timeout=10).headers["Docker-Content-Digest"] == first.digest  # within the TTL
    time.sleep(2.5)
    assert requests.get(url, timeout=10).headers["Docker-Content-Digest"] == second.digest


def test_offline_upstream_still_serves_tags_and_digests(
    registry_factory, images, skopeo, proxy_factory, tmp_path
):
    upstream = registry_factory()
    image = images.synthetic(layers=2, layer_size=200_000, seed=18)
    push(upstream, "pull/offline", "v1", image)
    proxy = proxy_factory(insecure=(upstream.host,), extra=("--tag-ttl", "1s", "--retries", "1"))
    name = f"{proxy.host}/{registry_segment(upstream.host)}/pull/offline"
    copy_to_dir(skopeo, f"{name}:v1", tmp_path / "online")
    upstream.stop()
    time.sleep(1.2)  # the tag is due for a re-check, which fails
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "tag"), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}@{image.digest}", tmp_path / "digest"), image)
    assert proxy.metric("imagewarm_proxy_stale_tag_serves_total") >= 1
    tag_url = f"{proxy.url}/v2/{registry_segment(upstream.host)}/pull/offline/manifests/v1"
    stale = requests.get(tag_url, timeout=30)
    assert stale.status_code == 200 and stale.headers["X-Imagewarm-Cache"] == "stale"


def test_concurrent_cold_gets_say_one_miss_and_the_rest_joined_or_hit(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=16 << 20, seed=20)
    push(registry, "pull/joined", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    layer = image.layers[0]
    url = f"{proxy.url}/v2/{registry_segment(registry.host)}/pull/joined/blobs/{layer.digest}"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.get(url, timeout=60), range(8)))
    assert all(a.status_code == 200 and a.content == layer.read_bytes() for a in answers)
    statuses = sorted(a.headers["X-Imagewarm-Cache"] for a in answers)
    assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "joined", "hit"}, statuses


def test_fan_in_sixteen_cold_pulls_fetch_each_blob_once(registry, images, skopeo, proxy_factory, tmp_path):
    image = images.synthetic(layers=3, layer_size=4 << 20, seed=19)
    push(registry, "pull/fanin", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=4)
    name = f"{proxy.host}/{registry_segment(registry.host)}/pull/fanin:v1"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        copies = list(pool.map(lambda i: copy_to_dir(skopeo, name, tmp_path / f"c{i}"), range(16)))
    for copied in copies:
        assert_dir_matches(copied, image)
    assert sorted(registry.blob_gets("pull/fanin")) == sorted(b.digest for b in image.blobs)


def test_unauthenticated_client_cannot_read_a_private_image_an_authorised_client_cached(
    auth_registry, images, skopeo, proxy_factory, tmp_path
):
    image = images.synthetic(layers=1, layer_size=200_000, seed=20)
    push(auth_registry, "private/app", "v1", image)
    proxy = proxy_factory(insecure=(auth_registry.host,), workers=2)
    name = f"{proxy.host}/{registry_segment(auth_registry.host)}/private/app"
    creds = f"--src-creds={auth_registry.username}:{auth_registry.password}"
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "authorised", creds), image)

    base = f"{proxy.url}/v2/{auth_registry.host}/private/app"
    layer = image.layers[0].digest
    for url in (f"{base}/manifests/v1", f"{base}/manifests/{image.digest}", f"{base}/blobs/{layer}"):
        anonymous = requests.get(url, timeout=10)
        assert anonymous.status_code == 401, url
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        wrong = requests.get(url, auth=(auth_registry.username, "wrong"), timeout=10)
        assert wrong.status_code in (401, 403), url
        right = requests.get(url, auth=(auth_registry.username, auth_registry.password), timeout=10)
        assert right.status_code == 200, url
    with pytest.raises(Exception, match=r"401|unauthorized|authentication"):
        copy_to_dir(skopeo, f"{name}:v1", tmp_path / "anonymous")
    assert proxy.metric("imagewarm_proxy_auth_decisions_total", decision="deny") >= 1
