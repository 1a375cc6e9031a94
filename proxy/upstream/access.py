"""Private images: who may read what the cache holds.

A repository is public once an anonymous client fetched from it upstream (remembered on disk, shared
by every worker). Otherwise cached content is served only to a client whose credentials the upstream
accepts (a HEAD of the same manifest or blob). The upstream's answer is trusted for `ttl` without
asking again: a denial in this worker's memory, a grant also on disk (`proxy.upstream.grants`), so
every worker and every later process of this cache knows it.

Offline grants, the trade-off. When the upstream cannot answer (unreachable, timeouts, 429/5xx after
the retries), a grant for the exact same credential and repository stays valid for `offline_ttl` after
it was made (0: never). That is safe enough because the client presents the very credential the
upstream accepted for this repository within the grace period, so it reads nothing it could not read
then; the cost is that a credential revoked upstream while the upstream is unreachable keeps working
here until the upstream answers again or the grace ends. Revocation takes effect at the first answer:
a 401/403 (or 404) removes the stored grant at once, and only an unreachable upstream extends a grant,
never a refusal. Without a grant the client is refused (401): a private image is never served
unverified. Grants are named by an HMAC with a per-cache secret key, so the credential is never stored.

Recording a decision never fails a request: on a full or unwritable disk it stays in memory.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy import metrics
from proxy.errors import RegistryError, UpstreamUnavailable
from proxy.upstream.auth import Credentials, cache_key
from proxy.upstream.grants import GrantStore

log = logging.getLogger("imagewarm.proxy.access")

Probe = Callable[[Credentials | None], None]  # raises RegistryError unless the upstream grants access

# A decision stamped this far in the future (the wall clock stepped back) still counts as just made;
# anything further is not trusted.
CLOCK_SLACK = 5.0


class Unverifiable(RegistryError):
    """The upstream cannot be reached to check a client, and nothing is known of it: refused here,
    though another node that knows more (a peer) may still decide."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    at: float  # seconds since the epoch


def newest(*decisions: Decision | None) -> Decision | None:
    """The most recent of the known decisions (None when none is known)."""
    known = [d for d in decisions if d is not None]
    return max(known, key=lambda d: d.at) if known else None


def within(decision: Decision, now: float, seconds: float) -> bool:
    """Whether `decision` was made less than `seconds` ago."""
    return -CLOCK_SLACK <= now - decision.at < seconds


def offline_answer(known: Decision | None, now: float, offline_ttl: float) -> bool | None:
    """What stands while the upstream cannot answer: True for a grant within the offline grace, False
    for a denial (however old), None when there is nothing to go on (the client is unverifiable)."""
    if known is None:
        return None
    if not known.allowed:
        return False
    return True if within(known, now, offline_ttl) else None


