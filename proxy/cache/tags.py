"""Tag -> digest index: what a tag pointed at when we last asked the upstream, and when that was.

One small JSON file per (registry, repository, tag), replaced atomically (write, fsync, rename), so a
crash leaves the previous entry or the new one, never a torn file. Lets the proxy serve a tag while
the upstream is down, and re-check it at most every tag TTL.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imagewarm.digest import Digest
from proxy.cache import durable
from proxy.cache.paths import Layout


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    checked_at: float  # seconds since the epoch, when the upstream last confirmed (or set) the digest

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.checked_at


class TagIndex:
    """Tags under `<root>/tags`; safe to share across threads and processes (last writer wins)."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(Path(root))
        for directory in (self.layout.tags_dir, self.layout.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, registry: str, repository: str, tag: str) -> TagEntry | None:
        """The last known entry, or None when the tag was never resolved (or its file is unreadable)."""
        path = self.layout.tag(registry, repository, tag)
        try:
            record = json.loads(path.read_bytes())
            if (record["registry"], record["repository"], record["tag"]) != (registry, repository, tag):
                return None  # a hash collision, in theory: never answer for another tag
            Digest.parse(record["digest"])
            return TagEntry(record["digest"], record["media_type"], float(record["checked_at"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # an entry we cannot trust is a miss: the proxy asks the upstream again

    def set(
        self,
        registry: str,
        repository: str,
        tag: str,
        digest: str,
        media_type: str,
        checked_at: float | None = None,
    ) -> TagEntry:
        """Record that the tag points at `digest` (checked now unless `checked_at` is given)."""
        Digest.parse(digest)
        entry = TagEntry(digest, media_type, time.time() if checked_at is None else checked_at)
        record = {
            "registry": registry,
            "repository": repository,
            "tag": tag,
            "digest": entry.digest,
            "media_type": entry.media_type,
            "checked_at": entry.checked_at,
        }
        data = json.dumps(record, sort_keys=True).encode()
        durable.atomic_write(
            self.layout.tmp(os.urandom(8).hex()), self.layout.tag(registry, repository, tag), data
        )
        return entry
