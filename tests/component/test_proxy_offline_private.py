"""Private images while the upstream is down: the real proxy (several gunicorn workers, restarted) in
front of a real bearer-token docker-registry that is then stopped. A credential that proved access
still pulls, for the offline grace period; nobody else does, and nothing on disk names the credential.
Also: a full cache disk keeps access decisions in memory instead of failing the request."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import requests

from imagewarm.reference import registry_segment
from localcluster.images import OCI_MANIFEST, push
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.upstream.access import AccessControl
from proxy.upstream.auth import Credentials
from tests.component import proxy_fixtures
from tests.fixtures.registries import SkopeoError
from tests.oci_checks import assert_dir_matches, copy_to_dir
from tests.small_disk import small_tmpfs

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

# Decisions expire fast, so that after the restart every check must ask the (stopped) upstream.
FAST = ("--access-ttl", "1s", "--tag-ttl", "1s", "--retries", "1")


def test_a_credential_that_proved_access_still_pulls_after_a_restart_with_the_upstream_down(
    registry_factory, images, skopeo, proxy_factory, tmp_path
):
    upstream = registry_factory(token=True)
    image = images.synthetic(layers=2, layer_size=200_000, seed=70)
    push(upstream, "private/offline", "v1", image)
    online = proxy_factory(insecure=(upstream.host,), workers=3, extra=FAST)
    cache = online.cache_dir
    creds = f"--src-creds={upstream.username}:{upstream.password}"
    name = f"{online.host}/{registry_segment(upstream.host)}/private/offline"
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "online", creds), image)

    online.stop()
    upstream.stop()
    proxy = proxy_factory(insecure=(upstream.host,), workers=3, cache_dir=cache, extra=FAST)
    time.sleep(1.2)  # the grants are past --access-ttl and the tag past --tag-ttl: both need the upstream
    name = f"{proxy.host}/{registry_segment(upstream.host)}/private/offline"
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "tag", creds), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}@{image.digest}", tmp_path / "digest", creds), image)
    assert proxy.metric("imagewarm_proxy_auth_decisions_total", source="offline-grant", decision="allow") >= 3

    base = f"{proxy.url}/v2/{registry_segment(upstream.host)}/private/offline"
    urls = [f"{base}/manifests/v1", f"{base}/manifests/{image.digest}"]
    urls += [f"{base}/blobs/{blob.digest}" for blob in image.blobs]
    accept = {"Accept": OCI_MANIFEST}
    for url in urls:  # any worker answers the same (more requests than workers)
        right = requests.get(url, headers=accept, auth=(upstream.username, upstream.password), timeout=30)
        assert right.status_code == 200, url
        expected = image.manifest if "/manifests/" in url else _blob(image, url).read_bytes()
        assert right.content == expected, url
        for auth in ((upstream.username, "wrong"), ("someone-else", upstream.password), None):
            refused = requests.get(url, headers=accept, auth=auth, timeout=30)
            assert refused.status_code == 401, (url, auth, refused.text)
            assert "WWW-Authenticate" in refused.headers
    with pytest.raises(SkopeoError, match=r"(?i)401|unauthorized|authentication"):
        copy_to_dir(skopeo, f"{name}:v1", tmp_path / "anonymous")

    # Nothing under the cache names the credential: neither file names nor contents.
    stored = list(cache.rglob("*"))
    assert any(path.parent.name == "grants" for path in stored)
    for path in stored:
        for secret in (upstream.username, upstream.password):
            assert secret not in str(path.relative_to(cache)), path
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert upstream.password not in proxy.log_path.read_text() + online.log_path.read_text()

    proxy.stop()
    strict = proxy_factory(
        insecure=(upstream.host,), workers=2, cache_dir=cache, extra=(*FAST, "--offline-grant-ttl", "0")
    )
    time.sleep(1.2)
    for url in urls:
        url = url.replace(proxy.url, strict.url)
        refused = requests.get(url, headers=accept, auth=(upstream.username, upstream.password), timeout=30)
        assert refused.status_code == 401, url
    assert strict.metric("imagewarm_proxy_auth_decisions_total", source="offline-grant") == 0


def _blob(image, url: str):
    return next(blob for blob in image.blobs if url.endswith(blob.digest)).path


REGISTRY = "registry.corp:5000"
ALICE = Credentials("alice", "alice-password")


def _down(credentials: Credentials | None) -> None:
    raise UpstreamUnavailable("connection refused")


def _fill_inodes(directory: Path) -> None:
    directory.mkdir()
    with pytest.raises(OSError) as full:
        for n in range(100_000):
            (directory / str(n)).touch()
    assert full.value.errno == errno.ENOSPC


def test_a_full_cache_disk_keeps_access_decisions_in_memory(tmp_path):
    now = [1_700_000_000.0]
    # The grants and the public markers are empty files: what runs out for them is inodes.
    with small_tmpfs(tmp_path / "small", "4m,nr_inodes=200") as disk:
        cache = disk / "cache"
        access = AccessControl(cache, ttl=60.0, offline_ttl=3600.0, now=lambda: now[0])
        _fill_inodes(disk / "filler")

        access.granted(REGISTRY, "public/base", None)  # the marker cannot be written: no exception
        assert not list((cache / "access" / "public").iterdir())
        access.check(REGISTRY, "public/base", None, _down)  # still known public, in this process

        access.granted(REGISTRY, "team/private", ALICE)  # the grant cannot be written: no exception
        assert not list((cache / "access" / "grants").iterdir())
        now[0] += 120  # past the short TTL, the upstream down: the grant in memory stands
        access.check(REGISTRY, "team/private", ALICE, _down)

        restarted = AccessControl(cache, ttl=60.0, offline_ttl=3600.0, now=lambda: now[0])
        with pytest.raises(RegistryError) as refused:  # what only memory held is gone after a restart
            restarted.check(REGISTRY, "team/private", ALICE, _down)
        assert refused.value.status == 401
