"""The standalone containerd fixture against a real local registry: plain-HTTP pulls and mirrors."""

from __future__ import annotations

import uuid

import pytest

from localcluster.containerd import Containerd, render_hosts
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry

pytestmark = pytest.mark.component


def image_names(containerd: Containerd) -> list[str]:
    return containerd.ctr("images", "ls", "-q").stdout.split()


def test_pulls_from_the_local_registry_over_plain_http_and_runs_it(
    containerd: Containerd, registry: Registry, images: ImageBuilder
) -> None:
    repository = f"ctr-{uuid.uuid4().hex[:6]}/busybox"
    digest = push(registry, repository, "1", images.busybox())
    ref = f"{registry.host}/{repository}:1"
    containerd.pull(ref)
    assert ref in image_names(containerd)
    assert ("GET", f"/v2/{repository}/manifests/1", 200) in registry.requests() or (
        "GET", f"/v2/{repository}/manifests/{digest}", 200) in registry.requests()  # fmt: skip
    # Unpacked with the native snapshotter: the image really runs.
    run = containerd.ctr("run", "--rm", "--snapshotter", "native", ref, f"t-{uuid.uuid4().hex[:6]}",
                         "echo", "ran from the local registry")  # fmt: skip
    assert run.stdout.strip() == "ran from the local registry"


def test_pulls_through_a_hosts_toml_mirror_with_the_ns_parameter(
    containerd: Containerd, registry: Registry, images: ImageBuilder
) -> None:
    repository = f"mirror-{uuid.uuid4().hex[:6]}/busybox"
    push(registry, repository, "1.35", images.busybox())
    # The upstream itself is a closed local port: only the mirror can serve this pull.
    path = containerd.set_hosts("iw-upstream.test", "http://127.0.0.1:9", mirrors=[registry.url])
    assert path == containerd.certs_dir / "iw-upstream.test" / "hosts.toml"
    containerd.pull(f"iw-upstream.test/{repository}:1.35", plain_http=False)
    assert f"iw-upstream.test/{repository}:1.35" in image_names(containerd)
    pulls = [(m, p) for m, p, _ in registry.requests() if m in ("GET", "HEAD") and f"/v2/{repository}/" in p]
    mirrored = [p for _, p in pulls if p.startswith(f"/v2/{repository}/manifests/1.35")]
    assert mirrored and all(p.endswith("?ns=iw-upstream.test") for p in mirrored)


def test_a_pull_fails_when_neither_mirror_nor_upstream_serves(containerd: Containerd) -> None:
    containerd.set_hosts("iw-nowhere.test", "http://127.0.0.1:9", mirrors=["http://127.0.0.1:9"])
    proc = containerd.ctr("images", "pull", "--hosts-dir", str(containerd.certs_dir),
                          "iw-nowhere.test/none:1", check=False)  # fmt: skip
    assert proc.returncode != 0


def test_hosts_toml_lists_mirrors_before_the_server() -> None:
    text = render_hosts("https://registry.example", ["http://127.0.0.1:7439", "http://10.0.0.1:7439"])
    assert text.index('server = "https://registry.example"') < text.index('[host."http://127.0.0.1:7439"]')
    assert text.index('[host."http://127.0.0.1:7439"]') < text.index('[host."http://10.0.0.1:7439"]')
    assert 'capabilities = ["pull", "resolve"]' in text
