"""Private images: who may read what the cache holds.

A repository is public once an anonymous client fetched from it upstream (remembered on disk, shared
by every worker). Otherwise cached content is served only to a client whose credentials the upstream
accepts right now (a HEAD of the same manifest or blob), the answer cached briefly per
(credentials, registry, repository). With the upstream unreachable, the last answer stands, however old;
without one, the client is refused.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from proxy import metrics
from proxy.auth import Credentials, cache_key
from proxy.errors import RegistryError, UpstreamUnavailable

log = logging.getLogger("imagewarm.proxy.access")

Probe = Callable[[Credentials | None], None]  # raises RegistryError unless the upstream grants access


class Unverifiable(RegistryError):
    """The upstream cannot be reached to check a client, and nothing is known of it: refused here,
    though another node that knows more (a peer) may still decide."""


class AccessControl:
    def __init__(self, cache_dir: Path, ttl: float, now: Callable[[], float] = time.monotonic) -> None:
        self._public_dir = cache_dir / "access" / "public"
        self._public_dir.mkdir(parents=True, exist_ok=True)
        self._ttl = ttl
        self._now = now
        self._decisions: dict[tuple[str, str, str], tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def _marker(self, registry: str, repository: str) -> Path:
        return self._public_dir / hashlib.sha256(f"{registry}/{repository}".encode()).hexdigest()

    def is_public(self, registry: str, repository: str) -> bool:
        return self._marker(registry, repository).exists()

    def granted(self, registry: str, repository: str, credentials: Credentials | None) -> None:
        """Record that the upstream just served this client (public if the client was anonymous)."""
        if credentials is None:
            if not self.is_public(registry, repository):
                self._marker(registry, repository).touch()
                log.info("repository is public", extra={"repository": f"{registry}/{repository}"})
        else:
            self._remember(registry, repository, credentials, True)

    def _remember(
        self, registry: str, repository: str, credentials: Credentials | None, allowed: bool
    ) -> None:
        with self._lock:
            self._decisions[(cache_key(credentials), registry, repository)] = (allowed, self._now())

    def check(self, registry: str, repository: str, credentials: Credentials | None, probe: Probe) -> None:
        """Return if this client may read cached content of the repository; raise RegistryError if not
        (401 with a challenge for anonymous clients, 403 for credentials the upstream refuses)."""
        if self.is_public(registry, repository):
            return self._count("public", True)
        key = (cache_key(credentials), registry, repository)
        with self._lock:
            known = self._decisions.get(key)
        if known is not None and self._now() - known[1] < self._ttl:
            return self._finish(known[0], "cached", credentials, registry, repository)
        try:
            probe(credentials)
        except UpstreamUnavailable:
            if known is not None:  # offline: the last answer stands
                return self._finish(known[0], "stale", credentials, registry, repository)
            self._count("unverifiable", False)
            raise Unverifiable(
                "UNAUTHORIZED",
                f"{registry}/{repository} is cached but not known to be "
                "public, and the upstream is unreachable to check these credentials",
            ) from None
        except RegistryError as exc:
            if exc.status not in (401, 403, 404):
                raise
            self._remember(registry, repository, credentials, False)
            return self._finish(False, "upstream", credentials, registry, repository)
        self.granted(registry, repository, credentials)
        self._remember(registry, repository, credentials, True)
        return self._count("upstream", True)

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
