"""Access grants on disk: which (credential, registry, repository) the upstream last accepted, and when.

Shared by every worker and kept across restarts, so a private image stays pullable by a client that
proved access, whichever worker answers (see `proxy.upstream.access` for how grants are trusted).

```
<cache>/access/grant.key          32 random bytes (mode 0600), made once per cache
<cache>/access/grants/<hmac hex>  empty file (mode 0600); its mtime is when access was last granted
```
A grant's name is HMAC-SHA256(key, credential and repository): the credential is never stored, and
without the key nobody can tell from the names whose grants these are or precompute them from a
guessed password. Grants are not fsynced: one lost in a crash only means asking the upstream again.
Recording never fails the request: a full or read-only disk leaves the grant in memory only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path

from proxy.upstream.auth import Credentials

log = logging.getLogger("imagewarm.proxy.grants")

KEY_BYTES = 32


def grant_name(key: bytes, credentials: Credentials, registry: str, repository: str) -> str:
    """The file name of a grant: an HMAC of every part, JSON-encoded so no two tuples collide."""
    message = json.dumps([credentials.username, credentials.password, registry, repository]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _read_key(path: Path) -> bytes | None:
    """The key in `path`, made private if it is not; None when absent or not a key we wrote."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_mode & 0o077:
            log.warning("grant key readable by others: made private", extra={"path": str(path)})
            os.fchmod(fd, 0o600)
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    return key if len(key) == KEY_BYTES else None


def _publish_key(path: Path, replace: bool) -> None:
    """Write a fresh key beside `path`, then link it into place (never over another process's key,
    unless `replace`): a key is either absent or whole."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs is the key
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_key(path: Path) -> bytes | None:
    """The cache's grant key, made on first use; None when it cannot be kept on disk (then grants stay
    in memory: a key only this process knows would make grants no other process can find)."""
    try:
        key = _read_key(path)
        if key is None:
            corrupt = path.exists() or path.is_symlink()
            if corrupt:
                log.warning(
                    "grant key unreadable: replaced, stored grants forgotten", extra={"path": str(path)}
                )
            _publish_key(path, replace=corrupt)
            key = _read_key(path)
    except OSError as exc:
        log.warning(
            "cannot keep access grants on disk: they stay in this worker's memory "
            "(free space on the cache volume, or make it writable, then restart)",
            extra={"path": str(path), "error": str(exc)},
        )
        return None
    return key


class GrantStore:
    """Grants under `<cache>/access`; safe across threads and processes (the last writer wins)."""

    def __init__(self, access_dir: Path) -> None:
        self._dir = access_dir / "grants"
        key: bytes | None = None
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = load_key(access_dir / "grant.key")
        except OSError as exc:
            log.warning(
                "cannot keep access grants on disk", extra={"path": str(self._dir), "error": str(exc)}
            )
        self._key = key
        self._failing = False

    @property
    def on_disk(self) -> bool:
        return self._key is not None

    def _path(self, credentials: Credentials, registry: str, repository: str) -> Path | None:
        if self._key is None:
            return None
        return self._dir / grant_name(self._key, credentials, registry, repository)

    def granted_at(self, credentials: Credentials, registry: str, repository: str) -> float | None:
        """When the upstream last accepted these credentials for the repository (seconds since the
        epoch), or None when no grant is stored."""
        path = self._path(credentials, registry, repository)
        if path is None:
            return None
        try:
            return path.stat().st_mtime
        except OSError:
            return None

    def record(self, credentials: Credentials, registry: str, repository: str, at: float) -> None:
        """Store a grant made at `at`; on a full or unwritable disk, log and carry on."""
        path = self._path(credentials, registry, repository)
        if path is None:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.utime(fd, (at, at))
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._failing:  # logged when it starts failing, not on every request while it does
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                log.warning(
                    "access grants kept in memory only: "
                    + ("the cache disk is full (free space on it)" if full else "cannot write them"),
                    extra={"repository": f"{registry}/{repository}", "error": str(exc)},
                )
            self._failing = True
            return
        if self._failing:
            self._failing = False
            log.info("access grants are stored on disk again")

    def revoke(self, credentials: Credentials, registry: str, repository: str) -> None:
        """Forget a grant at once (the upstream refused these credentials)."""
        path = self._path(credentials, registry, repository)
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error(
                "cannot remove a revoked access grant: other workers may still honour it offline",
                extra={"repository": f"{registry}/{repository}", "path": str(path), "error": str(exc)},
            )

    def expire(self, older_than: float) -> int:
        """Delete grants made before `older_than` (seconds since the epoch); returns how many."""
        if self._key is None:
            return 0
        removed = 0
        try:
            entries = list(os.scandir(self._dir))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed
