"""The proxy against an upstream that misbehaves on purpose (a small Flask registry written here):
token auth, wrong digests, truncated and stalled bodies, oversize manifests, cross-host redirects,
429/5xx. Every failure must reach the client as a failure, and nothing unverified may be cached."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from flask import Flask, Response, request
from werkzeug.serving import make_server

from localcluster.processes import free_ports
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": BLOB_DIGEST,
            "size": len(BLOB),
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
USER, PASSWORD = "alice", "s3cret"


class Hostile:
    """Two servers: the registry on 127.0.0.1 and a 'storage' host on 127.0.0.2 it redirects to."""

    def __init__(self) -> None:
        self.port, self.storage_port = free_ports(2)
        self.hits: Counter[str] = Counter()
        self.storage_headers: list[dict[str, str]] = []
        self.servers = [
            make_server("127.0.0.1", self.port, self._registry(), threaded=True),
            make_server("127.0.0.2", self.storage_port, self._storage(), threaded=True),
        ]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _registry(self) -> Flask:
        app = Flask("hostile")
        challenge = f'Bearer realm="http://{self.host}/token",service="hostile"'

        @app.route("/token")
        def token() -> Response:
            auth = request.authorization
            if auth and (auth.username, auth.password) != (USER, PASSWORD):
                return Response("bad credentials", status=401)
            who = auth.username if auth else "anonymous"
            self.hits["token"] += 1
            return Response(
                json.dumps({"token": f"tok-{who}", "expires_in": 300}), mimetype="application/json"
            )

        @app.route("/v2/<path:rest>", methods=["GET", "HEAD"])
        def v2(rest: str) -> Response:
            repository, kind, ref = rest.rsplit("/", 2)
            self.hits[f"{request.method} {repository}/{kind}"] += 1
            bearer = request.headers.get("Authorization", "")
            if not bearer.startswith("Bearer tok-"):
                return Response("{}", status=401, headers={"WWW-Authenticate": challenge})
            if repository.startswith("private") and bearer != f"Bearer tok-{USER}":
                return Response("{}", status=401, headers={"WWW-Authenticate": challenge})
            return self._serve(repository, kind, ref)

        return app

    def _serve(self, repository: str, kind: str, ref: str) -> Response:
        if repository == "busy":
            self.hits["429"] += 1
            return Response("slow down", status=429)
        if repository == "flaky" and self.hits[f"{request.method} flaky/{kind}"] <= 2:
            return Response("oops", status=503)
        if kind == "manifests":
            body = MANIFEST
            if repository == "oversize":
                body = MANIFEST + b" " * (5 << 20)
            headers = {"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}
            return Response(body, mimetype="application/vnd.oci.image.manifest.v1+json", headers=headers)
        if repository == "wrongdigest":
            return Response(BLOB[:-1] + b"X", mimetype="application/octet-stream")
        if repository == "truncated":

            def half() -> Iterator[bytes]:
                yield BLOB[: len(BLOB) // 2]

            return Response(half(), headers={"Content-Length": str(len(BLOB))})
        if repository == "stalled":

            def stall() -> Iterator[bytes]:
                yield BLOB[: len(BLOB) // 2]
                time.sleep(8)
                yield BLOB[len(BLOB) // 2 :]

            return Response(stall(), headers={"Content-Length": str(len(BLOB))})
        if repository == "redirect":
            return Response(
                status=307, headers={"Location": f"http://127.0.0.2:{self.storage_port}/blob/{ref}"}
            )
        return Response(BLOB, mimetype="application/octet-stream")

    def _storage(self) -> Flask:
        app = Flask("storage")

        @app.route("/blob/<digest>", methods=["GET", "HEAD"])
        def blob(digest: str) -> Response:
            self.storage_headers.append(dict(request.headers))
            return Response(BLOB, mimetype="application/octet-stream")

        return app

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    upstream = Hostile()
    yield upstream
    upstream.close()


@pytest.fixture
def proxy(hostile, proxy_factory):
    return proxy_factory(
        insecure=(hostile.host,), workers=2, extra=("--read-timeout", "1s", "--retries", "2")
    )


def url(proxy, hostile, repository: str, kind: str, ref: str) -> str:
    return f"{proxy.url}/v2/{hostile.host}/{repository}/{kind}/{ref}"


def fetch_fails(target: str, **kwargs) -> None:
    """The transfer must fail at the client: an error status, or a body cut short."""
    try:
        response = requests.get(target, timeout=30, **kwargs)
    except requests.RequestException:
        return
    assert response.status_code >= 400 or len(response.content) != len(BLOB), response.status_code


def test_token_flow_and_a_good_blob(proxy, hostile):
    assert requests.get(url(proxy, hostile, "good", "blobs", BLOB_DIGEST), timeout=10).content == BLOB
    manifest = requests.get(url(proxy, hostile, "good", "manifests", "v1"), timeout=10)
    assert manifest.content == MANIFEST and manifest.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert hostile.hits["token"] >= 1


@pytest.mark.parametrize("repository", ["wrongdigest", "truncated", "stalled"])
def test_bad_bodies_fail_the_transfer_and_cache_nothing(proxy, hostile, repository):
    target = url(proxy, hostile, repository, "blobs", BLOB_DIGEST)
    fetch_fails(target)
    fetch_fails(target)  # still not cached: it is fetched (and fails) again
    assert hostile.hits[f"GET {repository}/blobs"] >= 2
    assert not list((proxy.cache_dir / "blobs").rglob("*" + BLOB_DIGEST.split(":")[1]))


def test_oversize_manifest_is_refused(proxy, hostile):
    response = requests.get(url(proxy, hostile, "oversize", "manifests", "v1"), timeout=10)
    assert response.status_code == 502
    assert response.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    assert "limit" in response.json()["errors"][0]["message"]


def test_redirect_to_another_host_gets_no_credentials(proxy, hostile):
    response = requests.get(
        url(proxy, hostile, "redirect", "blobs", BLOB_DIGEST), auth=(USER, PASSWORD), timeout=10
    )
    assert response.content == BLOB
    assert hostile.storage_headers and all("Authorization" not in h for h in hostile.storage_headers)


def test_5xx_is_retried_a_bounded_number_of_times(proxy, hostile):
    response = requests.get(url(proxy, hostile, "flaky", "manifests", "v1"), timeout=20)
    assert response.status_code == 200 and response.content == MANIFEST
    busy = requests.get(url(proxy, hostile, "busy", "manifests", "v1"), timeout=20)
    assert busy.status_code == 429
    assert hostile.hits["429"] == 3  # --retries 2: three attempts, then give up


def test_private_repository_over_token_auth(proxy, hostile):
    target = url(proxy, hostile, "private", "blobs", BLOB_DIGEST)
    assert requests.get(target, auth=(USER, PASSWORD), timeout=10).content == BLOB
    anonymous = requests.get(target, timeout=10)
    assert anonymous.status_code == 401
    assert requests.get(target, auth=(USER, PASSWORD), timeout=10).content == BLOB
