"""Conformance suite for the proxy's cache (blob store, single flight, eviction, tags, manifests).

Every test takes the `make_store` fixture, parametrised over the store implementations: a new
implementation joins `IMPLEMENTATIONS` and must pass all of it. The stores here run on a real
filesystem (tmp_path); the cross-process behaviour is in tests/component/test_store_processes.py.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagewarm.digest import Digest, InvalidDigest
from proxy.cache.eviction import Evictor
from proxy.cache.flight import Follower, Writer
from proxy.cache.hashing import PipelinedHash
from proxy.cache.manifest_store import ManifestStore
from proxy.cache.store import (
    BlobStore,
    CachedBlob,
    DigestMismatch,
    FetchAborted,
    NotCached,
    SizeMismatch,
    StoreError,
)
from proxy.cache.tags import TagIndex

IMPLEMENTATIONS = [pytest.param(BlobStore, id="disk")]
MakeStore = Callable[..., BlobStore]


@pytest.fixture(params=IMPLEMENTATIONS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """make_store(root=None, **options): a store on tmp_path (or `root`); reopen by calling again."""
    implementation = request.param
    opened: list[BlobStore] = []

    def make(root: Path | None = None, **options: float) -> BlobStore:
        store = implementation(root or tmp_path / "cache", **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def sha256(data: bytes) -> Digest:
    return Digest.of(data)


def sha512(data: bytes) -> Digest:
    return Digest.of(data, "sha512")


def text_sha256(data: bytes) -> str:
    """The digest as the tag index and the manifest store take it: text (parsed there)."""
    return str(Digest.of(data))


def text_sha512(data: bytes) -> str:
    return str(Digest.of(data, "sha512"))


def leftovers(store: BlobStore) -> list[str]:
    """Files in the partial and lock directories: empty whenever no write is in progress."""
    return sorted(p.name for d in (store.layout.partial_dir, store.layout.locks_dir) for p in d.iterdir())


def fill(store: BlobStore, data: bytes, chunk: int = 1000) -> None:
    writer = store.claim(sha256(data), len(data))
    assert isinstance(writer, Writer)
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])
    writer.commit()


# -- has / open / claim / commit / abort ---------------------------------------------------------


def test_miss_is_not_cached(make_store: MakeStore) -> None:
    store = make_store()
    digest = sha256(b"absent")
    assert not store.has(digest)
    assert store.size(digest) is None
    with pytest.raises(NotCached) as raised:
        store.open(digest)
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, StoreError)


def test_claim_write_commit_then_served(make_store: MakeStore) -> None:
    store = make_store()
    data = bytes(range(256)) * 1000
    digest = sha256(data)
    writer = store.claim(digest, len(data))
    assert isinstance(writer, Writer)
    assert not store.has(digest), "nothing is visible before commit"
    writer.write(data[:100_000])
    writer.write(data[100_000:])
    assert writer.bytes_written == len(data)
    writer.commit()
    assert store.has(digest) and store.size(digest) == len(data)
    assert store.total_bytes() == len(data)
    with store.open(digest) as blob:
        assert blob.size == len(data) and blob.read() == data
        assert blob.path.read_bytes() == data
    assert leftovers(store) == []
    again = store.claim(digest)
    assert isinstance(again, CachedBlob)
    again.close()


def test_abort_keeps_nothing_and_frees_the_claim(make_store: MakeStore) -> None:
    store = make_store()
    data = b"abc" * 1000
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data[:10])
    writer.abort()
    assert not store.has(sha256(data)) and leftovers(store) == []
    second = store.claim(sha256(data))
    assert isinstance(second, Writer), "an aborted claim must not block the next writer"
    second.write(data)
    second.commit()
    assert store.open(sha256(data)).read() == data


def test_context_manager_aborts_on_exception(make_store: MakeStore) -> None:
    store = make_store()
    data = b"payload"
    with pytest.raises(RuntimeError), store.claim(sha256(data)) as writer:
        writer.write(data)
        raise RuntimeError("upstream connection reset")
    assert not store.has(sha256(data)) and leftovers(store) == []


def test_a_dropped_writer_releases_its_claim(make_store: MakeStore) -> None:
    store = make_store()
    writer = store.claim(sha256(b"dropped"))
    assert isinstance(writer, Writer)
    writer.write(b"drop")
    del writer  # e.g. a request handler that died without abort()
    assert leftovers(store) == []
    assert isinstance(store.claim(sha256(b"dropped")), Writer)


def test_running_hash_continues_after_disk_full_style_abort(make_store: MakeStore) -> None:
    store = make_store()
    data = b"0123456789" * 100
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data[:300])
    check = writer.running_hash()
    writer.abort()
    check.update(data[300:])
    assert f"sha256:{check.hexdigest()}" == str(sha256(data))


def test_digest_mismatch_keeps_nothing(make_store: MakeStore) -> None:
    store = make_store()
    writer = store.claim(sha256(b"the real bytes"))
    assert isinstance(writer, Writer)
    writer.write(b"other bytes!!!")
    with pytest.raises(DigestMismatch):
        writer.commit()
    assert not store.has(sha256(b"the real bytes")) and leftovers(store) == []
    assert store.total_bytes() == 0


def test_size_mismatch_short_and_oversize(make_store: MakeStore) -> None:
    store = make_store()
    data = b"0123456789"
    short = store.claim(sha256(data), expected_size=len(data))
    assert isinstance(short, Writer)
    short.write(data[:5])
    with pytest.raises(SizeMismatch):
        short.commit()
    oversize = store.claim(sha256(data), expected_size=4)
    assert isinstance(oversize, Writer)
    with pytest.raises(SizeMismatch):
        oversize.write(data)
    assert isinstance(SizeMismatch("x"), DigestMismatch)
    assert not store.has(sha256(data)) and leftovers(store) == []


def test_sha512_and_what_names_no_blob(make_store: MakeStore) -> None:
    store = make_store()
    data = b"sha512 content"
    writer = store.claim(sha512(data))
    assert isinstance(writer, Writer)
    writer.write(data)
    writer.commit()
    assert store.open(sha512(data)).read() == data
    # The store takes parsed Digests only: text that is not one never names a path.
    for bad in ["md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:" + "A" * 64, "sha256:../../etc", "x"]:
        with pytest.raises(InvalidDigest):
            Digest.parse(bad)
    # A file in the blob tree whose name is not a digest is no blob.
    stray = store.layout.blobs_dir / "sha256" / "zz" / "not-a-digest"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    assert [info.digest for info in store.blobs()] == [sha512(data)]


def test_put_bytes_verifies(make_store: MakeStore) -> None:
    store = make_store()
    store.put_bytes(sha256(b"small"), b"small")
    store.put_bytes(sha256(b"small"), b"small")  # idempotent, counted once
    assert store.open(sha256(b"small")).read() == b"small"
    assert store.total_bytes() == 5
    with pytest.raises(DigestMismatch):
        store.put_bytes(sha256(b"small"), b"smalL")
    with pytest.raises(DigestMismatch):
        store.put_bytes(sha256(b"other"), b"smalL")
    assert not store.has(sha256(b"other"))


# -- followers ------------------------------------------------------------------------------------


def _follow_in_threads(store: BlobStore, digest: str, count: int) -> tuple[list[threading.Thread], list]:
    """Start `count` threads that claim `digest` and consume what they get; returns once all claimed."""
    results: list = []
    claimed_all = threading.Barrier(count + 1)

    def follow() -> None:
        claimed = store.claim(digest)
        claimed_all.wait(10)
        try:
            if isinstance(claimed, Follower):
                results.append(("follower", b"".join(claimed)))
            elif isinstance(claimed, CachedBlob):
                results.append(("cached", claimed.read()))
            else:
                results.append(("writer", None))
        except FetchAborted as error:
            results.append(("aborted", error))

    threads = [threading.Thread(target=follow) for _ in range(count)]
    for thread in threads:
        thread.start()
    claimed_all.wait(10)
    return threads, results


def test_followers_get_identical_bytes(make_store: MakeStore) -> None:
    store = make_store()
    data = hashlib.sha256(b"seed").digest() * 40_000  # 1.25 MiB
    digest = sha256(data)
    writer = store.claim(digest, len(data))
    assert isinstance(writer, Writer)
    threads, results = _follow_in_threads(store, digest, 4)
    for start in range(0, len(data), 64 * 1024):
        writer.write(data[start : start + 64 * 1024])
        time.sleep(0.002)
    writer.commit()
    for thread in threads:
        thread.join(10)
    assert [kind for kind, _ in results] == ["follower"] * 4
    assert all(body == data for _, body in results)


def test_follower_starts_before_the_writer_finishes(make_store: MakeStore) -> None:
    store = make_store()
    data = b"first part|second part"
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data[:11])
    follower = store.claim(sha256(data))
    assert isinstance(follower, Follower)
    assert next(follower) == data[:11], "followers receive bytes before the commit"
    writer.write(data[11:])
    writer.commit()
    assert b"".join(follower) == data[11:]


def test_follower_sees_abort(make_store: MakeStore) -> None:
    store = make_store()
    data = b"z" * 100_000
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data[:50_000])
    threads, results = _follow_in_threads(store, sha256(data), 2)
    writer.abort()
    for thread in threads:
        thread.join(10)
    assert [kind for kind, _ in results] == ["aborted", "aborted"]


def test_follower_sees_digest_mismatch_as_abort(make_store: MakeStore) -> None:
    store = make_store()
    writer = store.claim(sha256(b"expected"))
    assert isinstance(writer, Writer)
    writer.write(b"corrupt!")
    follower = store.claim(sha256(b"expected"))
    assert isinstance(follower, Follower)
    assert next(follower) == b"corrupt!"
    with pytest.raises(DigestMismatch):
        writer.commit()
    with pytest.raises(FetchAborted):
        next(follower)


def test_follower_stall_is_bounded(make_store: MakeStore) -> None:
    store = make_store()
    writer = store.claim(sha256(b"never finished"))
    assert isinstance(writer, Writer)
    writer.write(b"never")
    follower = store.claim(sha256(b"never finished"), stall_timeout=0.3)
    assert isinstance(follower, Follower)
    assert next(follower) == b"never"
    started = time.monotonic()
    with pytest.raises(FetchAborted, match="stalled"):
        next(follower)
    assert 0.25 < time.monotonic() - started < 5
    writer.abort()


# -- restart ---------------------------------------------------------------------------------------


def test_restart_removes_stale_partials_and_recounts(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(tmp_path / "a")
    fill(store, b"kept" * 100)
    writer = store.claim(sha256(b"interrupted"))
    assert isinstance(writer, Writer)
    writer.write(b"inter")
    partial = writer.path
    # Simulate a process death: the descriptors (and their flocks) vanish, the files stay.
    writer._close_partial()
    os.close(writer._lock_fd)  # the lock file stays too, unlocked
    writer._lock_fd = None
    store.close()
    assert partial.exists()
    reopened = make_store(tmp_path / "a")
    assert reopened.recovered
    assert not partial.exists() and not reopened.has(sha256(b"interrupted"))
    assert reopened.total_bytes() == 400
    assert isinstance(reopened.claim(sha256(b"interrupted")), Writer)


def test_restart_removes_unpublished_and_temporary_files(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(tmp_path / "c")
    # What a writer killed before publishing its partial, or a killed small write, leaves behind.
    unpublished = store.layout.new_partial(sha256(b"x"), "0123abcd")
    temporary = store.layout.tmp("feedbeef")
    unpublished.write_bytes(b"half")
    temporary.write_bytes(b"{")
    store.close()
    make_store(tmp_path / "c")
    assert not unpublished.exists() and not temporary.exists()


def test_second_process_keeps_a_live_writers_partial(make_store: MakeStore, tmp_path: Path) -> None:
    first = make_store(tmp_path / "b")
    writer = first.claim(sha256(b"live"))
    assert isinstance(writer, Writer)
    writer.write(b"li")
    second = make_store(tmp_path / "b")  # another worker starting while the first is writing
    assert not second.recovered
    assert writer.path.exists()
    writer.write(b"ve")
    writer.commit()
    assert second.open(sha256(b"live")).read() == b"live"


# -- eviction --------------------------------------------------------------------------------------


def _three_blobs(store: BlobStore) -> list[bytes]:
    blobs = [bytes([n]) * 1000 for n in (1, 2, 3)]
    for data in blobs:
        fill(store, data)
        time.sleep(0.02)  # distinct last-use times even on coarse filesystem clocks
    return blobs


def test_lru_order(make_store: MakeStore) -> None:
    store = make_store(touch_interval=0)
    oldest, middle, newest = _three_blobs(store)
    store.open(sha256(oldest)).close()  # reading makes it the most recently used
    report = Evictor(store, max_bytes=3000, high=0.5, low=0.5).run_once()
    assert (report.evicted_count, report.evicted_bytes) == (2, 2000)
    assert report.bytes_before == 3000 and report.bytes_after == 1000
    assert store.has(sha256(oldest)) and not store.has(sha256(middle)) and not store.has(sha256(newest))
    assert store.total_bytes() == 1000


def test_under_high_watermark_nothing_is_evicted(make_store: MakeStore) -> None:
    store = make_store()
    _three_blobs(store)
    report = Evictor(store, max_bytes=3400, high=0.9, low=0.1).run_once()
    assert report.evicted_count == 0 and store.total_bytes() == 3000


def test_pins_and_in_use_blobs_survive_eviction(make_store: MakeStore) -> None:
    store = make_store()
    first, second, third = _three_blobs(store)
    store.pin(sha256(first), "NodeImage/node-1")
    store.pin(sha256(first), "ImagePullJob/ns/job")
    reading = store.open(sha256(second))
    report = Evictor(store, max_bytes=3000, high=0.1, low=0.1).run_once()
    assert (report.evicted_count, report.skipped_pinned, report.skipped_in_use) == (1, 1, 1)
    assert store.has(sha256(first)) and store.has(sha256(second)) and not store.has(sha256(third))
    assert reading.read() == second
    reading.close()
    store.unpin(sha256(first), "NodeImage/node-1")
    assert store.pins(sha256(first)) == {"ImagePullJob/ns/job"}
    store.unpin(sha256(first), "ImagePullJob/ns/job")
    assert not store.is_pinned(sha256(first))
    report = Evictor(store, max_bytes=3000, high=0.1, low=0.1).run_once()
    assert report.evicted_count == 2 and store.total_bytes() == 0


def test_blob_being_written_is_not_evicted(make_store: MakeStore) -> None:
    store = make_store()
    _three_blobs(store)
    data = b"w" * 5000
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data)
    Evictor(store, max_bytes=1000, high=0.1, low=0.0 + 0.01).run_once()
    writer.commit()
    assert store.open(sha256(data)).read() == data


def test_evictor_rejects_bad_watermarks(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(ValueError):
        Evictor(store, max_bytes=0)
    with pytest.raises(ValueError):
        Evictor(store, max_bytes=10, high=0.5, low=0.8)


# -- tag index and manifests ----------------------------------------------------------------------


def test_tag_index_round_trip_and_overwrite(tmp_path: Path) -> None:
    tags = TagIndex(tmp_path)
    assert tags.get("docker.io", "library/nginx", "1.27") is None
    first = text_sha256(b"manifest one")
    tags.set("docker.io", "library/nginx", "1.27", first, "application/vnd.oci.image.index.v1+json")
    entry = tags.get("docker.io", "library/nginx", "1.27")
    assert entry is not None and entry.digest == first
    assert entry.media_type == "application/vnd.oci.image.index.v1+json"
    assert 0 <= entry.age() < 5
    second = text_sha512(b"manifest two")
    tags.set(
        "docker.io", "library/nginx", "1.27", second, "application/vnd.docker.distribution.manifest.v2+json"
    )
    reopened = TagIndex(tmp_path).get("docker.io", "library/nginx", "1.27")
    assert reopened is not None and reopened.digest == second
    assert reopened.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    # Same repository and tag on another registry, or another tag, are other entries.
    assert tags.get("registry.corp:5000", "library/nginx", "1.27") is None
    assert tags.get("docker.io", "library/nginx", "1.27.0") is None
    assert tags.get("docker.io", "library/NGINX", "1.27") is None
    with pytest.raises(InvalidDigest):
        tags.set("docker.io", "library/nginx", "x", "sha256:nope", "a/b")


def test_tag_index_ignores_a_torn_entry(tmp_path: Path) -> None:
    tags = TagIndex(tmp_path)
    tags.set("docker.io", "library/busybox", "1", text_sha256(b"m"), "application/json")
    tags.layout.tag("docker.io", "library/busybox", "1").write_bytes(b'{"digest": "sha2')
    assert tags.get("docker.io", "library/busybox", "1") is None


def test_manifest_store_keeps_bytes_and_media_type(tmp_path: Path) -> None:
    manifests = ManifestStore(tmp_path)
    # Bytes a JSON round trip would change: key order, spacing, a trailing newline, a leading newline.
    data = b'\n{"schemaVersion":2,  "mediaType" : "x", "z":1,"a":[ ]}\n'
    media_type = "application/vnd.oci.image.manifest.v1+json"
    assert manifests.get(text_sha256(data)) is None
    manifests.put(text_sha256(data), data, media_type)
    assert ManifestStore(tmp_path).get(text_sha256(data)) == (data, media_type)
    assert manifests.has(text_sha256(data))
    manifests.put(text_sha512(data), data, "")
    assert manifests.get(text_sha512(data)) == (data, "")
    with pytest.raises(DigestMismatch):
        manifests.put(text_sha256(b"other"), data, media_type)
    assert manifests.get(text_sha256(b"other")) is None
    with pytest.raises(ValueError):
        manifests.put(text_sha256(data), data, "bad\ntype")


# -- properties ------------------------------------------------------------------------------------

_cut_points = st.lists(st.integers(min_value=0, max_value=4096), max_size=12)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), cuts=_cut_points, algorithm=st.sampled_from(["sha256", "sha512"]))
def test_any_chunking_commits_to_the_digest(
    make_store: MakeStore, data: bytes, cuts: list[int], algorithm: str
) -> None:
    store = make_store()
    digest = sha256(data) if algorithm == "sha256" else sha512(data)
    claimed = store.claim(digest, len(data))
    if isinstance(claimed, CachedBlob):  # an earlier example stored the same bytes
        assert claimed.read() == data
        claimed.close()
        return
    assert isinstance(claimed, Writer)
    for chunk in _chunks(data, cuts):
        claimed.write(chunk)
    claimed.commit()
    with store.open(digest) as blob:
        assert blob.read() == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=1, max_size=4096),
    cuts=_cut_points,
    where=st.integers(min_value=0),
    change=st.sampled_from(["flip", "truncate", "extend"]),
)
def test_any_corruption_is_rejected(
    make_store: MakeStore, data: bytes, cuts: list[int], where: int, change: str
) -> None:
    store = make_store()
    digest = sha256(data)
    position = where % len(data)
    if change == "flip":
        corrupt = data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]
    elif change == "truncate":
        corrupt = data[:position]
    else:
        corrupt = data + data[position : position + 1]
    writer = store.claim(digest)  # no expected size: only the digest can catch it
    assert isinstance(writer, Writer)
    for chunk in _chunks(corrupt, cuts):
        writer.write(chunk)
    with pytest.raises(DigestMismatch):
        writer.commit()
    assert not store.has(digest) and leftovers(store) == []


# -- hashing on a thread of its own ---------------------------------------------------------------


@given(st.lists(st.binary(max_size=5000), max_size=40), st.integers(min_value=0, max_value=40))
def test_pipelined_hash_equals_hashlib_with_copies_midway(chunks: list[bytes], cut: int) -> None:
    pipelined = PipelinedHash("sha256")
    reference = hashlib.sha256()
    buffer = bytearray(5000)
    for index, chunk in enumerate(chunks):
        # Callers reuse mutable buffers: the hash must have kept its own bytes.
        view = memoryview(buffer)[: len(chunk)]
        view[:] = chunk
        pipelined.update(view if index % 2 else chunk)
        buffer[: len(chunk)] = bytes(len(chunk))
        reference.update(chunk)
        if index == cut:
            assert pipelined.copy().hexdigest() == reference.hexdigest()
    assert pipelined.hexdigest() == reference.hexdigest()
    assert pipelined.name == "sha256"
    with pytest.raises(ValueError, match="closed"):
        pipelined.update(b"late")


def test_writer_verify_releases_before_commit_and_refuses_later_writes(make_store: MakeStore) -> None:
    store = make_store()
    data = os.urandom(300_000)
    writer = store.claim(sha256(data))
    assert isinstance(writer, Writer)
    writer.write(data)
    writer.verify()
    assert not store.has(writer.digest)  # verified is not yet visible: commit makes it so
    with pytest.raises(FetchAborted):
        writer.write(b"x")
    writer.commit()
    assert store.open(writer.digest).read() == data
