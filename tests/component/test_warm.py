"""`imagewarm warm` as users run it (the real CLI, a subprocess) against the real proxy and docker-registry:
what it warms is in the proxy's cache, private images need the Docker config's credentials, and an
index is warmed for this machine's platform or for all of them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagewarm.platforms import this_platform
from imagewarm.reference import registry_segment
from localcluster.images import push
from localcluster.processes import free_ports
from tests.component import proxy_fixtures
from tests.oci_checks import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def warm_cli(*args: str, docker_config_dir: Path) -> subprocess.CompletedProcess[str]:
    """`imagewarm warm ARGS`; docker's lookup sees only `docker_config_dir`, never the developer's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEWARM_")}
    env["DOCKER_CONFIG"] = str(docker_config_dir)
    return subprocess.run(
        [sys.executable, "-m", "imagewarm", "warm", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def docker_config(path: Path, host: str, username: str, password: str) -> Path:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def test_warm_caches_the_whole_image_so_it_pulls_with_the_upstream_down(
    registry_factory, images, skopeo, proxy_factory, tmp_path
):
    upstream = registry_factory()
    image = images.synthetic(layers=3, layer_size=1 << 20, seed=70)
    push(upstream, "warm/app", "v1", image)
    proxy = proxy_factory(insecure=(upstream.host,), workers=2)
    written = f"{upstream.host}/warm/app:v1"

    warmed = warm_cli(written, "--proxy", proxy.url, docker_config_dir=tmp_path / "none")

    assert warmed.returncode == 0, warmed.stderr
    assert f"warm {written}:" in warmed.stderr and "4/4 blobs" in warmed.stderr  # progress on stderr
    summary = warmed.stdout.splitlines()
    assert summary[0] == "summary"
    assert summary[1].split() == ["image", "digest", "MiB", "cached", "seconds", "MiB/s"]
    row = summary[3].split()
    assert row[:4] == [written, image.digest, f"{sum(b.size for b in image.blobs) / 2**20:.1f}", "0/4"]
    assert sorted(upstream.blob_gets("warm/app")) == sorted(b.digest for b in image.blobs)

    # Again: the proxy says (X-Imagewarm-Cache) it had every blob, and the upstream sees no blob GET.
    again = warm_cli(written, "--proxy", proxy.url, docker_config_dir=tmp_path / "none")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[3].split()[3] == "4/4"
    assert sorted(upstream.blob_gets("warm/app")) == sorted(b.digest for b in image.blobs)

    upstream.stop()
    proxied = f"{proxy.host}/{registry_segment(upstream.host)}/warm/app"
    assert_dir_matches(copy_to_dir(skopeo, f"{proxied}:v1", tmp_path / "by-tag"), image)
    assert_dir_matches(copy_to_dir(skopeo, f"{proxied}@{image.digest}", tmp_path / "by-digest"), image)


def test_a_private_image_warms_with_docker_config_credentials_only(
    auth_registry, images, proxy_factory, tmp_path
):
    image = images.synthetic(layers=2, layer_size=300_000, seed=71)
    push(auth_registry, "private/warm", "v1", image)
    proxy = proxy_factory(insecure=(auth_registry.host,), workers=2)
    written = f"{auth_registry.host}/private/warm:v1"
    empty = tmp_path / "empty"

    anonymous = warm_cli(written, "--proxy", proxy.url, docker_config_dir=empty)
    assert anonymous.returncode == 1
    assert (
        f"credentials refused for {written}: give --docker-config with an entry for {auth_registry.host}"
        in anonymous.stderr
    )
    assert "failed" in anonymous.stdout.splitlines()[-1]

    wrong = docker_config(tmp_path / "wrong.json", auth_registry.host, auth_registry.username, "wrong")
    refused = warm_cli(written, "--proxy", proxy.url, "--docker-config", str(wrong), docker_config_dir=empty)
    assert refused.returncode == 1 and "the credentials sent were refused" in refused.stderr
    assert auth_registry.blob_gets("private/warm") == []

    given = docker_config(tmp_path / "given.json", auth_registry.host, *auth_registry.auth)
    warmed = warm_cli(written, "--proxy", proxy.url, "--docker-config", str(given), docker_config_dir=empty)
    assert warmed.returncode == 0, warmed.stderr
    assert image.digest in warmed.stdout
    assert sorted(auth_registry.blob_gets("private/warm")) == sorted(b.digest for b in image.blobs)

    # Without --docker-config, docker's own lookup ($DOCKER_CONFIG/config.json) is read.
    found = docker_config(tmp_path / "dockerdir" / "config.json", auth_registry.host, *auth_registry.auth)
    again = warm_cli(written, "--proxy", proxy.url, docker_config_dir=found.parent)
    assert again.returncode == 0, again.stderr


def test_an_index_is_warmed_for_this_platform_or_all(registry, images, proxy_factory, tmp_path):
    here = str(this_platform())
    other = "linux/s390x" if here != "linux/s390x" else "linux/amd64"
    mine = images.synthetic(layers=2, layer_size=200_000, seed=72, platform=here)
    theirs = images.synthetic(layers=2, layer_size=200_000, seed=73, platform=other)
    index = images.index({here: mine, other: theirs})
    push(registry, "warm/multi", "v1", index)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    written = f"{registry.host}/warm/multi:v1"
    before = len(registry.requests())
    none = tmp_path / "none"

    default = warm_cli(written, "--proxy", proxy.url, docker_config_dir=none)
    assert default.returncode == 0, default.stderr
    assert index.digest in default.stdout
    assert sorted(registry.blob_gets("warm/multi", since=before)) == sorted(b.digest for b in mine.blobs)

    every = warm_cli(written, "--proxy", proxy.url, "--platform", "all", docker_config_dir=none)
    assert every.returncode == 0, every.stderr
    fetched = registry.blob_gets("warm/multi", since=before)
    assert sorted(fetched) == sorted(b.digest for b in (*mine.blobs, *theirs.blobs))

    # Everything is cached now: warming all again takes nothing from the upstream.
    assert (
        warm_cli(written, "--proxy", proxy.url, "--platform", "all", docker_config_dir=none).returncode == 0
    )
    assert registry.blob_gets("warm/multi", since=before) == fetched

    missing = warm_cli(written, "--proxy", proxy.url, "--platform", "linux/mips64le", docker_config_dir=none)
    assert missing.returncode == 1
    assert f"has no linux/mips64le image (it has: {', '.join(sorted([here, other]))})" in missing.stderr


def test_failures_are_explained_and_the_others_still_warm(registry, images, proxy_factory, tmp_path):
    image = images.synthetic(layers=1, layer_size=100_000, seed=74)
    push(registry, "warm/some", "v1", image)
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    good, absent = f"{registry.host}/warm/some:v1", f"{registry.host}/warm/some:absent"

    both = warm_cli(absent, good, "--proxy", proxy.url, docker_config_dir=tmp_path)
    assert both.returncode == 1
    assert f"manifest unknown: {absent}" in both.stderr and "MANIFEST_UNKNOWN" in both.stderr
    rows = {line.split()[0]: line.split()[1] for line in both.stdout.splitlines()[3:]}
    assert rows == {absent: "failed", good: image.digest}

    nowhere = f"http://127.0.0.1:{free_ports(1)[0]}"
    unreachable = warm_cli(good, "--proxy", nowhere, docker_config_dir=tmp_path)
    assert unreachable.returncode == 1
    assert f"cannot reach the proxy at {nowhere}" in unreachable.stderr and "--proxy" in unreachable.stderr


def test_warm_names_the_blobs_of_the_platform_it_was_given_and_stops_when_cancelled(
    registry, images, proxy_factory
):
    """What the node agent relies on: the blob digests to pin, the node's platform out of an index,
    and a cancel that ends the warm-up (nothing fetched once it is set)."""
    import threading

    from imagewarm.platforms import Platform
    from imagewarm.warmup import WarmCancelled, warm

    amd, arm = (
        images.synthetic(layers=2, layer_size=100_000, seed=seed, platform=platform)
        for seed, platform in ((74, "linux/amd64"), (75, "linux/arm64"))
    )
    index = images.index({"linux/amd64": amd, "linux/arm64": arm})
    push(registry, "warm/agent", "v1", index)
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    written = f"{registry.host}/warm/agent:v1"

    cancel = threading.Event()
    cancel.set()
    before = len(registry.requests())
    with pytest.raises(WarmCancelled):
        warm(written, proxy.url, platform=Platform("linux", "arm64"), cancel=cancel)
    assert registry.blob_gets("warm/agent", since=before) == []

    result = warm(written, proxy.url, platform=Platform("linux", "arm64"), cancel=threading.Event())
    assert result.digest == index.digest and result.manifests == (arm.digest,)
    assert sorted(result.blob_digests) == sorted(b.digest for b in arm.blobs)
    assert sorted(registry.blob_gets("warm/agent", since=before)) == sorted(b.digest for b in arm.blobs)
