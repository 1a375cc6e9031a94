"""Leader election's rules against an in-memory Lease store with resourceVersion checks (the real
API server: tests/e2e/test_controller_leader.py)."""

from __future__ import annotations

import copy
from typing import Any

from controller.leader import LeaderElector
from imagewarm.kube import Conflict, NotFound


class LeaseStore:
    """get/create/replace of one object, with optimistic concurrency like the API server."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 0

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        if self.obj is None:
            raise NotFound(path)
        return copy.deepcopy(self.obj)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.obj is not None:
            raise Conflict("exists")
        return self._store(body)

    def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.obj is not None
        if body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise Conflict("changed")
        return self._store(body)

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.obj)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(store: LeaseStore, clock: Clock, identity: str) -> LeaderElector:
    return LeaderElector(store, "ns", identity=identity, clock=clock)  # type: ignore[arg-type]


def test_one_leader_until_its_lease_expires_unrenewed() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += 10
    assert a.try_acquire_or_renew(), "the holder renews"
    clock.now += 2
    assert not b.try_acquire_or_renew(), "b sees the renewal (its own clock starts again)"
    clock.now += 14
    assert not b.try_acquire_or_renew(), "seen renewed 14 s ago: not expired"
    clock.now += 2
    assert b.try_acquire_or_renew(), "16 s without a renewal seen: expired, b takes it"
    assert store.obj is not None and store.obj["spec"]["holderIdentity"] == "b"
    assert store.obj["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew(), "a sees b holding a fresh lease"


def test_a_released_lease_is_taken_at_once() -> None:
    store, clock = LeaseStore(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.acquire()
    assert not b.try_acquire_or_renew()
    a.release()
    assert b.try_acquire_or_renew()


def test_a_write_over_a_changed_lease_loses() -> None:
    store, clock = LeaseStore(), Clock()
    a = elector(store, clock, "a")
    assert a.try_acquire_or_renew()
    clock.now += 20
    b, c = elector(store, clock, "b"), elector(store, clock, "c")
    # Both saw the lease first at the same moment; after it expires for both, one write wins.
    assert not b.try_acquire_or_renew() and not c.try_acquire_or_renew()
    clock.now += 16
    real_replace = store.replace

    def b_first(path: str, body: dict[str, Any]) -> dict[str, Any]:
        store.replace = real_replace  # type: ignore[method-assign]
        assert b.try_acquire_or_renew()  # b writes between c's read and c's write
        return real_replace(path, body)

    store.replace = b_first  # type: ignore[method-assign]
    assert not c.try_acquire_or_renew(), "c's write carried the version it read: a conflict"
    assert store.obj is not None and store.obj["spec"]["holderIdentity"] == "b"
