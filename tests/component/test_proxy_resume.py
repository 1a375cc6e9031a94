"""A blob half-fetched when its proxy is killed, or whose upstream connection breaks off, resumes on
the next pull instead of starting over.

Real parts: the proxy (`python -m imagewarm proxy`, gunicorn workers) killed with SIGKILL on its
whole process group, a real docker-registry upstream (which answers `Range` with 206) behind a
throttled link (`localcluster.slowlink`) that counts what crosses it and can break a connection at
a chosen byte, and real proxies as peers. Whatever the partial file holds, only a blob that verifies
is ever served whole.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from imagewarm.digest import Digest
from imagewarm.reference import registry_segment
from localcluster.images import push
from localcluster.slowlink import SlowLink
from proxy.cache.paths import Layout
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

MiB = 1 << 20
LINK_BYTES_PER_SECOND = 16 * MiB


def blob_url(proxy, registry_host: str, repository: str, digest: str) -> str:
    return f"{proxy.url}/v2/{registry_segment(registry_host)}/{repository}/blobs/{digest}"


def wait_until(condition, timeout: float = 60, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.02)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def blob_requests(registry, repository: str, since: int) -> list[tuple[str, int]]:
    """(method, status) of the registry's blob requests for `repository` after its first `since`."""
    prefix = f"/v2/{repository}/blobs/"
    return [
        (method, status) for method, path, status in registry.requests()[since:] if path.startswith(prefix)
    ]


def plant_partial(cache_dir: Path, digest: str, data: bytes) -> Path:
    """A partial file as a killed writer leaves it (the proxy not running)."""
    partial = Layout(cache_dir).partial(Digest.parse(digest))
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    return partial


