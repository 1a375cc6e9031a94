"""The proxy (real gunicorn processes) when things go wrong mid-transfer: the client leaves, the proxy
is killed with SIGKILL (and the upstream ignores the range the restarted proxy asks to resume
with), the cache disk fills. An upstream that can hold a blob's second half back (a
small Flask registry written here) puts each failure at a known point of the transfer."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask, Response, request
from werkzeug.serving import make_server

from imagewarm.digest import Digest
from localcluster.images import push
from localcluster.processes import free_ports
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures
from tests.small_disk import small_tmpfs

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

MiB = 1 << 20
BLOB = hashlib.sha256(b"seed").digest() * (8 * MiB // 32)  # 8 MiB, not all one byte
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HALF = len(BLOB) // 2


class GatedUpstream:
    """Serves BLOB in every repository, always whole (it ignores `Range`, as a server may: RFC 9110
    lets it answer 200; `ranges` records what GETs asked for). While `hold` is set, a GET sends the
    first half, then waits for `release` before sending the rest."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.hits: Counter[str] = Counter()
        self.ranges: list[str | None] = []
        self.hold = threading.Event()
        self.release = threading.Event()
        self.first_half_sent = threading.Event()
        self.server = make_server("127.0.0.1", self.port, self._app(), threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _app(self) -> Flask:
        app = Flask("gated")

        @app.route("/v2/", methods=["GET", "HEAD"])
        def base() -> Response:
            return Response("{}", mimetype="application/json")

        @app.route("/v2/<path:repository>/blobs/<digest>", methods=["GET", "HEAD"])
        def blob(repository: str, digest: str) -> Response:
            self.hits[request.method] += 1
            if request.method == "GET":
                self.ranges.append(request.headers.get("Range"))
            headers = {"Content-Length": str(len(BLOB)), "Docker-Content-Digest": DIGEST}
            if digest != DIGEST:
                return Response("{}", status=404)
            if request.method == "HEAD" or not self.hold.is_set():
                return Response(BLOB, headers=headers, mimetype="application/octet-stream")
            return Response(self._gated(), headers=headers, mimetype="application/octet-stream")

        return app

    def _gated(self) -> Iterator[bytes]:
        yield BLOB[:HALF]
        self.first_half_sent.set()
        self.release.wait(60)
        yield BLOB[HALF:]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def gated() -> Iterator[GatedUpstream]:
    upstream = GatedUpstream()
    yield upstream
    upstream.close()


def blob_url(proxy, upstream_host: str, repository: str, digest: str) -> str:
    return f"{proxy.url}/v2/{upstream_host}/{repository}/blobs/{digest}"


def wait_until(condition, timeout: float = 30, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.05)


def partial_size(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in Layout(cache_dir).partial_dir.iterdir())


def test_client_leaving_a_cold_fetch_does_not_stop_it(gated, proxy_factory):
    proxy = proxy_factory(insecure=(gated.host,), workers=2)
    layout = Layout(proxy.cache_dir)
    url = blob_url(proxy, gated.host, "app", DIGEST)
    gated.hold.set()

    leaver = requests.get(url, stream=True, timeout=30)
    assert leaver.status_code == 200
    assert leaver.raw.read(MiB) == BLOB[:MiB]
    assert gated.first_half_sent.wait(10)
    leaver.close()  # the client goes away after its first MiB, the upstream still holds the rest back

    # A follower joins (in any worker) while the fetch is still waiting for the second half.
    follower: dict[str, bytes] = {}
    thread = threading.Thread(target=lambda: follower.update(body=requests.get(url, timeout=60).content))
    thread.start()
    time.sleep(0.5)
    assert not layout.blob(Digest.parse(DIGEST)).exists()
    gated.release.set()
    thread.join(60)

    assert follower["body"] == BLOB
    wait_until(layout.blob(Digest.parse(DIGEST)).exists, message="the blob was never cached")
    assert layout.blob(Digest.parse(DIGEST)).read_bytes() == BLOB
    assert gated.hits["GET"] == 1  # the leaver's fetch served the follower and filled the cache
    assert requests.get(url, timeout=30).content == BLOB
    assert gated.hits["GET"] == 1
    assert proxy.metric("imagewarm_proxy_upstream_bytes_total") == len(BLOB)


def test_kill_9_mid_transfer_then_restart_serves_correct_bytes_from_an_upstream_ignoring_range(
    gated, proxy_factory
):
    proxy = proxy_factory(insecure=(gated.host,), workers=2)
    layout = Layout(proxy.cache_dir)
    url = blob_url(proxy, gated.host, "app", DIGEST)
    gated.hold.set()

    client = requests.get(url, stream=True, timeout=30)
    assert client.raw.read(MiB) == BLOB[:MiB]
    assert gated.first_half_sent.wait(10)
    wait_until(lambda: partial_size(proxy.cache_dir) >= HALF, message="the first half never reached disk")
    proxy.stop(signal.SIGKILL)
    client.close()

    # The killed writer left its partial file behind; nothing is visible as a blob.
    assert partial_size(proxy.cache_dir) >= HALF
    assert not layout.blob(Digest.parse(DIGEST)).exists()

    gated.hold.clear()
    gated.release.set()
    proxy.start()
    left = partial_size(proxy.cache_dir)
    assert left >= HALF, "the restart keeps the stale partial file for resuming"
    assert not layout.blob(Digest.parse(DIGEST)).exists()
    response = requests.get(url, timeout=30)
    assert response.status_code == 200 and response.content == BLOB
    # The proxy asked for the rest; this upstream sent the whole blob (200), so it started over.
    assert gated.ranges == [None, f"bytes={left}-"]
    assert proxy.metric("imagewarm_proxy_resume_fallbacks_total", reason="range_ignored") == 1
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 0
    wait_until(layout.blob(Digest.parse(DIGEST)).exists, message="the refetched blob was never cached")
    assert hashlib.sha256(layout.blob(Digest.parse(DIGEST)).read_bytes()).hexdigest() == DIGEST.split(":")[1]
    assert not list(layout.partial_dir.iterdir()), "the abandoned partial file is gone"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB tmpfs (we run as root), unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "16m") as mount:
        yield mount