class AccessControl:
    def __init__(
        self,
        cache_dir: Path,
        ttl: float,
        offline_ttl: float = 0.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        access_dir = cache_dir / "access"
        self._public_dir = access_dir / "public"
        self._public_dir.mkdir(parents=True, exist_ok=True)
        self._ttl = ttl
        self._offline_ttl = offline_ttl
        self._now = now
        self._decisions: dict[tuple[str, str, str], Decision] = {}
        self._public: set[tuple[str, str]] = set()  # markers the disk had no room for
        self._lock = threading.Lock()
        self._grants = GrantStore(access_dir)
        self._grants.expire(now() - max(ttl, offline_ttl))

    def _marker(self, registry: str, repository: str) -> Path:
        return self._public_dir / hashlib.sha256(f"{registry}/{repository}".encode()).hexdigest()

    def is_public(self, registry: str, repository: str) -> bool:
        return (registry, repository) in self._public or self._marker(registry, repository).exists()

    def granted(self, registry: str, repository: str, credentials: Credentials | None) -> None:
        """Record that the upstream just served this client (public if the client was anonymous).
        Never raises: what the disk cannot hold is kept in memory."""
        if credentials is None:
            if not self.is_public(registry, repository):
                self._mark_public(registry, repository)
            return
        at = self._now()
        self._remember(registry, repository, credentials, Decision(True, at))
        self._grants.record(credentials, registry, repository, at)

    def _mark_public(self, registry: str, repository: str) -> None:
        name = f"{registry}/{repository}"
        try:
            self._marker(registry, repository).touch()
        except OSError as exc:
            with self._lock:
                self._public.add((registry, repository))
            log.warning(
                "public repository remembered in memory only: cannot write its marker "
                "(free space on the cache volume)",
                extra={"repository": name, "error": str(exc)},
            )
            return
        log.info("repository is public", extra={"repository": name})

    def _remember(
        self, registry: str, repository: str, credentials: Credentials | None, decision: Decision
    ) -> None:
        with self._lock:
            self._decisions[(cache_key(credentials), registry, repository)] = decision

    def _known(self, registry: str, repository: str, credentials: Credentials | None) -> Decision | None:
        with self._lock:
            remembered = self._decisions.get((cache_key(credentials), registry, repository))
        if remembered is not None and remembered.allowed and within(remembered, self._now(), self._ttl):
            return remembered  # the common case on the blob path: no grant file to stat, no HMAC
        stored = None
        if credentials is not None:
            at = self._grants.granted_at(credentials, registry, repository)
            stored = Decision(True, at) if at is not None else None
        return newest(remembered, stored)

    def check(self, registry: str, repository: str, credentials: Credentials | None, probe: Probe) -> None:
        """Return if this client may read cached content of the repository; raise RegistryError if not
        (401 with a challenge for anonymous clients and for clients the proxy cannot verify now, 403 for
        credentials the upstream refuses)."""
        if self.is_public(registry, repository):
            return self._count("public", True)
        known = self._known(registry, repository, credentials)
        if known is not None and within(known, self._now(), self._ttl):
            return self._finish(known.allowed, "cached", credentials, registry, repository)
        try:
            probe(credentials)
        except UpstreamUnavailable as exc:
            return self._offline(registry, repository, credentials, known, exc)
        except RegistryError as exc:
            if exc.status not in (401, 403, 404):
                raise
            self._deny(registry, repository, credentials)
            return self._finish(False, "upstream", credentials, registry, repository)
        self.granted(registry, repository, credentials)
        return self._count("upstream", True)

    def _offline(
        self,
        registry: str,
        repository: str,
        credentials: Credentials | None,
        known: Decision | None,
        error: UpstreamUnavailable,
    ) -> None:
        answer = offline_answer(known, self._now(), self._offline_ttl)
        if answer is True and known is not None:
            log.info(
                "upstream unavailable: access granted on this credential's earlier grant",
                extra={
                    "repository": f"{registry}/{repository}",
                    "granted_seconds_ago": round(self._now() - known.at),
                    "error": error.message,
                },
            )
            return self._finish(True, "offline-grant", credentials, registry, repository)
        if answer is False:
            return self._finish(False, "stale", credentials, registry, repository)
        self._count("unverifiable", False)
        raise Unverifiable(
            "UNAUTHORIZED",
            f"{registry}/{repository} is cached but not known to be public, and the upstream is "
            "unreachable to check these credentials (none proved access recently enough: "
            "pull once while the upstream is up, or raise --offline-grant-ttl)",
        ) from None

    def _deny(self, registry: str, repository: str, credentials: Credentials | None) -> None:
        self._remember(registry, repository, credentials, Decision(False, self._now()))
        if credentials is not None:
            self._grants.revoke(credentials, registry, repository)

    def _finish(
        self, allowed: bool, source: str, credentials: Credentials | None, registry: str, repository: str
    ) -> None:
        self._count(source, allowed)
        if allowed:
            return
        name = f"{registry}/{repository}"
        if credentials is None:
            raise RegistryError(
                "UNAUTHORIZED", f"{name} is private: pull it with credentials the upstream accepts"
            )
        raise RegistryError("DENIED", f"{name}: the upstream does not accept these credentials for it")

    @staticmethod
    def _count(source: str, allowed: bool) -> None:
        metrics.AUTH_DECISIONS.labels(source=source, decision="allow" if allowed else "deny").inc()
