"""Leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm, simplified).

A candidate takes the Lease when it has no holder or when its record has not changed for
`lease_seconds` as observed on this machine (the local clock only: no cross-machine clock
comparison). The leader renews every `retry_seconds`; when it cannot renew for `renew_seconds`
it has lost the Lease and must stop reconciling at once (the program exits non-zero, like
controller-runtime). A leader stopping cleanly releases the Lease so a standby takes over
without waiting for it to expire. Writes are replaces carrying the resourceVersion read, so two
candidates never both win.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from controller import metrics
from imagewarm.kube import Conflict, Kube, KubeError, NotFound

log = logging.getLogger("imagewarm.controller.leader")

LEASE_NAME = "imagewarm-controller"
LEASE_SECONDS = 15.0
RENEW_SECONDS = 10.0
RETRY_SECONDS = 2.0


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        *,
        name: str = LEASE_NAME,
        identity: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._observed: dict[str, Any] | None = None  # the Lease spec last read
        self._observed_at = 0.0  # when that record last changed, on our clock
        self._renewed_at = 0.0
        self.leading = False
        self._stop = threading.Event()

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    # One attempt -----------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards. Raises KubeError
        only for what a retry cannot fix (Forbidden...)."""
        now = self._clock()
        stamp = micro_time()
        try:
            lease = self.kube.get(self.path)
        except NotFound:
            spec = self._spec(stamp, stamp, transitions=0)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                self.kube.create(f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body)
            except Conflict:
                return False
            self._took(now, spec)
            return True
        spec = lease.get("spec") or {}
        record = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseTransitions")}
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another candidate and not expired
        transitions = int(spec.get("leaseTransitions") or 0)
        acquire = spec.get("acquireTime") or stamp
        if holder != self.identity:
            transitions, acquire = transitions + 1, stamp
        lease["spec"] = self._spec(acquire, stamp, transitions)
        try:
            self.kube.replace(self.path, lease)
        except Conflict:
            return False  # someone else wrote it first: read again next time
        self._took(now, lease["spec"])
        return True

    def _spec(self, acquire: str, renew: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.lease_seconds),
            "acquireTime": acquire,
            "renewTime": renew,
            "leaseTransitions": transitions,
        }

    def _took(self, now: float, spec: dict[str, Any]) -> None:
        self._observed = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseTransitions")}
        self._observed_at = self._renewed_at = now

    # The loop --------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Block until this candidate leads (True) or `stop()` was called (False)."""
        log.info("waiting for the leader lease", extra={"lease": f"{self.namespace}/{self.name}",
                                                        "identity": self.identity})  # fmt: skip
        while not self._stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    self.leading = True
                    metrics.LEADER.set(1)
                    log.info("became the leader", extra={"identity": self.identity})
                    return True
            except KubeError as exc:
                log.warning("cannot read or write the leader lease", extra={"error": str(exc)})
            self._stop.wait(self.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in a thread while leading; call `on_lost` once the Lease is lost."""

        def renew() -> None:
            while not self._stop.wait(self.retry_seconds):
                try:
                    if self.try_acquire_or_renew():
                        continue
                except KubeError as exc:
                    log.warning("cannot renew the leader lease", extra={"error": str(exc)})
                if self._clock() - self._renewed_at >= self.renew_seconds or not self._still_ours():
                    self.leading = False
                    metrics.LEADER.set(0)
                    log.error("lost the leader lease; stopping", extra={"identity": self.identity})
                    on_lost()
                    return

        thread = threading.Thread(target=renew, name="leader-renew", daemon=True)
        thread.start()
        return thread

    def _still_ours(self) -> bool:
        return bool(self._observed and self._observed.get("holderIdentity") in (self.identity, None, ""))

    def cancel(self) -> None:
        """Stop trying and renewing (safe from a signal handler); `release()` gives the Lease up."""
        self._stop.set()

    def release(self) -> None:
        """Stop renewing and give the Lease up (a standby takes over at once)."""
        self._stop.set()
        if not self.leading:
            return
        self.leading = False
        metrics.LEADER.set(0)
        try:
            lease = self.kube.get(self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                spec["holderIdentity"] = ""
                spec["renewTime"] = micro_time()
                spec["leaseDurationSeconds"] = 1
                self.kube.replace(self.path, lease)
        except KubeError as exc:
            log.warning("cannot release the leader lease", extra={"error": str(exc)})
