"""The cache's on-disk layout: the only module that builds storage paths.

```
<root>/blobs/<algorithm>/<first two hex>/<hex>        verified blobs, named by their digest
<root>/manifests/<algorithm>/<first two hex>/<hex>    verified manifests (media type line, then the bytes)
<root>/tags/<first two hex>/<sha256 of the key>.json  tag -> digest, with the time it was checked
<root>/partial/<algorithm>-<hex>.partial              a blob being written (its writer holds a flock on it)
<root>/partial/<algorithm>-<hex>.<token>.new          a writer's fresh partial file before it is published
<root>/partial/<token>.tmp                            small atomic writes (manifests, tags) before the rename
<root>/locks/<algorithm>-<hex>.lock                   single-flight lock: whoever holds it fetches the blob
<root>/pins/<algorithm>-<hex>/<quoted owner>          pins: a blob with any owner here is never evicted
<root>/state/                                         the byte counter and the store-open lock
```
Everything is on one filesystem, so every rename is atomic. Digests are validated before any path
is built from them, so no caller input can escape the root.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from imagewarm import reference
from imagewarm.errors import ImagewarmError

# Algorithms we can verify, with the length of their hex encoding. Anything else is refused: a digest
# we cannot verify must never name a file.
ALGORITHMS = reference.DIGEST_HEX_LENGTHS
PARTIAL_SUFFIX = ".partial"
NEW_SUFFIX = ".new"
TMP_SUFFIX = ".tmp"


class InvalidDigest(ImagewarmError, ValueError):
    """A digest string that is not `sha256:<64 hex>` or `sha512:<128 hex>`."""


def split_digest(digest: str) -> tuple[str, str]:
    """Return (algorithm, hex) of a validated digest; raises InvalidDigest naming what is wrong."""
    try:
        return reference.split_digest(digest)
    except reference.InvalidReference as exc:
        raise InvalidDigest(str(exc)) from None


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object of the digest's algorithm (validated)."""
    algorithm, _ = split_digest(digest)
    return hashlib.new(algorithm)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The digest string of `data` with `algorithm`."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _flat(digest: str) -> str:
    algorithm, hexpart = split_digest(digest)
    return f"{algorithm}-{hexpart}"


def digest_from_flat(name: str) -> str | None:
    """Inverse of the flat `<algorithm>-<hex>` file name stem; None when it is not one."""
    algorithm, _, hexpart = name.partition("-")
    digest = f"{algorithm}:{hexpart}"
    try:
        split_digest(digest)
    except InvalidDigest:
        return None
    return digest


@dataclass(frozen=True)
class Layout:
    """Paths under one cache root."""

    root: Path

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def tags_dir(self) -> Path:
        return self.root / "tags"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def pins_dir(self) -> Path:
        return self.root / "pins"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def counter(self) -> Path:
        """Eight bytes: the total size of committed blobs, kept under its own flock."""
        return self.state_dir / "total_bytes"

    @property
    def open_lock(self) -> Path:
        """Every open store holds a shared flock here; an exclusive one means no other process is live."""
        return self.state_dir / "open.lock"

    def directories(self) -> list[Path]:
        return [
            self.blobs_dir,
            self.manifests_dir,
            self.tags_dir,
            self.partial_dir,
            self.locks_dir,
            self.pins_dir,
            self.state_dir,
        ]

    def blob(self, digest: str) -> Path:
        algorithm, hexpart = split_digest(digest)
        return self.blobs_dir / algorithm / hexpart[:2] / hexpart

    def manifest(self, digest: str) -> Path:
        algorithm, hexpart = split_digest(digest)
        return self.manifests_dir / algorithm / hexpart[:2] / hexpart

    def partial(self, digest: str) -> Path:
        return self.partial_dir / f"{_flat(digest)}{PARTIAL_SUFFIX}"

    def new_partial(self, digest: str, token: str) -> Path:
        return self.partial_dir / f"{_flat(digest)}.{token}{NEW_SUFFIX}"

    def tmp(self, token: str) -> Path:
        return self.partial_dir / f"{token}{TMP_SUFFIX}"

    def lock(self, digest: str) -> Path:
        return self.locks_dir / f"{_flat(digest)}.lock"

    def pin_dir(self, digest: str) -> Path:
        return self.pins_dir / _flat(digest)

    def pin(self, digest: str, owner: str) -> Path:
        if not owner:
            raise ValueError("a pin needs a non-empty owner (e.g. 'NodeImage/node-1')")
        return self.pin_dir(digest) / quote(owner, safe="")

    @staticmethod
    def pin_owner(path: Path) -> str:
        return unquote(path.name)

    def tag(self, registry: str, repository: str, tag: str) -> Path:
        # Hashing the key keeps any registry/repository/tag text (ports, slashes, case) out of the path.
        key = hashlib.sha256(f"{registry}/{repository}:{tag}".encode()).hexdigest()
        return self.tags_dir / key[:2] / f"{key}.json"

    def blob_entries(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every committed blob as (digest, directory entry): one listing per fan-out directory, and
        `entry.stat()` reuses what the listing returned where the filesystem allows."""
        for algorithm in ALGORITHMS:
            top = self.blobs_dir / algorithm
            if not top.is_dir():
                continue
            with os.scandir(top) as fans:
                fan_paths = [fan.path for fan in fans if fan.is_dir(follow_symlinks=False)]
            for fan_path in fan_paths:
                with os.scandir(fan_path) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            yield f"{algorithm}:{entry.name}", entry
