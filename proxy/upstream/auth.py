"""Upstream authentication: client credentials, `WWW-Authenticate` challenges, a token cache per scope.

The pulling client's `Authorization: Basic` header is what the proxy presents upstream on its behalf,
directly (basic challenge) or exchanged for a bearer token (token challenge); tokens are cached per
(credentials, realm, service, scope) until shortly before they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Tokens are renewed this long before their stated expiry, so one never expires in flight.
EXPIRY_MARGIN = 10.0
DEFAULT_TOKEN_SECONDS = 60.0  # the token spec's default when `expires_in` is absent


@dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token) the client gave us; never logged."""

    username: str
    password: str = field(repr=False)

    @property
    def key(self) -> str:
        """A stable hash naming these credentials in caches (the secret itself is never a key)."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()[:32]

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def credentials_from_header(value: str | None) -> Credentials | None:
    """The client's Basic credentials, or None when absent, empty or in another scheme (anonymous)."""
    if not value or value[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep or (not username and not password):
        return None
    return Credentials(username, password)


def cache_key(credentials: Credentials | None) -> str:
    return credentials.key if credentials else "anonymous"


_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a `WWW-Authenticate` header (registries send one), or None."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


class TokenCache:
    """Bearer tokens by (credentials, realm, service, scope), valid until their expiry (thread-safe)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._now = now

    def get(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None:
                return None
            token, expires = entry
            if self._now() >= expires:
                del self._tokens[key]
                return None
            return token

    def put(self, key: tuple[str, ...], token: str, expires_in: float) -> None:
        lifetime = max(0.0, expires_in - EXPIRY_MARGIN) if expires_in > 2 * EXPIRY_MARGIN else expires_in / 2
        with self._lock:
            self._tokens[key] = (token, self._now() + lifetime)
            if len(self._tokens) > 10_000:  # bounded: drop expired entries
                now = self._now()
                self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
