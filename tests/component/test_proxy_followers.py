"""Followers: a pull that finds another process filling the blob joins that fill. Real gunicorn
proxies, real registries; the writer is a separate process holding the store's claim (as another
worker would), so it can be held at a known point and killed with SIGKILL.

- While the upstream is down the writer may still fill from a peer: its followers must join, the
  client's access decided as for cached content (a stored grant, or a peer that has the blob).
- A follower whose writer dies before it sent a byte takes over the fill, as a new request would.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from imagewarm.digest import Digest
from imagewarm.reference import registry_segment
from localcluster.images import push
from localcluster.registry import start_registry
from proxy.cache.flight import Writer
from proxy.cache.paths import Layout
from proxy.cache.store import BlobStore
from tests.component import proxy_fixtures

pytestmark = pytest.mark.component
proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name

SPAWN = multiprocessing.get_context("spawn")


def _fill(root: str, digest: str, source: str, first: int, claimed: Any, go: Any) -> None:
    """Claim `digest` in the store at `root` and write the first `first` bytes of `source`; once `go`
    is set write the rest and commit (never, for a writer that is to be killed)."""
    data = Path(source).read_bytes()
    writer = BlobStore(Path(root)).claim(Digest.parse(digest), len(data))
    assert isinstance(writer, Writer)
    writer.write(data[:first])
    claimed.set()
    go.wait(600)
    writer.write(data[first:])
    writer.commit()


def start_writer(cache_dir: Path, layer: Any, first: int) -> tuple[Any, Any]:
    claimed, go = SPAWN.Event(), SPAWN.Event()
    process = SPAWN.Process(
        target=_fill, args=(str(cache_dir), layer.digest, str(layer.path), first, claimed, go), daemon=True
    )
    process.start()
    assert claimed.wait(30), "the writer process never claimed the blob"
    return process, go


def workers_with_open(parent: int, path: Path) -> list[int]:
    """The child processes of `parent` (gunicorn's workers) that hold `path` open."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if any(os.readlink(fd) == str(path) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def blob_url(proxy, registry, repository: str, digest: str) -> str:
    return f"{proxy.url}/v2/{registry_segment(registry.host)}/{repository}/blobs/{digest}"


def test_followers_join_a_fill_while_the_upstream_is_down(tmp_path, images, proxy_factory):
    upstream = start_registry(tmp_path / "upstream", auth=True)
    try:
        image = images.synthetic(layers=1, layer_size=4 << 20, seed=90)
        push(upstream, "private/app", "v1", image)
        layer = image.layers[0]
        credentials = upstream.auth
        assert credentials is not None
        # The neighbour has the blob, and a grant for these credentials.
        neighbour = proxy_factory(insecure=(upstream.host,), workers=1)
        got = requests.get(
            blob_url(neighbour, upstream, "private/app", layer.digest), auth=credentials, timeout=30
        )
        assert got.content == layer.read_bytes()
        node = proxy_factory(insecure=(upstream.host,), workers=2, extra=("--peer", neighbour.url))
    finally:
        upstream.stop()

    writer, go = start_writer(node.cache_dir, layer, first=3 << 20)
    url = blob_url(node, upstream, "private/app", layer.digest)
    try:
        pullers = [requests.get(url, auth=credentials, stream=True, timeout=60) for _ in range(3)]
        # The first bytes arrived: every puller joined the fill, the upstream down.
        for puller in pullers:
            assert puller.status_code == 200, puller.text
            assert puller.headers["X-Imagewarm-Cache"] == "joined"
            assert puller.headers["Content-Length"] == str(layer.size)
        # Access still holds: the neighbour refuses an anonymous client, so the node does too.
        anonymous = requests.get(url, auth=("", ""), timeout=60)
        assert anonymous.status_code == 401, anonymous.text
        go.set()
        for puller in pullers:
            assert puller.content == layer.read_bytes()
    finally:
        go.set()
        writer.join(30)
    assert writer.exitcode == 0
    assert Layout(node.cache_dir).blob(Digest.parse(layer.digest)).read_bytes() == layer.read_bytes()


@pytest.mark.parametrize("first", [0, 100_000], ids=["nothing-written", "less-than-a-chunk-written"])
def test_a_follower_takes_over_the_fill_when_its_writer_is_killed_before_it_sent_a_byte(
    registry, images, proxy_factory, first
):
    image = images.synthetic(layers=1, layer_size=2 << 20, seed=91 + first % 7)
    push(registry, "follow/killed", "v1", image)
    layer = image.layers[0]
    proxy = proxy_factory(insecure=(registry.host,), workers=2)
    assert proxy.process is not None
    gets_before = len(registry.blob_gets("follow/killed"))
    writer, _go = start_writer(proxy.cache_dir, layer, first=first)
    partial = Layout(proxy.cache_dir).partial(Digest.parse(layer.digest))
    result: dict[str, requests.Response] = {}
    puller = threading.Thread(
        target=lambda: result.update(
            got=requests.get(blob_url(proxy, registry, "follow/killed", layer.digest), timeout=60)
        )
    )
    puller.start()
    try:
        deadline = time.monotonic() + 30
        while not workers_with_open(proxy.process.pid, partial):  # the pull follows the writer
            assert time.monotonic() < deadline and puller.is_alive(), proxy.log_tail()
            time.sleep(0.02)
        os.kill(writer.pid, signal.SIGKILL)
        puller.join(60)
    finally:
        if writer.is_alive():
            os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
    got = result["got"]
    assert got.status_code == 200, (got.status_code, got.text, proxy.log_tail())
    assert got.content == layer.read_bytes()
    assert registry.blob_gets("follow/killed")[gets_before:] == [layer.digest]  # the take-over's fetch
    cached = Layout(proxy.cache_dir).blob(Digest.parse(layer.digest))
    deadline = time.monotonic() + 30
    while not cached.exists():  # committed just after the client got the last byte
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.05)
    assert cached.read_bytes() == layer.read_bytes()
    assert "taking over" in proxy.log_tail(200)
