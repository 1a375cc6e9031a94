"""Content digests: the one parser and value every component uses.

`Digest.parse(text)` reads `ALGORITHM:HEX` once, at the edge (a request path, a manifest's
descriptor, an upstream's header), and returns a frozen `Digest`; everything after works on that
value, so what was parsed is never validated again. Only digests content can be verified against
are accepted: `sha256` (64 hex) and `sha512` (128 hex), lower-case. Other algorithms that fit the
grammar (distribution's `[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`)
are named as unsupported.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

HEX_LENGTHS = {"sha256": 64, "sha512": 128}

_DIGEST_RE = re.compile("([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*):([0-9a-fA-F]{32,})")
_LOWER_HEX_RE = re.compile("[a-f0-9]+")


class InvalidDigest(ValueError):
    """Text that is not a digest the cache can verify content against; the message says why."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A verifiable content digest. Build it with `parse` or `of`, which guarantee the fields:
    `algorithm` `sha256` or `sha512`, `hex` its lower-case hex encoding of the right length.
    `str()` is the wire form `sha256:<hex>`."""

    algorithm: str
    hex: str

    @staticmethod
    def parse(text: str, *, within: str | None = None) -> Digest:
        """The digest `text` names; raises InvalidDigest naming what is wrong (and where: `within`,
        the text it was found in, e.g. an image reference)."""
        if not isinstance(text, str):
            raise InvalidDigest(f"a digest is text, not {type(text).__name__}")
        return _parse(text, within)

    @staticmethod
    def of(data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of `data` with `algorithm`."""
        return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())

    @staticmethod
    def from_flat(name: str) -> Digest | None:
        """Inverse of `flat`; None when `name` is not one."""
        algorithm, _, encoded = name.partition("-")
        try:
            return Digest.parse(f"{algorithm}:{encoded}")
        except InvalidDigest:
            return None

    @property
    def flat(self) -> str:
        """`<algorithm>-<hex>`: the digest as one file name."""
        return f"{self.algorithm}-{self.hex}"

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def matches(self, hashed: hashlib._Hash) -> bool:
        """Whether `hashed` (of this digest's algorithm, fed every byte) is this digest."""
        return hashed.name == self.algorithm and hashed.hexdigest() == self.hex

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@functools.lru_cache(maxsize=4096)
def _parse(text: str, within: str | None) -> Digest:
    where = f" in '{within}'" if within is not None else ""
    match = _DIGEST_RE.fullmatch(text)
    if match is None:
        raise InvalidDigest(
            f"invalid digest '{text}'{where}: a digest is ALGORITHM:HEX, e.g. sha256:<64 hex>"
        )
    algorithm, encoded = match.groups()
    length = HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidDigest(
            f"unsupported digest algorithm '{algorithm}'{where}: only sha256 and sha512 are "
            "accepted, as the cache verifies content against them"
        )
    if len(encoded) != length or not _LOWER_HEX_RE.fullmatch(encoded):
        upper = "" if _LOWER_HEX_RE.fullmatch(encoded) else " with upper-case"
        raise InvalidDigest(
            f"invalid {algorithm} digest '{text}'{where}: expected {length} lower-case hex "
            f"characters, got {len(encoded)}{upper}"
        )
    return Digest(algorithm, encoded)
