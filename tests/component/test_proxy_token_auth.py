"""The proxy against a bearer-token upstream: the real docker-registry with ``auth.token`` and our token
server. Credentials the client gives the proxy are exchanged for tokens, cached per scope; what an
authorised client cached stays private to clients the upstream accepts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from localcluster.images import OCI_MANIFEST, push
from localcluster.registry import Registry, start_registry
from tests.component import proxy_fixtures
from tests.fixtures.registries import SkopeoError
from tests.oci_checks import assert_dir_matches, copy_to_dir

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def proxied_name(proxy, registry, repository: str) -> str:
    return f"{proxy.host}/{registry.host.replace(':', '_')}/{repository}"


def test_credentials_pull_a_private_image_that_anonymous_clients_then_cannot_read(
    token_registry, images, skopeo, proxy_factory, tmp_path
):
    image = images.synthetic(layers=2, layer_size=200_000, seed=50)
    push(token_registry, "private/proxied", "v1", image)
    proxy = proxy_factory(insecure=(token_registry.host,), workers=2)
    name = proxied_name(proxy, token_registry, "private/proxied")
    creds = f"--src-creds={token_registry.username}:{token_registry.password}"

    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "authorised", creds), image)

    base = f"{proxy.url}/v2/{token_registry.host}/private/proxied"
    accept = {"Accept": OCI_MANIFEST}
    credentials = (token_registry.username, token_registry.password)
    for url in (
        f"{base}/manifests/v1",
        f"{base}/manifests/{image.digest}",
        f"{base}/blobs/{image.layers[0].digest}",
    ):
        anonymous = requests.get(url, headers=accept, timeout=10)
        assert anonymous.status_code == 401, url
        assert "WWW-Authenticate" in anonymous.headers
        wrong = requests.get(url, headers=accept, auth=(token_registry.username, "wrong"), timeout=10)
        assert wrong.status_code in (401, 403), url
        right = requests.get(url, headers=accept, auth=credentials, timeout=10)
        assert right.status_code == 200, url
    with pytest.raises(SkopeoError, match=r"(?i)401|unauthorized|authentication"):
        copy_to_dir(skopeo, f"{name}:v1", tmp_path / "anonymous")
    assert proxy.metric("imagewarm_proxy_auth_decisions_total", decision="deny") >= 1


def test_a_public_image_pulls_anonymously_through_the_proxy(
    token_registry, images, skopeo, proxy_factory, tmp_path
):
    image = images.synthetic(layers=2, layer_size=150_000, seed=51)
    push(token_registry, "public/base", "v1", image)
    proxy = proxy_factory(insecure=(token_registry.host,), workers=2)
    name = proxied_name(proxy, token_registry, "public/base")
    before = len(token_registry.requests())

    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "cold"), image)
    served = [
        path
        for method, path, status in token_registry.requests()[before:]
        if method == "GET" and status == 200 and "/v2/public/base/blobs/" in path
    ]
    assert sorted(served) == sorted(f"/v2/public/base/blobs/{b.digest}" for b in image.blobs)
    assert_dir_matches(copy_to_dir(skopeo, f"{name}:v1", tmp_path / "warm"), image)


def test_repeated_pulls_reuse_the_cached_token(token_registry, images, skopeo, proxy_factory, tmp_path):
    workers = 2
    pushed = [images.synthetic(layers=2, layer_size=60_000, seed=60 + n) for n in range(4)]
    for n, image in enumerate(pushed):
        push(token_registry, "private/many", f"v{n}", image)
    proxy = proxy_factory(insecure=(token_registry.host,), workers=workers, extra=("--tag-ttl", "0s"))
    name = proxied_name(proxy, token_registry, "private/many")
    creds = f"--src-creds={token_registry.username}:{token_registry.password}"
    server = token_registry.token_server
    issued, by_scope = server.issued, server.issued_by_scope.copy()
    upstream_before = len(token_registry.requests())

    for round_ in range(2):
        for n, image in enumerate(pushed):
            assert_dir_matches(
                copy_to_dir(skopeo, f"{name}:v{n}", tmp_path / f"r{round_}-v{n}", creds), image
            )

    upstream = token_registry.requests()[upstream_before:]
    tokens = server.issued - issued
    new_scopes = {key for key, count in (server.issued_by_scope - by_scope).items() if count}
    # Every upstream request was authorised (at most one unauthenticated first try per worker) ...
    assert sum(status == 401 for _, _, status in upstream) <= workers
    assert sum(status == 200 for _, _, status in upstream) >= len(pushed) * 4
    # ... by at most one token per worker: for these credentials and this scope only.
    assert 1 <= tokens <= workers, (tokens, len(upstream))
    assert tokens * 5 <= len(upstream)  # measured: 2 tokens for 22 upstream requests
    assert new_scopes == {(token_registry.username, "repository:private/many:pull")}


@pytest.fixture
def own_token_registry(tmp_path) -> Iterator[Registry]:
    """A token registry of this test alone: the test breaks its token service."""
    started = start_registry(tmp_path / "token-registry", token=True)
    yield started
    started.stop()


def test_a_failing_token_service_is_said_once_and_sends_no_doomed_request(
    own_token_registry, images, proxy_factory
):
    registry = own_token_registry
    server = registry.token_server
    assert server is not None
    for repository in ("public/first", "public/second", "public/third"):
        push(registry, repository, "v1", images.synthetic(layers=1, layer_size=10_000, seed=70))
    proxy = proxy_factory(insecure=(registry.host,), workers=1)
    base = f"{proxy.url}/v2/{registry.host}"
    accept = {"Accept": OCI_MANIFEST}
    # The proxy learns the registry's challenge (and gets a token for this scope).
    assert requests.get(f"{base}/public/first/manifests/v1", headers=accept, timeout=10).status_code == 200

    server.failing = True
    before = len(registry.requests())
    for repository in ("public/second", "public/third", "public/second"):
        failed = requests.get(f"{base}/{repository}/manifests/v1", headers=accept, timeout=30)
        assert failed.status_code == 502, failed.text
        error = failed.json()["errors"][0]
        assert error["code"] == "UPSTREAM_UNAVAILABLE"
        assert server.realm in error["message"] and "token service" in error["message"]
        assert "retry" in error["message"]
    # The registry's challenge said a token is needed: no request went out without one, and the
    # token was asked for once per request.
    assert registry.requests()[before:] == []
    assert server.failed == 3
    lines = [line for line in proxy.log_tail(400).splitlines() if "token service failing" in line]
    assert len(lines) == 1 and server.realm in lines[0], proxy.log_tail()

    server.failing = False
    assert requests.get(f"{base}/public/second/manifests/v1", headers=accept, timeout=10).status_code == 200
    assert "token service answers again" in proxy.log_tail(400)
