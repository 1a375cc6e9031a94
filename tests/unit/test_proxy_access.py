"""Access decisions for private images (`proxy.upstream.access`, `proxy.upstream.grants`): grants
shared on disk between workers and restarts, honoured offline for a grace period, revoked by a
refusal. The upstream is a probe function (the decision is pure logic); the grants live on a real
filesystem (tmp_path)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.upstream.access import (
    CLOCK_SLACK,
    AccessControl,
    Decision,
    Unverifiable,
    newest,
    offline_answer,
    within,
)
from proxy.upstream.auth import Credentials
from proxy.upstream.grants import KEY_BYTES, GrantStore, grant_name

REGISTRY, REPOSITORY = "registry.corp:5000", "team/private"
ALICE = Credentials("alice-user", "alice-secret-password")
MALLORY = Credentials("alice-user", "guessed")
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Upstream:
    """The probe: answers as told, and counts how often it was asked."""

    def __init__(self) -> None:
        self.answer: RegistryError | None = None
        self.asked = 0

    def __call__(self, credentials: Credentials | None) -> None:
        self.asked += 1
        if self.answer is not None:
            raise self.answer

    def down(self) -> None:
        self.answer = UpstreamUnavailable("connection refused")

    def refuses(self, status: int) -> None:
        self.answer = RegistryError("DENIED" if status == 403 else "UNAUTHORIZED", "no", status=status)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def worker(cache: Path, clock: Clock, offline_ttl: float = 24 * HOUR) -> AccessControl:
    """A new AccessControl on the cache: another gunicorn worker, or the proxy after a restart."""
    return AccessControl(cache, ttl=60.0, offline_ttl=offline_ttl, now=clock)


# --- pure parts ---------------------------------------------------------------------------------


def test_newest_picks_the_latest_decision() -> None:
    old, new = Decision(True, 10.0), Decision(False, 20.0)
    assert newest(old, new) == new and newest(new, None, old) == new
    assert newest(None, None) is None


def test_within_counts_from_the_decision_and_tolerates_a_small_clock_step_back() -> None:
    decision = Decision(True, 1000.0)
    assert within(decision, 1059.0, 60.0)
    assert not within(decision, 1060.0, 60.0)
    assert within(decision, 1000.0 - CLOCK_SLACK / 2, 60.0)
    assert not within(decision, 1000.0 - CLOCK_SLACK - 1, 60.0)
    assert not within(decision, 1000.0, 0.0)


@pytest.mark.parametrize(
    ("known", "now", "offline_ttl", "expected"),
    [
        (Decision(True, 0.0), HOUR, 2 * HOUR, True),  # a grant within the grace stands
        (Decision(True, 0.0), 3 * HOUR, 2 * HOUR, None),  # past the grace: nothing to go on
        (Decision(True, 0.0), 1.0, 0.0, None),  # grace disabled
        (Decision(False, 0.0), 100 * HOUR, 2 * HOUR, False),  # a refusal stands however old
        (None, 0.0, 2 * HOUR, None),
    ],
)
def test_offline_answer(
    known: Decision | None, now: float, offline_ttl: float, expected: bool | None
) -> None:
    assert offline_answer(known, now, offline_ttl) is expected


def test_grant_names_depend_on_the_key_and_every_part_and_reveal_nothing() -> None:
    key, other_key = b"k" * KEY_BYTES, b"o" * KEY_BYTES
    name = grant_name(key, ALICE, REGISTRY, REPOSITORY)
    assert name == grant_name(key, ALICE, REGISTRY, REPOSITORY)
    assert len(name) == 64 and all(c in "0123456789abcdef" for c in name)
    assert name != grant_name(other_key, ALICE, REGISTRY, REPOSITORY)
    assert name != grant_name(key, MALLORY, REGISTRY, REPOSITORY)
    assert name != grant_name(key, ALICE, REGISTRY, "team/other")
    # parts are encoded unambiguously: moving a character between fields changes the name
    assert grant_name(key, Credentials("ab", "c"), "r", "x") != grant_name(
        key, Credentials("a", "bc"), "r", "x"
    )
    assert grant_name(key, Credentials("a", "b"), "r/x", "y") != grant_name(
        key, Credentials("a", "b"), "r", "x/y"
    )


# --- decisions over the grant store -------------------------------------------------------------


def test_a_grant_is_shared_with_other_workers_within_the_short_ttl(
    tmp_path: Path, clock: Clock, upstream: Upstream
) -> None:
    worker(tmp_path, clock).check(REGISTRY, REPOSITORY, ALICE, upstream)
    assert upstream.asked == 1
    clock.t += 30
    worker(tmp_path, clock).check(REGISTRY, REPOSITORY, ALICE, upstream)
    assert upstream.asked == 1, "a fresh grant from another worker is trusted without asking again"
    clock.t += 31
    worker(tmp_path, clock).check(REGISTRY, REPOSITORY, ALICE, upstream)
    assert upstream.asked == 2, "past the short TTL the upstream is asked again"


def test_offline_a_stored_grant_stands_for_the_grace_period_in_a_new_worker(
    tmp_path: Path, clock: Clock, upstream: Upstream
) -> None:
    worker(tmp_path, clock).granted(REGISTRY, REPOSITORY, ALICE)  # e.g. a pull that filled the cache
    upstream.down()
    clock.t += 23 * HOUR
    restarted = worker(tmp_path, clock)
    restarted.check(REGISTRY, REPOSITORY, ALICE, upstream)
    assert upstream.asked == 1

    for stranger in (MALLORY, Credentials("bob", "alice-secret-password"), None):
        with pytest.raises(Unverifiable) as refused:
            restarted.check(REGISTRY, REPOSITORY, stranger, upstream)
        assert refused.value.status == 401
    with pytest.raises(Unverifiable):
        restarted.check(REGISTRY, "team/other", ALICE, upstream)  # a grant is for its repository only

    clock.t += 2 * HOUR  # past the grace: refused by the worker that honoured it, and by a new one
    with pytest.raises(Unverifiable):
        restarted.check(REGISTRY, REPOSITORY, ALICE, upstream)
    with pytest.raises(Unverifiable):
        worker(tmp_path, clock).check(REGISTRY, REPOSITORY, ALICE, upstream)


def test_offline_grace_zero_refuses_even_the_client_that_proved_access(
    tmp_path: Path, clock: Clock, upstream: Upstream
) -> None:
    access = worker(tmp_path, clock, offline_ttl=0)
    access.check(REGISTRY, REPOSITORY, ALICE, upstream)
    upstream.down()
    clock.t += 61
    with pytest.raises(Unverifiable):
        access.check(REGISTRY, REPOSITORY, ALICE, upstream)
    with pytest.raises(Unverifiable):
        worker(tmp_path, clock, offline_ttl=0).check(REGISTRY, REPOSITORY, ALICE, upstream)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_revokes_the_stored_grant_at_once_for_every_worker(
    tmp_path: Path, clock: Clock, upstream: Upstream, status: int
) -> None:
    first, second = worker(tmp_path, clock), worker(tmp_path, clock)
    first.granted(REGISTRY, REPOSITORY, ALICE)
    clock.t += 61
    upstream.refuses(status)
    with pytest.raises(RegistryError) as refused:
        first.check(REGISTRY, REPOSITORY, ALICE, upstream)
    assert refused.value.status == 403
    upstream.down()
    with pytest.raises(Unverifiable):
        second.check(REGISTRY, REPOSITORY, ALICE, upstream)  # the grant is gone from disk
    with pytest.raises(RegistryError) as stale:
        first.check(REGISTRY, REPOSITORY, ALICE, upstream)  # and this worker remembers the refusal
    assert stale.value.status == 403


def test_a_grant_made_after_a_refusal_wins(tmp_path: Path, clock: Clock, upstream: Upstream) -> None:
    first, second = worker(tmp_path, clock), worker(tmp_path, clock)
    upstream.refuses(403)
    with pytest.raises(RegistryError):
        first.check(REGISTRY, REPOSITORY, ALICE, upstream)
    clock.t += 61
    upstream.answer = None
    second.check(REGISTRY, REPOSITORY, ALICE, upstream)  # access granted upstream since
    upstream.down()
    clock.t += 61
    first.check(REGISTRY, REPOSITORY, ALICE, upstream)


def test_startup_forgets_grants_older_than_the_grace(tmp_path: Path, clock: Clock) -> None:
    worker(tmp_path, clock, offline_ttl=HOUR).granted(REGISTRY, REPOSITORY, ALICE)
    grants = tmp_path / "access" / "grants"
    assert len(list(grants.iterdir())) == 1
    clock.t += HOUR / 2
    worker(tmp_path, clock, offline_ttl=HOUR)
    assert len(list(grants.iterdir())) == 1
    clock.t += HOUR
    worker(tmp_path, clock, offline_ttl=HOUR)
    assert not list(grants.iterdir())


# --- what lies on disk --------------------------------------------------------------------------


def test_the_key_is_private_and_the_grants_hold_no_credential(tmp_path: Path, clock: Clock) -> None:
    worker(tmp_path, clock).granted(REGISTRY, REPOSITORY, ALICE)
    key = tmp_path / "access" / "grant.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == KEY_BYTES
    files = [p for p in (tmp_path / "access").rglob("*") if p.is_file()]
    assert len(files) == 2
    for path in files:
        for secret in (ALICE.username, ALICE.password):
            assert secret not in str(path.relative_to(tmp_path))
            assert secret.encode() not in path.read_bytes()


def test_the_key_is_made_once_and_reused(tmp_path: Path) -> None:
    GrantStore(tmp_path).record(ALICE, REGISTRY, REPOSITORY, 5.0)
    key = (tmp_path / "grant.key").read_bytes()
    again = GrantStore(tmp_path)
    assert (tmp_path / "grant.key").read_bytes() == key
    assert again.granted_at(ALICE, REGISTRY, REPOSITORY) == 5.0


def test_a_key_readable_by_others_is_made_private(tmp_path: Path) -> None:
    GrantStore(tmp_path)
    key = tmp_path / "grant.key"
    os.chmod(key, 0o644)
    GrantStore(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_damaged_key_is_replaced_and_its_grants_forgotten(tmp_path: Path) -> None:
    GrantStore(tmp_path).record(ALICE, REGISTRY, REPOSITORY, 5.0)
    (tmp_path / "grant.key").write_bytes(b"short")
    replaced = GrantStore(tmp_path)
    assert len((tmp_path / "grant.key").read_bytes()) == KEY_BYTES
    assert replaced.on_disk and replaced.granted_at(ALICE, REGISTRY, REPOSITORY) is None