def test_a_blob_half_fetched_when_the_proxy_is_killed_resumes_after_the_restart(
    registry, images, proxy_factory
):
    image = images.synthetic(layers=1, layer_size=64 * MiB, seed=140)
    push(registry, "resume/big", "v1", image)
    layer = image.layers[0]
    expected = layer.read_bytes()
    link = SlowLink("127.0.0.1", registry.port, LINK_BYTES_PER_SECOND).start()
    try:
        proxy = proxy_factory(insecure=(link.host,), workers=2)
        partial = Layout(proxy.cache_dir).partial(Digest.parse(layer.digest))
        url = blob_url(proxy, link.host, "resume/big", layer.digest)
        since = len(registry.requests())

        started = time.monotonic()
        puller = requests.get(url, stream=True, timeout=60)
        assert puller.status_code == 200, puller.text
        wait_until(lambda: size_of(partial) >= layer.size // 2, message="half the blob never reached disk")
        proxy.stop(signal.SIGKILL)  # the whole process group: master and workers
        first_seconds = time.monotonic() - started
        puller.close()
        first_link_bytes = link.bytes_down
        left = size_of(partial)
        assert left >= layer.size // 2
        assert not Layout(proxy.cache_dir).blob(Digest.parse(layer.digest)).exists()

        proxy.start()
        assert size_of(partial) == left, "the restart keeps the partial file for resuming"
        before = link.bytes_down
        started = time.monotonic()
        got = requests.get(url, timeout=120)
        second_seconds = time.monotonic() - started
        second_link_bytes = link.bytes_down - before
    finally:
        link.stop()

    assert got.status_code == 200, (got.status_code, got.text, proxy.log_tail())
    assert got.headers["Content-Length"] == str(layer.size)
    assert got.content == expected, "the whole blob from byte 0, the adopted half read back from disk"
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == layer.digest
    # The source sent only what was missing: a 206 of the rest, crossing the link once. (The registry
    # logs a request when it ends, which for the killed one may be when the link closes: any order.)
    assert sorted(blob_requests(registry, "resume/big", since)) == [("GET", 200), ("GET", 206)]
    assert layer.size - left <= second_link_bytes < 0.75 * layer.size, (second_link_bytes, layer.size)
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 1
    assert proxy.metric("imagewarm_proxy_resumed_bytes_total") == left
    assert proxy.metric("imagewarm_proxy_resume_fallbacks_total") == 0
    assert "resuming the fill" in proxy.log_tail(200)
    cached = Layout(proxy.cache_dir).blob(Digest.parse(layer.digest))
    wait_until(cached.exists, message="the resumed blob was never committed")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == layer.digest.split(":")[1]
    assert not list(Layout(proxy.cache_dir).partial_dir.iterdir())

    print(
        f"\n{'attempt':<28}{'seconds':>9}{'link MiB':>10}\n"
        f"{'killed at the half':<28}{first_seconds:>9.2f}{first_link_bytes / MiB:>10.1f}\n"
        f"{'after restart (resumed)':<28}{second_seconds:>9.2f}{second_link_bytes / MiB:>10.1f}\n"
        f"blob {layer.size / MiB:.1f} MiB, adopted {left / MiB:.1f} MiB, "
        f"link {LINK_BYTES_PER_SECOND / MiB:.0f} MiB/s"
    )


@pytest.mark.parametrize("how", ["reset", "close", "stall"])
def test_a_fill_whose_upstream_connection_breaks_off_is_resumed_by_the_next_pull(
    registry, images, proxy_factory, how
):
    """No kill: the link resets the connection, closes it short of Content-Length, or stalls it past
    the proxy's read timeout, at half the blob. The pull and its follower fail; the next pull gets the
    whole blob and the link carries only the missing half."""
    image = images.synthetic(layers=1, layer_size=64 * MiB, seed=145)
    push(registry, f"resume/cut-{how}", "v1", image)
    layer = image.layers[0]
    expected = layer.read_bytes()
    link = SlowLink("127.0.0.1", registry.port, LINK_BYTES_PER_SECOND).start()
    try:
        proxy = proxy_factory(
            insecure=(link.host,),
            workers=2,
            extra=("--read-timeout", "1s", "--eviction-interval", "200ms"),
        )
        layout = Layout(proxy.cache_dir)
        partial = layout.partial(Digest.parse(layer.digest))
        url = blob_url(proxy, link.host, f"resume/cut-{how}", layer.digest)
        since = len(registry.requests())

        link.cut_after(layer.size // 2, how)
        started = time.monotonic()
        puller = requests.get(url, stream=True, timeout=60)
        assert puller.status_code == 200, puller.text
        wait_until(lambda: size_of(partial) >= 8 * MiB, message="the fill never started")
        follower = requests.get(url, stream=True, timeout=60)  # any worker: it follows the one fill
        assert follower.status_code == 200 and follower.raw.read(MiB) == expected[:MiB]
        for each in (puller, follower):
            with pytest.raises(requests.RequestException):
                each.content  # noqa: B018 (reading the body is the point)
        first_seconds = time.monotonic() - started
        first_link_bytes = link.bytes_down
        wait_until(
            lambda: proxy.metric("imagewarm_proxy_interrupted_fills_total", partial="kept") == 1,
            message="the broken-off fill never kept its partial file",
        )
        kept = size_of(partial)
        assert link.cuts == 1
        assert layer.size // 4 <= kept <= layer.size // 2, kept
        assert not layout.blob(Digest.parse(layer.digest)).exists()
        assert list(layout.locks_dir.iterdir()) == [], "the failed writer released its claim"
        wait_until(
            lambda: proxy.metric("imagewarm_proxy_resumable_partial_bytes") == kept,
            message="the upkeep's gauge of kept partial files",
        )

        before = link.bytes_down
        started = time.monotonic()
        got = requests.get(url, timeout=120)
        second_seconds = time.monotonic() - started
        second_link_bytes = link.bytes_down - before
    finally:
        link.stop()

    assert got.status_code == 200, (got.status_code, got.text, proxy.log_tail())
    assert got.content == expected, "the whole blob from byte 0, the kept bytes read back from disk"
    assert layer.size - kept <= second_link_bytes < 0.75 * layer.size, (second_link_bytes, layer.size)
    # The cut GET, the follower's access check (HEAD), and the rest (206): nothing fetched twice.
    assert sorted(blob_requests(registry, f"resume/cut-{how}", since)) == [
        ("GET", 200),
        ("GET", 206),
        ("HEAD", 200),
    ]
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 1
    assert proxy.metric("imagewarm_proxy_resumed_bytes_total") == kept
    assert proxy.metric("imagewarm_proxy_resume_fallbacks_total") == 0
    assert proxy.metric("imagewarm_proxy_digest_mismatches_total") == 0, "a cut is no mismatch"
    assert "upstream blob transfer broke off" in proxy.log_tail(300)
    cached = layout.blob(Digest.parse(layer.digest))
    wait_until(cached.exists, message="the resumed blob was never committed")
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == layer.digest.split(":")[1]
    assert not list(layout.partial_dir.iterdir())
    wait_until(lambda: proxy.metric("imagewarm_proxy_resumable_partial_bytes") == 0, message="gauge reset")

    print(
        f"\n{'attempt (' + how + ')':<28}{'seconds':>9}{'link MiB':>10}\n"
        f"{'cut at the half':<28}{first_seconds:>9.2f}{first_link_bytes / MiB:>10.1f}\n"
        f"{'next pull (resumed)':<28}{second_seconds:>9.2f}{second_link_bytes / MiB:>10.1f}\n"
        f"blob {layer.size / MiB:.1f} MiB, kept {kept / MiB:.1f} MiB, "
        f"link {LINK_BYTES_PER_SECOND / MiB:.0f} MiB/s"
    )


def test_a_corrupt_partial_file_is_never_served_and_the_next_pull_starts_clean(
    registry, images, proxy_factory, tmp_path
):
    image = images.synthetic(layers=1, layer_size=8 * MiB, seed=141)
    push(registry, "resume/corrupt", "v1", image)
    layer = image.layers[0]
    expected = layer.read_bytes()
    damaged = bytearray(expected[: layer.size // 2])
    damaged[1 * MiB : 1 * MiB + 4096] = bytes(4096)  # a block that never reached the disk
    cache_dir = tmp_path / "cache"
    plant_partial(cache_dir, layer.digest, bytes(damaged))
    proxy = proxy_factory(insecure=(registry.host,), workers=2, cache_dir=cache_dir)
    url = blob_url(proxy, registry.host, "resume/corrupt", layer.digest)
    since = len(registry.requests())

    # The adopted bytes go out first (as a follower's would), but never the end: the transfer fails.
    with pytest.raises(requests.RequestException):
        requests.get(url, timeout=60).content  # noqa: B018 (reading the body is the point)
    layout = Layout(cache_dir)
    assert not layout.blob(Digest.parse(layer.digest)).exists()
    wait_until(lambda: not list(layout.partial_dir.iterdir()), message="the bad partial file stayed")
    assert proxy.metric("imagewarm_proxy_resume_fallbacks_total", reason="mismatch") == 1
    assert "a resumed fill did not verify" in proxy.log_tail(200)

    got = requests.get(url, timeout=60)
    assert got.status_code == 200 and got.content == expected
    # One resume, then a clean fetch from byte 0: no loop of resuming the bad bytes again.
    assert blob_requests(registry, "resume/corrupt", since) == [("GET", 206), ("GET", 200)]
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 1


def test_a_fill_resumes_from_a_peer_which_answers_the_range(registry, images, proxy_factory, tmp_path):
    image = images.synthetic(layers=1, layer_size=6 * MiB, seed=142)
    push(registry, "resume/peer", "v1", image)
    layer = image.layers[0]
    expected = layer.read_bytes()
    neighbour = proxy_factory(insecure=(registry.host,), workers=1)
    assert requests.get(blob_url(neighbour, registry.host, "resume/peer", layer.digest), timeout=30).ok
    since = len(registry.requests())
    cache_dir = tmp_path / "node-cache"
    adopted = 2 * MiB + 12345
    plant_partial(cache_dir, layer.digest, expected[:adopted])
    node = proxy_factory(
        insecure=(registry.host,), workers=1, cache_dir=cache_dir, extra=("--peer", neighbour.url)
    )

    got = requests.get(blob_url(node, registry.host, "resume/peer", layer.digest), timeout=60)

    assert got.status_code == 200 and got.content == expected
    # The upstream was asked only whether this client may read the blob, never for its bytes.
    assert blob_requests(registry, "resume/peer", since) == [("HEAD", 200)]
    assert node.metric("imagewarm_proxy_resumed_fills_total") == 1
    assert node.metric("imagewarm_proxy_resumed_bytes_total") == adopted
    assert node.metric("imagewarm_proxy_upstream_bytes_total", registry="peers") == layer.size - adopted
    assert neighbour.metric("imagewarm_proxy_requests_total", route="blob", status="206") == 1


class _PeerWithoutRanges(BaseHTTPRequestHandler):
    """A peer proxy that has the blob and always sends it whole (200), whatever `Range` asks."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.ranges.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        data = self.server.blob  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_a_peer_that_ignores_the_range_gives_the_whole_blob_and_the_fill_starts_over(
    registry, images, proxy_factory, tmp_path
):
    image = images.synthetic(layers=1, layer_size=4 * MiB, seed=144)
    push(registry, "resume/oldpeer", "v1", image)
    layer = image.layers[0]
    expected = layer.read_bytes()
    peer = ThreadingHTTPServer(("127.0.0.1", 0), _PeerWithoutRanges)
    peer.blob, peer.ranges = expected, []  # type: ignore[attr-defined]
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    try:
        cache_dir = tmp_path / "cache"
        adopted = 2 * MiB
        plant_partial(cache_dir, layer.digest, expected[:adopted])
        node = proxy_factory(
            insecure=(registry.host,),
            workers=1,
            cache_dir=cache_dir,
            extra=("--peer", f"http://127.0.0.1:{peer.server_address[1]}"),
        )
        since = len(registry.requests())

        got = requests.get(blob_url(node, registry.host, "resume/oldpeer", layer.digest), timeout=60)
    finally:
        peer.shutdown()

    assert got.status_code == 200 and got.content == expected
    assert peer.ranges == [f"bytes={adopted}-"]  # type: ignore[attr-defined]
    assert blob_requests(registry, "resume/oldpeer", since) == [("HEAD", 200)]
    assert node.metric("imagewarm_proxy_resume_fallbacks_total", reason="range_ignored") == 1
    assert node.metric("imagewarm_proxy_upstream_bytes_total", registry="peers") == layer.size
    cached = Layout(cache_dir).blob(Digest.parse(layer.digest))
    wait_until(cached.exists, message="the blob was never committed")
    assert cached.read_bytes() == expected


def test_partial_files_too_small_to_resume_are_fetched_whole(registry, images, proxy_factory, tmp_path):
    image = images.synthetic(layers=1, layer_size=3 * MiB, seed=143)
    push(registry, "resume/small", "v1", image)
    layer = image.layers[0]
    cache_dir = tmp_path / "cache"
    partial = plant_partial(cache_dir, layer.digest, layer.read_bytes()[: 512 * 1024])
    proxy = proxy_factory(insecure=(registry.host,), workers=1, cache_dir=cache_dir)
    assert not partial.exists(), "the start-up removes what is not worth resuming"
    since = len(registry.requests())

    got = requests.get(blob_url(proxy, registry.host, "resume/small", layer.digest), timeout=60)

    assert got.status_code == 200 and got.content == layer.read_bytes()
    assert blob_requests(registry, "resume/small", since) == [("GET", 200)]
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 0


def test_the_running_proxy_removes_partial_files_grown_too_old_to_resume(proxy_factory, registry):
    """No --max-cache-bytes: the master's upkeep still sweeps what a killed worker left long ago."""
    proxy = proxy_factory(insecure=(registry.host,), workers=1, extra=("--eviction-interval", "200ms"))
    layout = Layout(proxy.cache_dir)
    old = plant_partial(proxy.cache_dir, "sha256:" + "ab" * 32, bytes(2 * MiB))
    young = plant_partial(proxy.cache_dir, "sha256:" + "cd" * 32, bytes(2 * MiB))
    past = time.time() - 7 * 3600
    os.utime(old, (past, past))
    wait_until(lambda: not old.exists(), timeout=30, message="the old partial file stayed")
    assert young.exists(), "a recent one waits for its digest's next fill"
    assert "removed partial files of killed or broken-off fills too old to resume" in proxy.log_tail(100)
    wait_until(
        lambda: proxy.metric("imagewarm_proxy_resumable_partial_bytes") == 2 * MiB,
        timeout=30,
        message="the gauge of resumable partial files",
    )
    assert sorted(p.name for p in layout.partial_dir.iterdir()) == [young.name]
