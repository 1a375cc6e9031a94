"""The proxy's less travelled paths, with real parts: Accept negotiation, schema 1 refused, stale tags
on 5xx and 429, lying manifest digests, a Docker manifest list pulled per platform by skopeo, a cold
blob HEAD, health endpoints.

Hostile behaviour comes from test_proxy_hostile's scripted registry, told per repository what to do.
Mirror mode (`?ns=`) is not here: skopeo cannot add the query (containers/image mirrors are path
prefixes, i.e. rewrite mode); containerd's mirror pull is test_proxy_containerd's.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from flask import Response, request

from imagewarm.digest import Digest
from imagewarm.reference import registry_segment
from localcluster.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    push,
)
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures
from tests.component.test_proxy_hostile import BLOB_DIGEST, MANIFEST, MANIFEST_DIGEST, Hostile
from tests.oci_checks import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

SCHEMA1_DOCUMENT = {
    "schemaVersion": 1,
    "name": "corners/schema1",
    "tag": "v1",
    "architecture": "amd64",
    "fsLayers": [{"blobSum": "sha256:" + "a" * 64}],
    "history": [{"v1Compatibility": "{}"}],
}
OTHER_MANIFEST = MANIFEST.replace(b'"layers": []', b'"layers": [], "annotations": {"x": "y"}')
LIE = "sha256:" + hashlib.sha256(b"not the manifest").hexdigest()


class Scripted(Hostile):
    """The hostile registry (token flow included) answering each repository as `script` says; `served`
    counts the answers given past authentication, by "METHOD repository/kind"."""

    def __init__(self) -> None:
        self.script: dict[str, str] = {}
        self.served: Counter[str] = Counter()
        super().__init__()

    def _serve(self, repository: str, kind: str, ref: str) -> Response:
        self.served[f"{request.method} {repository}/{kind}"] += 1
        fault = self.script.get(repository)
        if fault in ("503", "429"):
            return Response("not now", status=int(fault))
        if kind == "manifests" and fault is not None:
            return _manifest_fault(fault)
        return super()._serve(repository, kind, ref)


DOCKER_V2 = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 2,
            "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
        },
        "layers": [],
    }
).encode()


def _manifest_fault(fault: str) -> Response:
    if fault.startswith("generic "):
        return Response(DOCKER_V2, content_type=fault.removeprefix("generic "))
    if fault.startswith("schema1 "):
        content_type = fault.removeprefix("schema1 ")
        pretty = content_type.endswith("prettyjws")
        body = json.dumps(
            SCHEMA1_DOCUMENT, indent=3 if pretty else None, separators=None if pretty else (",", ":")
        )
        return Response(body.encode(), content_type=content_type)
    body, header = {
        "other bytes": (OTHER_MANIFEST, "sha256:" + hashlib.sha256(OTHER_MANIFEST).hexdigest()),
        "lying header": (MANIFEST, LIE),
    }[fault]
    return Response(body, content_type=OCI_MANIFEST, headers={"Docker-Content-Digest": header})


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    upstream = Scripted()
    yield upstream
    upstream.close()


@pytest.fixture
def proxy(scripted, proxy_factory):
    return proxy_factory(insecure=(scripted.host,), workers=2, extra=("--retries", "2", "--tag-ttl", "1s"))


def manifest_url(proxy, upstream_host: str, repository: str, reference: str) -> str:
    return f"{proxy.url}/v2/{registry_segment(upstream_host)}/{repository}/manifests/{reference}"


def oci_error(response: requests.Response) -> dict[str, str]:
    return dict(response.json()["errors"][0])


# --- 1. Accept negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize("oci", [True, False], ids=["oci", "docker"])
def test_accept_negotiation_serves_only_what_the_client_accepts(registry, images, proxy_factory, oci):
    image = images.synthetic(layers=1, layer_size=20_000, seed=60, oci=oci)
    repository = f"corners/accept-{'oci' if oci else 'docker'}"
    push(registry, repository, "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    other = DOCKER_MANIFEST if oci else OCI_MANIFEST
    excluding = f"{other}, {OCI_INDEX}, {DOCKER_MANIFEST_LIST}"

    for reference in ("v1", image.digest):
        url = manifest_url(proxy, registry.host, repository, reference)
        refused = requests.get(url, headers={"Accept": excluding}, timeout=10)
        assert refused.status_code == 404, refused.text
        error = oci_error(refused)
        assert error["code"] == "MANIFEST_UNKNOWN" and image.media_type in error["message"]
        head = requests.head(url, headers={"Accept": excluding}, timeout=10)
        assert head.status_code == 404 and head.content == b""

        for accept in (image.media_type, f"{other}, {image.media_type}; q=0.5", "*/*", None):
            got = requests.get(url, headers={"Accept": accept}, timeout=10)
            assert got.status_code == 200, (accept, got.text)
            assert got.content == image.manifest
            assert got.headers["Content-Type"] == image.media_type
            assert got.headers["Docker-Content-Digest"] == image.digest


@pytest.mark.parametrize("content_type", ["application/json", "text/plain; charset=utf-8"])
def test_a_manifest_with_a_generic_content_type_is_served_as_the_type_it_names(proxy, scripted, content_type):
    """Runtimes refuse a manifest served as application/json; its own mediaType says what it is."""
    scripted.script["generic"] = f"generic {content_type}"
    for reference in ("v1", "v1", "sha256:" + hashlib.sha256(DOCKER_V2).hexdigest()):  # miss, hit, digest
        got = requests.get(manifest_url(proxy, scripted.host, "generic", reference), timeout=10)
        assert got.status_code == 200, got.text
        assert got.content == DOCKER_V2
        assert got.headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/json; charset=utf-8",  # what distribution 2.0 sent for signed schema 1 manifests
    ],
)
def test_a_schema1_manifest_gets_a_clear_error_and_is_not_cached(proxy, scripted, content_type):
    scripted.script["schema1"] = f"schema1 {content_type}"
    response = requests.get(manifest_url(proxy, scripted.host, "schema1", "v1"), timeout=10)
    assert response.status_code == 502, response.text
    error = oci_error(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert "schema 1" in error["message"] and "push the image again" in error["message"]
    assert not list(Layout(proxy.cache_dir).manifests_dir.rglob("*")), "a refused manifest was cached"


# --- 2. Stale tags on 5xx and 429, retries bounded -------------------------------------------------


@pytest.mark.parametrize(
    "status, uncached_code", [("503", "UPSTREAM_UNAVAILABLE"), ("429", "TOOMANYREQUESTS")]
)
def test_a_failing_upstream_gets_the_tags_last_known_digest(proxy, scripted, status, uncached_code):
    url = manifest_url(proxy, scripted.host, "stale", "v1")
    first = requests.get(url, timeout=10)
    assert first.status_code == 200 and first.headers["X-Imagewarm-Cache"] == "miss"
    stale_before = proxy.metric("imagewarm_proxy_stale_tag_serves_total")

    scripted.script["stale"] = status
    time.sleep(1.2)  # past --tag-ttl: the tag is due for a re-check, which fails
    served = scripted.served.copy()
    stale = requests.get(url, timeout=30)

    assert stale.status_code == 200 and stale.content == MANIFEST
    assert stale.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert stale.headers["X-Imagewarm-Cache"] == "stale"
    assert proxy.metric("imagewarm_proxy_stale_tag_serves_total") == stale_before + 1
    # --retries 2: the re-check was tried three times, then given up; nothing else went upstream.
    assert scripted.served - served == Counter({"HEAD stale/manifests": 3})

    # Right after a failed re-check the tag is served as it is, without asking the failing upstream
    # again (a worker that has not seen the failure yet asks once itself).
    served = scripted.served.copy()
    again = [requests.get(url, timeout=30) for _ in range(4)]
    assert all(r.status_code == 200 and r.headers["X-Imagewarm-Cache"] == "stale" for r in again)
    assert proxy.metric("imagewarm_proxy_stale_tag_serves_total") == stale_before + 5
    assert sum((scripted.served - served).values()) <= 3  # at most the other worker's one re-check

    served = scripted.served.copy()
    by_digest = requests.get(manifest_url(proxy, scripted.host, "stale", MANIFEST_DIGEST), timeout=10)
    assert by_digest.status_code == 200 and by_digest.headers["X-Imagewarm-Cache"] == "hit"
    assert scripted.served == served  # a digest never needs the upstream

    never_seen = requests.get(manifest_url(proxy, scripted.host, "stale", "v2"), timeout=30)
    assert oci_error(never_seen)["code"] == uncached_code
    assert never_seen.status_code == (502 if status == "503" else 429)
    assert scripted.served - served == Counter({"GET stale/manifests": 3})

    del scripted.script["stale"]  # the upstream recovers: the tag is confirmed upstream again
    time.sleep(1.2)  # past the pause after the failed re-check (the tag TTL, 1 s here)
    fresh = requests.get(url, timeout=10)
    assert fresh.status_code == 200 and fresh.headers["X-Imagewarm-Cache"] == "hit"
    assert proxy.metric("imagewarm_proxy_stale_tag_serves_total") == stale_before + 5


# --- 3. Manifest digest checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, reference, complaint",
    [
        ("other bytes", MANIFEST_DIGEST, "not the one asked for"),
        ("lying header", MANIFEST_DIGEST, "does not match the body"),
        ("lying header", "v1", "does not match the body"),
    ],
)
def test_a_manifest_whose_digest_does_not_verify_is_refused_and_not_cached(
    proxy, scripted, fault, reference, complaint
):
    layout = Layout(proxy.cache_dir)
    url = manifest_url(proxy, scripted.host, "liar", reference)
    scripted.script["liar"] = fault

    for head in (False, True):
        response = requests.request("HEAD" if head else "GET", url, timeout=10)
        assert response.status_code == 502, response.text
        if not head:
            error = oci_error(response)
            assert error["code"] == "MANIFEST_INVALID" and complaint in error["message"]
    assert not list(layout.manifests_dir.rglob("*")), "an unverified manifest was cached"
    assert not list(layout.tags_dir.rglob("*.json")), "a tag points at an unverified manifest"

    del scripted.script["liar"]  # a good upstream now: fetched again, not answered from a cache
    served = scripted.served["GET liar/manifests"]
    good = requests.get(url, timeout=10)
    assert good.status_code == 200 and good.content == MANIFEST
    assert good.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert good.headers["X-Imagewarm-Cache"] == "miss"
    assert scripted.served["GET liar/manifests"] == served + 1
    assert layout.manifest(MANIFEST_DIGEST).is_file()


# --- 4. A Docker schema 2 manifest list, per platform ------------------------------------------------


def test_skopeo_pulls_each_platform_of_a_docker_manifest_list(
    registry, images, skopeo, proxy_factory, tmp_path
):
    platforms = {
        "amd64": images.synthetic(layers=1, layer_size=150_000, seed=61, oci=False, platform="linux/amd64"),
        "arm64": images.synthetic(layers=1, layer_size=150_000, seed=62, oci=False, platform="linux/arm64"),
    }
    index = images.index({f"linux/{arch}": image for arch, image in platforms.items()}, oci=False)
    assert index.media_type == DOCKER_MANIFEST_LIST
    push(registry, "corners/dockerlist", "v1", index)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    name = f"{proxy.host}/{registry_segment(registry.host)}/corners/dockerlist"

    raw = requests.get(manifest_url(proxy, registry.host, "corners/dockerlist", "v1"), timeout=10)
    assert raw.content == index.manifest and raw.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    assert raw.headers["Docker-Content-Digest"] == index.digest

    for arch, image in platforms.items():
        copied = copy_to_dir(skopeo, f"{name}:v1", tmp_path / arch, f"--override-arch={arch}")
        assert_dir_matches(copied, image)
        assert json.loads((copied / "manifest.json").read_bytes())["mediaType"] == DOCKER_MANIFEST
        pinned = copy_to_dir(
            skopeo, f"{name}@{index.digest}", tmp_path / f"{arch}-pinned", f"--override-arch={arch}"
        )
        assert_dir_matches(pinned, image)

    # Every blob of both platforms came from the upstream once; the pinned copies were cache hits.
    wanted = sorted(blob.digest for image in platforms.values() for blob in image.blobs)
    assert sorted(registry.blob_gets("corners/dockerlist")) == wanted


# --- 6. A cold blob HEAD, health endpoints -----------------------------------------------------------


def raw_head(proxy, path: str) -> tuple[str, bytes]:
    """A HEAD over a bare socket: the response head, and every byte the proxy sent after it."""
    with socket.create_connection((proxy.ip, proxy.port), timeout=10) as sock:
        sock.sendall(
            f"HEAD {path} HTTP/1.1\r\nHost: {proxy.host}\r\nAuthorization: Basic Og==\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head.decode(), rest


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def test_a_cold_blob_head_answers_headers_only_and_caches_nothing(registry, images, proxy_factory):
    image = images.synthetic(layers=1, layer_size=700_000, seed=63)
    push(registry, "corners/coldhead", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    layout = Layout(proxy.cache_dir)
    layer = image.layers[0]
    path = f"/v2/{registry_segment(registry.host)}/corners/coldhead/blobs/{layer.digest}"
    since = len(registry.requests())

    head, body = raw_head(proxy, path)

    assert head.startswith("HTTP/1.1 200"), head
    assert header(head, "Content-Length") == str(layer.size)
    assert header(head, "Docker-Content-Digest") == layer.digest
    assert header(head, "X-Imagewarm-Cache") == "miss"
    assert body == b"", "a HEAD answer carried a body"
    assert not layout.blob(Digest.parse(layer.digest)).exists()
    assert not list(layout.partial_dir.iterdir()), "a HEAD left a partial file"
    assert registry.blob_gets(digest=layer.digest, since=since) == []  # asked with a HEAD, not fetched

    missing = "sha256:" + "0" * 64
    absent_head, absent_body = raw_head(proxy, path.replace(layer.digest, missing))
    assert absent_head.startswith("HTTP/1.1 404") and absent_body == b""

    got = requests.get(proxy.url + path, timeout=30)  # the first GET is the miss that caches it
    assert got.content == layer.read_bytes() and got.headers["X-Imagewarm-Cache"] == "miss"


def test_a_cold_head_of_a_blob_the_upstream_would_corrupt_caches_nothing(proxy, scripted):
    # The HEAD cannot see that the bytes are wrong; it must not leave anything a later GET could trust.
    layout = Layout(proxy.cache_dir)
    path = f"/v2/{scripted.host}/wrongdigest/blobs/{BLOB_DIGEST}"
    head, body = raw_head(proxy, path)
    assert head.startswith("HTTP/1.1 200") and body == b""
    assert scripted.served["HEAD wrongdigest/blobs"] == 1 and scripted.served["GET wrongdigest/blobs"] == 0
    assert not [p for p in layout.blobs_dir.rglob("*") if p.is_file()]
    assert not list(layout.partial_dir.iterdir())


def test_health_and_readiness_answer_with_the_upstream_down(proxy_factory):
    proxy = proxy_factory(insecure=("127.0.0.1:9",), workers=1)  # nothing listens on the discard port
    for path, text in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
        got = requests.get(proxy.url + path, timeout=5)
        assert got.status_code == 200 and got.text == text, path
        assert got.headers["Content-Type"].startswith("text/plain")
        assert requests.head(proxy.url + path, timeout=5).status_code == 200
