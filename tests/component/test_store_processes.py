"""The proxy's cache across real processes (as gunicorn workers use it) and on a really full disk.

Processes are started with multiprocessing's `spawn`, so each one opens the store itself, exactly
like separate worker processes; the writer is killed with SIGKILL, not asked to stop.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagewarm.digest import Digest
from proxy.cache.eviction import Evictor
from proxy.cache.flight import Follower, Writer
from proxy.cache.manifest_store import ManifestStore
from proxy.cache.store import BlobStore, CachedBlob, DiskFull, FetchAborted, NotCached, StoreError
from tests.small_disk import small_tmpfs

pytestmark = pytest.mark.component

SPAWN = multiprocessing.get_context("spawn")
CHUNK = 128 * 1024


def _digest(data: bytes) -> Digest:
    return Digest.of(data)


# -- child processes (module level: spawn imports them by name) ----------------------------------


def _claim_and_report(root: str, source: str, digest: str, barrier: Any, results: Any) -> None:
    """Claim `digest`; as the writer copy `source` slowly, else stream what the claim gives."""
    store = BlobStore(Path(root))
    size = os.path.getsize(source)
    barrier.wait()
    claimed = store.claim(digest, size)
    if isinstance(claimed, Writer):
        with open(source, "rb") as upstream:
            while chunk := upstream.read(CHUNK):
                claimed.write(chunk)
                time.sleep(0.03)  # a slow upstream (~1 s): the others arrive while the blob is partial
        claimed.commit()
        results.put(("writer", os.getpid(), None))
        return
    kind = "follower" if isinstance(claimed, Follower) else "cached"
    body = b"".join(claimed) if isinstance(claimed, Follower) else claimed.read()
    results.put((kind, os.getpid(), _digest(body)))


def _write_half_then_hang(root: str, source: str, digest: str, written: Any) -> None:
    store = BlobStore(Path(root))
    data = Path(source).read_bytes()
    writer = store.claim(digest, len(data))
    assert isinstance(writer, Writer)
    writer.write(data[: len(data) // 2])
    written.set()
    time.sleep(600)  # killed with SIGKILL long before this ends


def _follow_until_the_end(root: str, digest: str, attached: Any, results: Any) -> None:
    store = BlobStore(Path(root))
    claimed = store.claim(digest, stall_timeout=30)
    if not isinstance(claimed, Follower):
        results.put(("not a follower", type(claimed).__name__))
        attached.put(os.getpid())
        return
    received = len(next(claimed))
    attached.put(os.getpid())
    try:
        for chunk in claimed:
            received += len(chunk)
    except FetchAborted:
        results.put(("aborted", received))
        return
    results.put(("completed", received))


def _hold_open(root: str, digest: str, opened: Any, release: Any) -> None:
    store = BlobStore(Path(root))
    with store.open(digest) as blob:
        opened.set()
        release.wait(60)
        assert len(blob.read()) == blob.size


# -- tests ----------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, str, bytes]:
    data = os.urandom(4 << 20)
    path = tmp_path / "upstream-blob"
    path.write_bytes(data)
    return path, _digest(data), data


def test_eight_processes_one_writer_everyone_gets_the_bytes(tmp_path: Path, source: tuple) -> None:
    path, digest, data = source
    root = tmp_path / "cache"
    BlobStore(root).close()
    barrier, results = SPAWN.Barrier(8), SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_claim_and_report, args=(str(root), str(path), digest, barrier, results))
        for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    kinds = sorted(kind for kind, _, _ in reports)
    assert kinds.count("writer") == 1, reports
    assert all(body == digest for kind, _, body in reports if kind != "writer"), reports
    # The writer takes over a second; all seven arrive within it and stream the partial file.
    assert kinds.count("follower") >= 5, reports
    store = BlobStore(root)
    assert store.open(digest).read() == data and store.total_bytes() == len(data)


def test_kill_9_writer_aborts_followers_and_leaves_no_blob(tmp_path: Path, source: tuple) -> None:
    path, digest, data = source
    root = tmp_path / "cache"
    written, attached, results = SPAWN.Event(), SPAWN.Queue(), SPAWN.Queue()
    writer = SPAWN.Process(target=_write_half_then_hang, args=(str(root), str(path), digest, written))
    writer.start()
    assert written.wait(60), "the writer never wrote"
    followers = [
        SPAWN.Process(target=_follow_until_the_end, args=(str(root), digest, attached, results))
        for _ in range(3)
    ]
    for follower in followers:
        follower.start()
    for _ in followers:
        attached.get(timeout=60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(10)
    outcomes = [results.get(timeout=60) for _ in followers]
    for follower in followers:
        follower.join(30)
    assert [kind for kind, _ in outcomes] == ["aborted"] * 3, outcomes
    assert all(received == len(data) // 2 for _, received in outcomes), (
        "followers got exactly what was written"
    )

    store = BlobStore(root)  # every other process is gone: this is a restart
    assert store.recovered
    assert not store.has(digest)
    with pytest.raises(NotCached):
        store.open(digest)
    stale = [(p.name, p.stat().st_size) for p in store.layout.partial_dir.iterdir()]
    assert stale == [(store.layout.partial(digest).name, len(data) // 2)], "kept for resuming"
    assert list(store.layout.locks_dir.iterdir()) == []
    assert store.total_bytes() == 0

    again = store.claim(digest, len(data))
    assert isinstance(again, Writer), "a new claim succeeds after the writer died"
    assert again.adopted == len(data) // 2
    again.resume(len(data))
    again.write(data[len(data) // 2 :])
    again.commit()
    assert store.open(digest).read() == data
    assert list(store.layout.partial_dir.iterdir()) == []


def test_new_claim_takes_over_from_a_killed_writer_while_others_run(tmp_path: Path, source: tuple) -> None:
    """No restart in between: a live store (another worker) claims after the writer was killed."""
    path, digest, data = source
    root = tmp_path / "cache"
    live = BlobStore(root)  # holds the store open, so nobody does a full recovery
    written = SPAWN.Event()
    writer = SPAWN.Process(target=_write_half_then_hang, args=(str(root), str(path), digest, written))
    writer.start()
    assert written.wait(60)
    assert isinstance(live.claim(digest, stall_timeout=0.5), Follower)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(10)
    assert not live.has(digest)
    again = live.claim(digest, len(data))
    assert isinstance(again, Writer)
    again.write(data)
    again.commit()
    with live.open(digest) as blob:
        assert blob.read() == data
    assert [p.name for p in live.layout.partial_dir.iterdir()] == []


def test_eviction_spares_a_blob_another_process_is_serving(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = BlobStore(root)
    served, idle = os.urandom(1 << 20), os.urandom(1 << 20)
    for data in (served, idle):
        store.put_bytes(_digest(data), data)
    opened, release = SPAWN.Event(), SPAWN.Event()
    reader = SPAWN.Process(target=_hold_open, args=(str(root), _digest(served), opened, release))
    reader.start()
    try:
        assert opened.wait(60)
        report = Evictor(store, max_bytes=1 << 20, high=0.5, low=0.0001).run_once()
        assert (report.evicted_count, report.skipped_in_use) == (1, 1)
        assert store.has(_digest(served)) and not store.has(_digest(idle))
    finally:
        release.set()
        reader.join(30)
    assert reader.exitcode == 0, "the reader read the whole blob"
    assert Evictor(store, max_bytes=1 << 20, high=0.5, low=0.0001).run_once().evicted_count == 1
    assert store.total_bytes() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (we run as root), unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "2m") as mount:
        yield mount


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_disk_full_cleans_up_and_recovers(small_disk: Path) -> None:
    store = BlobStore(small_disk / "cache")
    free_at_start = _free(small_disk)
    big = os.urandom(3 << 20)
    writer = store.claim(_digest(big), len(big))
    assert isinstance(writer, Writer)
    with pytest.raises(DiskFull) as raised:
        for start in range(0, len(big), CHUNK):
            writer.write(big[start : start + CHUNK])
    assert isinstance(raised.value, OSError) and isinstance(raised.value, StoreError)
    assert not store.has(_digest(big)) and store.total_bytes() == 0
    assert list(store.layout.partial_dir.iterdir()) == [] and list(store.layout.locks_dir.iterdir()) == []
    assert _free(small_disk) >= free_at_start - 64 * 1024, "the partial's space was given back"

    # Full because of something else: the write fails cleanly, and succeeds once space is freed.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free_at_start - (512 << 10)))
    blob = os.urandom(1 << 20)
    writer = store.claim(_digest(blob), len(blob))
    assert isinstance(writer, Writer)
    with pytest.raises(DiskFull):
        writer.write(blob)
    with pytest.raises(DiskFull):
        ManifestStore(small_disk / "cache").put(_digest(blob), blob, "application/octet-stream")
    assert list(store.layout.partial_dir.iterdir()) == []
    filler.unlink()
    writer = store.claim(_digest(blob), len(blob))
    assert isinstance(writer, Writer)
    writer.write(blob)
    writer.commit()
    claimed = store.claim(_digest(blob))
    assert isinstance(claimed, CachedBlob) and claimed.read() == blob
    assert store.total_bytes() == len(blob)


def test_a_resumed_fill_that_fills_the_disk_still_verifies_what_streams_through(small_disk: Path) -> None:
    """The running hash handed over at DiskFull covers the adopted bytes, read back from the file."""
    root = small_disk / "cache"
    big = os.urandom(3 << 20)
    half = len(big) // 3
    first = BlobStore(root)
    writer = first.claim(_digest(big), len(big))
    assert isinstance(writer, Writer)
    writer.write(big[:half])
    writer._close_partial()  # killed: its files stay, its flocks go
    assert writer._lock_fd is not None
    os.close(writer._lock_fd)
    writer._lock_fd = None
    first.close()

    store = BlobStore(root)
    again = store.claim(_digest(big), len(big))
    assert isinstance(again, Writer) and again.adopted == half
    again.resume(len(big))
    written = half
    with pytest.raises(DiskFull):
        while written < len(big):
            again.write(big[written : written + CHUNK])
            written += CHUNK
    check = again.running_hash()  # what a fetch keeps verifying with once it streams through
    check.update(big[written:])
    assert check.hexdigest() == _digest(big).hex
    assert list(store.layout.partial_dir.iterdir()) == [] and list(store.layout.locks_dir.iterdir()) == []