def test_full_disk_streams_through_and_caching_resumes_when_space_returns(
    registry, images, small_disk, proxy_factory
):
    image = images.synthetic(layers=1, layer_size=10 * MiB, compressed=False, seed=41)
    push(registry, "full/disk", "v1", image)
    layer = image.layers[0]
    expected = layer.path.read_bytes()
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (12 * MiB))  # leaves about 4 MiB for a 10 MiB blob
    proxy = proxy_factory(insecure=(registry.host,), cache_dir=small_disk / "cache", workers=2)
    layout = Layout(proxy.cache_dir)
    url = blob_url(proxy, registry.host, "full/disk", layer.digest)

    for attempt in range(2):  # full both times: nothing is kept, every pull streams through
        response = requests.get(url, timeout=60)
        assert response.status_code == 200 and response.content == expected, attempt
        assert not layout.blob(Digest.parse(layer.digest)).exists()
        assert not list(layout.partial_dir.iterdir())
    assert proxy.metric("imagewarm_proxy_uncached_streams_total", reason="disk_full") == 2

    filler.unlink()  # space returns
    assert requests.get(url, timeout=60).content == expected
    wait_until(layout.blob(Digest.parse(layer.digest)).exists, message="caching did not resume")
    gets_before = len(registry.blob_gets(digest=layer.digest))
    assert requests.get(url, timeout=60).content == expected
    assert len(registry.blob_gets(digest=layer.digest)) == gets_before  # served from the cache now
    assert proxy.metric("imagewarm_proxy_uncached_streams_total", reason="disk_full") == 2
