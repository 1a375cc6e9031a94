"""Resuming a fill a killed writer left half done: the parsing of a source's `Content-Range` (hostile
input, so with hypothesis), and the store's adoption of a partial file on a real filesystem (a
writer's death is simulated by closing its descriptors: the files stay, their flocks vanish; the
same with real processes and SIGKILL is in tests/component/test_proxy_resume.py)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagewarm.digest import Digest
from proxy.cache.flight import Follower, ResumePolicy, Writer
from proxy.cache.hashing import ResumedHash
from proxy.cache.store import BlobStore, DigestMismatch, FetchAborted, PartialSweep
from proxy.ranges import ContentRange, parse_content_range, parse_length, resumed_size

DATA = hashlib.sha256(b"resume").digest() * 4096  # 128 KiB, not all one byte
DIGEST = Digest.of(DATA)
HALF = len(DATA) // 2
POLICY = ResumePolicy(min_bytes=1000, max_age=3600)

sizes = st.integers(min_value=0, max_value=10**19 - 1)


# -- Content-Range --------------------------------------------------------------------------------


@given(first=sizes, length=st.integers(min_value=1, max_value=10**12), extra=sizes, known=st.booleans())
def test_content_range_round_trips(first: int, length: int, extra: int, known: bool) -> None:
    last = first + length - 1
    total = last + 1 + extra if known else None
    if last >= 10**19 or (total is not None and total >= 10**19):
        return
    span = ContentRange(first, last, total)
    assert parse_content_range(str(span)) == span
    assert parse_content_range(f"  {str(span).upper()}\t") == span  # unit is case-insensitive


@given(st.text())
def test_any_text_parses_or_is_refused_without_raising(text: str) -> None:
    span = parse_content_range(text)
    if span is not None:
        assert 0 <= span.first <= span.last
        assert span.total is None or span.last < span.total


@given(st.from_regex(r"\Abytes [0-9]{1,5}-[0-9]{1,5}/([0-9]{1,5}|\*)\Z"))
def test_well_formed_ranges_are_refused_only_when_impossible(text: str) -> None:
    first, rest = text.removeprefix("bytes ").split("-")
    last, total = rest.split("/")
    possible = int(first) <= int(last) and (total == "*" or int(last) < int(total))
    assert (parse_content_range(text) is not None) == possible


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes */1000",  # the unsatisfied form a 416 carries
        "bytes 10-5/100",
        "bytes 0-100/100",  # last must be inside the total
        "items 0-9/10",
        "bytes=0-9/10",
        "bytes 0-9/10, 20-29/40",
        "bytes -1-9/10",
        "bytes 0x1-9/10",
        "bytes \u0661-9/10",  # an Arabic-Indic one: int() would take it
        "bytes 1-\u00b2/10",  # superscript two: isdigit() says yes, int() raises
        "bytes 1" + "0" * 19 + "-2" + "0" * 19 + "/" + "9" * 25,
        "bytes  0-9/10",
        "bytes 0 - 9/10",
    ],
)
def test_malformed_or_impossible_content_ranges_are_refused(header: str | None) -> None:
    assert parse_content_range(header) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("1234", 1234),
        (" 7\t", 7),
        (None, None),
        ("", None),
        ("-1", None),
        ("1e3", None),
        ("\u00b2", None),
        ("\u0661", None),
        ("1" * 20, None),
    ],
)
def test_content_length(value: str | None, expected: int | None) -> None:
    assert parse_length(value) == expected


@given(
    status=st.sampled_from([200, 206, 204, 416, 500]),
    start=st.integers(min_value=0, max_value=2000),
    first=st.integers(min_value=0, max_value=2000),
    last=st.integers(min_value=0, max_value=3000),
    total=st.one_of(st.none(), st.integers(min_value=0, max_value=3001)),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=3001)),
)
def test_only_the_exact_rest_of_the_blob_resumes(
    status: int, start: int, first: int, last: int, total: int | None, length: int | None
) -> None:
    header = f"bytes {first}-{last}/{'*' if total is None else total}"
    size = resumed_size(status, header, None if length is None else str(length), start)
    exact = (
        status == 206
        and start > 0
        and first == start
        and total is not None
        and first <= last == total - 1
        and (length is None or length == total - start)
    )
    assert size == (total if exact else None)


def test_a_200_or_a_missing_content_range_never_resumes() -> None:
    assert resumed_size(200, "bytes 100-199/200", "100", 100) is None  # a 200 is the whole blob
    assert resumed_size(206, None, "100", 100) is None
    assert resumed_size(206, "bytes 100-149/200", "50", 100) is None  # not the rest: fetch it whole
    assert resumed_size(206, "bytes 100-199/200", "100", 100) == 200


# -- the resumed hash -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    prefix=st.integers(min_value=0, max_value=20_000),
    step=st.integers(min_value=1, max_value=7000),
    copy_at=st.integers(min_value=0, max_value=10),
)
def test_resumed_hash_equals_hashlib_of_the_whole_file(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, prefix: int, step: int, copy_at: int
) -> None:
    path = tmp_path_factory.mktemp("hash") / "file"
    prefix = min(prefix, len(data))
    path.write_bytes(data[:prefix])
    hashed = ResumedHash("sha256", os.open(path, os.O_RDONLY), prefix)
    with path.open("ab") as appender:
        for index, start in enumerate(range(prefix, len(data), step)):
            chunk = data[start : start + step]
            appender.write(chunk)
            appender.flush()
            hashed.update(chunk)
            if index == copy_at:
                assert hashed.copy().hexdigest() == hashlib.sha256(data[: start + len(chunk)]).hexdigest()
    assert hashed.hexdigest() == hashlib.sha256(data).hexdigest()
    hashed.close()


def test_resumed_hash_reports_a_file_shorter_than_it_was_told(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    hashed = ResumedHash("sha256", os.open(path, os.O_RDONLY), 10)
    with pytest.raises(OSError, match="ends at byte 3"):
        hashed.hexdigest()
    hashed.close()


# -- adopting a killed writer's partial file ------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    opened = BlobStore(tmp_path / "cache", resume=POLICY)
    yield opened
    opened.close()


def killed_after(store: BlobStore, data: bytes, count: int) -> Path:
    """A writer that wrote `count` bytes of `data` and died: its partial file stays, unlocked."""
    writer = store.claim(Digest.of(data), len(data))
    assert isinstance(writer, Writer)
    writer.write(data[:count])
    partial = writer.path
    writer._close_partial()
    assert writer._lock_fd is not None
    os.close(writer._lock_fd)
    writer._lock_fd = None
    return partial


def claim_writer(store: BlobStore, data: bytes = DATA) -> Writer:
    claimed = store.claim(Digest.of(data))
    assert isinstance(claimed, Writer)
    return claimed


def test_a_claim_adopts_the_partial_file_and_resumes_it(store: BlobStore) -> None:
    partial = killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    assert writer.adopted == HALF
    assert not partial.exists(), "undecided: hidden from followers, who wait for the claim"
    with pytest.raises(FetchAborted, match="published nothing"):
        store.claim(DIGEST, stall_timeout=0.2)
    writer.resume(len(DATA))
    assert (writer.bytes_written, writer.expected_size, writer.resumed) == (HALF, len(DATA), True)
    follower = store.claim(DIGEST)
    assert isinstance(follower, Follower)
    assert next(follower) == DATA[:HALF], "a follower reads the adopted bytes from byte 0"
    for start in range(HALF, len(DATA), 10_000):
        writer.write(DATA[start : start + 10_000])
    writer.commit()
    assert b"".join(follower) == DATA[HALF:]
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA
    assert store.total_bytes() == len(DATA)
    assert list(store.layout.partial_dir.iterdir()) == []


def test_a_follower_of_the_dead_writer_follows_the_adopting_one(store: BlobStore) -> None:
    """The adopted inode is only appended to: bytes read under the dead writer stay right."""
    writer = claim_writer(store)
    writer.write(DATA[:HALF])
    early = store.claim(DIGEST)
    assert isinstance(early, Follower)
    assert next(early) == DATA[:HALF]
    writer._close_partial()  # the writer dies; its follower stays
    assert writer._lock_fd is not None
    os.close(writer._lock_fd)
    writer._lock_fd = None
    adopting = claim_writer(store)
    adopting.resume(len(DATA))
    adopting.write(DATA[HALF:])
    adopting.commit()
    assert b"".join(early) == DATA[HALF:]


def test_starting_over_abandons_the_adopted_inode(store: BlobStore) -> None:
    writer = claim_writer(store)
    writer.write(DATA[:HALF])
    early = store.claim(DIGEST)
    assert isinstance(early, Follower)
    assert next(early) == DATA[:HALF]
    writer._close_partial()
    assert writer._lock_fd is not None
    os.close(writer._lock_fd)
    writer._lock_fd = None
    adopting = claim_writer(store)
    assert adopting.adopted == HALF
    adopting.start_over()
    assert adopting.adopted == 0 and adopting.bytes_written == 0
    adopting.write(DATA)
    adopting.commit()
    with pytest.raises(FetchAborted, match="aborted"):
        next(early)  # its inode never commits: never a clean end after the old bytes
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


def test_writing_without_deciding_starts_over(store: BlobStore) -> None:
    killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    assert writer.adopted == HALF
    writer.write(DATA)  # a caller that knows nothing of resuming fills from byte 0
    writer.commit()
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


def test_an_abort_before_deciding_puts_the_partial_file_back(store: BlobStore) -> None:
    partial = killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    writer.abort()  # e.g. the upstream was down: nothing was added, nothing is lost
    assert partial.stat().st_size == HALF
    assert claim_writer(store).adopted == HALF


def test_a_corrupt_partial_file_ends_in_a_mismatch_and_the_next_fill_starts_clean(store: BlobStore) -> None:
    partial = killed_after(store, DATA, HALF)
    with partial.open("r+b") as damaged:  # e.g. a node that lost power: a block that never reached disk
        damaged.seek(4096)
        damaged.write(bytes(4096))
    writer = claim_writer(store)
    assert writer.adopted == HALF
    writer.resume(len(DATA))
    writer.write(DATA[HALF:])
    with pytest.raises(DigestMismatch):
        writer.commit()
    assert not store.has(DIGEST)
    assert list(store.layout.partial_dir.iterdir()) == [], "the bad bytes are gone"
    again = claim_writer(store)
    assert again.adopted == 0
    again.write(DATA)
    again.commit()
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


def test_running_hash_of_a_resumed_fill_covers_the_adopted_bytes(store: BlobStore) -> None:
    killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    writer.resume(len(DATA))
    writer.write(DATA[HALF : HALF + 1000])
    assert writer.running_hash().hexdigest() == hashlib.sha256(DATA[: HALF + 1000]).hexdigest()
    writer.abort()
    assert list(store.layout.partial_dir.iterdir()) == []


def test_an_abort_while_the_adopted_bytes_are_hashed_again_cleans_up(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "big", resume=POLICY)
    data = os.urandom(32 << 20)
    killed_after(store, data, len(data) - 1)
    writer = claim_writer(store, data)
    writer.resume(len(data))
    writer.abort()  # stops the re-read where it is (it does not finish reading 32 MiB first)
    assert not list(store.layout.partial_dir.iterdir()) and not list(store.layout.locks_dir.iterdir())
    assert claim_writer(store, data).adopted == 0
    store.close()


def test_too_small_or_too_old_partial_files_are_not_adopted_and_go_at_restart(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = BlobStore(root, resume=POLICY)
    small = hashlib.sha256(b"small").digest() * 20  # 640 bytes, under min_bytes
    old = hashlib.sha256(b"old").digest() * 100
    young = hashlib.sha256(b"young").digest() * 100
    small_partial = killed_after(store, small, 600)
    old_partial = killed_after(store, old, 2000)
    young_partial = killed_after(store, young, 2000)
    past = time.time() - POLICY.max_age - 60
    os.utime(old_partial, (past, past))
    assert claim_writer(store, small).adopted == 0
    store.close()

    reopened = BlobStore(root, resume=POLICY)  # alone: a restart
    assert reopened.recovered
    assert not small_partial.exists() and not old_partial.exists()
    assert young_partial.stat().st_size == 2000, "kept for the next claim of its digest"
    assert claim_writer(reopened, young).adopted == 2000
    reopened.close()


def test_the_periodic_sweep_removes_what_grew_too_old(store: BlobStore) -> None:
    partial = killed_after(store, DATA, HALF)
    assert store.remove_stale_partials() == PartialSweep(resumable=1, resumable_bytes=HALF)
    past = time.time() - POLICY.max_age - 1
    os.utime(partial, (past, past))
    assert store.remove_stale_partials() == PartialSweep(removed=1, freed_bytes=HALF)
    assert not partial.exists()


def test_the_sweep_leaves_a_live_writer_alone_even_when_its_file_is_old(store: BlobStore) -> None:
    writer = claim_writer(store)
    writer.write(DATA[:HALF])
    past = time.time() - POLICY.max_age - 1
    os.utime(writer.path, (past, past))
    assert store.remove_stale_partials() == PartialSweep(), "neither removed nor counted: it is live"
    writer.write(DATA[HALF:])
    writer.commit()
    assert store.has(DIGEST)


def test_an_adopted_file_held_undecided_survives_another_store_starting(store: BlobStore) -> None:
    killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    second = BlobStore(store.root, resume=POLICY)  # a worker starting meanwhile
    assert not second.recovered
    second.close()
    writer.resume(len(DATA))
    writer.write(DATA[HALF:])
    writer.commit()
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


def test_concurrent_claims_after_a_death_make_one_resumed_writer(store: BlobStore) -> None:
    killed_after(store, DATA, HALF)
    results: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        claimed = store.claim(DIGEST, stall_timeout=10)
        if isinstance(claimed, Writer):
            assert claimed.adopted == HALF
            claimed.resume(len(DATA))
            time.sleep(0.05)
            claimed.write(DATA[HALF:])
            claimed.commit()
            kind = "writer"
        else:
            body = b"".join(claimed) if isinstance(claimed, Follower) else claimed.read()
            assert body == DATA
            kind = "other"
        with lock:
            results.append(kind)

    threads = [threading.Thread(target=claim) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == ["other"] * 4 + ["writer"]


def test_a_partial_file_someone_holds_locked_is_not_adopted(store: BlobStore) -> None:
    partial = killed_after(store, DATA, HALF)
    holder = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # e.g. a descriptor a forked child inherited
        writer = claim_writer(store)
        assert writer.adopted == 0, "never wait on a lock that may be held for good"
        writer.write(DATA)
        writer.commit()
    finally:
        os.close(holder)
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


# -- a transfer that broke off leaves its partial file for the next fill -------------------------


def test_an_interrupted_fill_keeps_its_bytes_and_the_next_claim_resumes_them(store: BlobStore) -> None:
    writer = claim_writer(store)
    writer.write(DATA[:HALF])
    follower = store.claim(DIGEST)
    assert isinstance(follower, Follower)
    assert next(follower) == DATA[:HALF]

    assert writer.interrupt() == "kept"
    with pytest.raises(FetchAborted, match="aborted"):
        next(follower)  # the writer's failure, never a kept file taken for a live fill
    assert writer.path.stat().st_size == HALF
    assert list(store.layout.locks_dir.iterdir()) == [], "the claim is released"
    assert writer.interrupt() == "closed" and writer.path.exists(), "idempotent"

    resuming = claim_writer(store)  # a Writer, not a Follower of the kept file
    assert resuming.adopted == HALF
    resuming.resume(len(DATA))
    resuming.write(DATA[HALF:])
    resuming.commit()
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA
    assert list(store.layout.partial_dir.iterdir()) == []


def test_a_kept_file_is_resumed_again_across_several_broken_attempts(store: BlobStore) -> None:
    step = len(DATA) // 4
    writer = claim_writer(store)
    writer.write(DATA[:step])
    assert writer.interrupt() == "kept"
    for attempt in (1, 2):
        writer = claim_writer(store)
        assert writer.adopted == attempt * step
        writer.resume(len(DATA))
        writer.write(DATA[attempt * step : (attempt + 1) * step])
        assert writer.interrupt() == "kept"
    last = claim_writer(store)
    assert last.adopted == 3 * step
    last.resume(len(DATA))
    last.write(DATA[3 * step :])
    last.commit()
    with store.open(DIGEST) as blob:
        assert blob.read() == DATA


def test_a_resumed_fill_that_adds_nothing_falls_back_to_byte_0(store: BlobStore) -> None:
    """A source that always breaks off at the same byte: the attempt after gets no further, so its
    bytes go and the next one starts over (each attempt progresses or falls back, never a loop)."""
    killed_after(store, DATA, HALF)
    writer = claim_writer(store)
    writer.resume(len(DATA))
    assert writer.interrupt() == "no_progress"
    assert list(store.layout.partial_dir.iterdir()) == []
    fresh = claim_writer(store)
    assert fresh.adopted == 0
    fresh.write(DATA[:HALF])
    assert fresh.interrupt() == "kept", "from byte 0, the same bytes are progress again"


def test_an_interrupted_fill_under_the_resume_minimum_is_removed(store: BlobStore) -> None:
    writer = claim_writer(store)
    writer.write(DATA[: POLICY.min_bytes - 1])
    assert writer.interrupt() == "too_small"
    assert list(store.layout.partial_dir.iterdir()) == [] and list(store.layout.locks_dir.iterdir()) == []


def test_interrupting_a_writer_that_already_stopped_or_holds_an_undecided_file(store: BlobStore) -> None:
    writer = claim_writer(store)
    writer.write(DATA[:HALF])
    writer.abort()  # e.g. the disk filled: the writer stopped caching, then the transfer broke off
    assert writer.interrupt() == "closed"
    assert list(store.layout.partial_dir.iterdir()) == []

    partial = killed_after(store, DATA, HALF)
    undecided = claim_writer(store)
    assert undecided.interrupt() == "closed"  # as `abort`: the adopted file goes back untouched
    assert partial.stat().st_size == HALF
    assert claim_writer(store).adopted == HALF
