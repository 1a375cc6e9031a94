"""The cache's on-disk layout: the only module that builds storage paths.

```
<root>/blobs/<algorithm>/<first two hex>/<hex>        verified blobs, named by their digest
<root>/manifests/<algorithm>/<first two hex>/<hex>    verified manifests (media type line, then the bytes)
<root>/tags/<first two hex>/<sha256 of the key>.json  tag -> digest, with the time it was checked
<root>/partial/<algorithm>-<hex>.partial              a blob being written (its writer holds a flock on it),
                                                      or left by a killed or interrupted writer (the
                                                      next fill resumes it)
<root>/partial/<algorithm>-<hex>.<token>.new          a writer's fresh partial file before it is published,
                                                      or an adopted one while its writer asks for the rest
<root>/partial/<token>.tmp                            small atomic writes (manifests, tags) before the rename
<root>/locks/<algorithm>-<hex>.lock                   single-flight lock: whoever holds it fetches the blob
<root>/pins/<algorithm>-<hex>/<quoted owner>          pins: a blob with any owner here is never evicted
<root>/state/                                         the byte counter and the store-open lock
```
Everything is on one filesystem, so every rename is atomic. Paths are built only from parsed
`Digest`s, so no caller input can escape the root.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from imagewarm.digest import HEX_LENGTHS, Digest, InvalidDigest

PARTIAL_SUFFIX = ".partial"
NEW_SUFFIX = ".new"
TMP_SUFFIX = ".tmp"

__all__ = ["NEW_SUFFIX", "PARTIAL_SUFFIX", "TMP_SUFFIX", "InvalidDigest", "Layout"]


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

    def blob(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest(self, digest: Digest) -> Path:
        return self.manifests_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def partial(self, digest: Digest) -> Path:
        return self.partial_dir / f"{digest.flat}{PARTIAL_SUFFIX}"

    def new_partial(self, digest: Digest, token: str) -> Path:
        return self.partial_dir / f"{digest.flat}.{token}{NEW_SUFFIX}"

    def tmp(self, token: str) -> Path:
        return self.partial_dir / f"{token}{TMP_SUFFIX}"

    def lock(self, digest: Digest) -> Path:
        return self.locks_dir / f"{digest.flat}.lock"

    def pin_dir(self, digest: Digest) -> Path:
        return self.pins_dir / digest.flat

    def pin(self, digest: Digest, owner: str) -> Path:
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

    def blob_entries(self) -> Iterator[tuple[Digest, os.DirEntry[str]]]:
        """Every committed blob as (digest, directory entry): one listing per fan-out directory, and
        `entry.stat()` reuses what the listing returned where the filesystem allows. A file whose
        name is not a digest is no blob (and is left alone)."""
        for algorithm in HEX_LENGTHS:
            top = self.blobs_dir / algorithm
            if not top.is_dir():
                continue
            with os.scandir(top) as fans:
                fan_paths = [fan.path for fan in fans if fan.is_dir(follow_symlinks=False)]
            for fan_path in fan_paths:
                with os.scandir(fan_path) as entries:
                    for entry in entries:
                        digest = Digest.from_flat(f"{algorithm}-{entry.name}")
                        if digest is not None and entry.is_file(follow_symlinks=False):
                            yield digest, entry
