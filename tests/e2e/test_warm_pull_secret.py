"""`imagewarm warm --pull-secret NAMESPACE/NAME` against a real API server: the credentials of a
pull secret made with `kubectl create secret docker-registry` warm a private image from a real
docker-registry with basic auth into the real proxy; a missing secret or one that is not a pull
secret is a clear configuration error (exit 2) that fetches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster.cluster import Cluster
from localcluster.images import push
from tests.component import proxy_fixtures
from tests.component.test_warm import warm_cli

pytestmark = pytest.mark.e2e
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def test_a_pull_secret_warms_a_private_image(
    cluster: Cluster, namespace: str, auth_registry, images, proxy_factory, tmp_path: Path
):
    image = images.synthetic(layers=2, layer_size=250_000, seed=91)
    push(auth_registry, "private/from-secret", "v1", image)
    proxy = proxy_factory(insecure=(auth_registry.host,), workers=2)
    written = f"{auth_registry.host}/private/from-secret:v1"
    username, password = auth_registry.auth
    cluster.kubectl(
        "-n", namespace, "create", "secret", "docker-registry", "registry-cred",
        f"--docker-server={auth_registry.host}", f"--docker-username={username}",
        f"--docker-password={password}",
    )  # fmt: skip
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "not-a-pull-secret", "--from-literal=a=b")
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    nowhere = tmp_path / "no-docker-config"

    missing = warm_cli(written, "--proxy", proxy.url, "--pull-secret", f"{namespace}/absent", *kube,
                       docker_config_dir=nowhere)  # fmt: skip
    assert missing.returncode == 2
    assert f"pull secret {namespace}/absent not found" in missing.stderr
    wrong_kind = warm_cli(written, "--proxy", proxy.url, "--pull-secret", f"{namespace}/not-a-pull-secret",
                          *kube, docker_config_dir=nowhere)  # fmt: skip
    assert wrong_kind.returncode == 2
    assert "is not a pull secret" in wrong_kind.stderr and "kubectl create secret docker-registry" in (
        wrong_kind.stderr
    )
    assert auth_registry.blob_gets("private/from-secret") == []

    warmed = warm_cli(written, "--proxy", proxy.url, "--pull-secret", f"{namespace}/registry-cred", *kube,
                      docker_config_dir=nowhere)  # fmt: skip
    assert warmed.returncode == 0, warmed.stderr
    assert image.digest in warmed.stdout
    assert sorted(auth_registry.blob_gets("private/from-secret")) == sorted(b.digest for b in image.blobs)
