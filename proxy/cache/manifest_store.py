"""Manifests by digest, stored byte for byte with the media type the upstream gave them.

One file per manifest: the media type on the first line, then the exact bytes. A single file means
a single atomic rename, so the bytes and their media type can never disagree after a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

from imagewarm.digest import Digest
from proxy.cache import durable
from proxy.cache.errors import DigestMismatch
from proxy.cache.paths import Layout


class ManifestStore:
    """Verified manifests under `<root>/manifests`; safe across threads and processes."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(Path(root))
        for directory in (self.layout.manifests_dir, self.layout.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def put(self, digest: str, data: bytes, media_type: str) -> None:
        """Store `data` under `digest` after checking that it hashes to it. Raises DigestMismatch
        (nothing kept), DiskFull, or ValueError for a media type with a line break."""
        if Digest.of(data, Digest.parse(digest).algorithm) != Digest.parse(digest):
            raise DigestMismatch(f"manifest bytes do not match {digest}; nothing was kept")
        if "\n" in media_type or "\r" in media_type:
            raise ValueError(f"media type {media_type!r} contains a line break")
        record = media_type.encode() + b"\n" + data
        durable.atomic_write(self.layout.tmp(os.urandom(8).hex()), self.layout.manifest(digest), record)

    def get(self, digest: str) -> tuple[bytes, str] | None:
        """(bytes, media type) exactly as stored, or None."""
        try:
            record = self.layout.manifest(digest).read_bytes()
        except FileNotFoundError:
            return None
        media_type, _, data = record.partition(b"\n")
        return data, media_type.decode()

    def has(self, digest: str) -> bool:
        return self.layout.manifest(digest).is_file()
