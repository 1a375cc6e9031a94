"""Pins of warmed images (docs/DESIGN.md, "Control plane"): the blobs of a task that succeeded are
pinned in the store under the task's owner (`nodeimage/<name>:<tag>`), so eviction spares them, and
unpinned when the task leaves the spec. Which digests an owner pinned is recorded next to the cache
(`<cache>/agent/pins/<owner>.json`), so unpinning needs no scan of every blob's pins, and a restarted
agent knows what it pinned before."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, unquote

from imagewarm.digest import Digest
from proxy.cache.store import BlobStore


class Pins:
    def __init__(self, store: BlobStore, root: Path) -> None:
        self.store = store
        self.root = root

    def _record(self, owner: str) -> Path:
        return self.root / f"{quote(owner, safe='')}.json"

    def owners(self) -> set[str]:
        """Every owner with pins recorded."""
        try:
            return {unquote(path.name.removesuffix(".json")) for path in self.root.glob("*.json")}
        except FileNotFoundError:
            return set()

    def pinned(self, owner: str) -> set[str]:
        try:
            return set(json.loads(self._record(owner).read_text()))
        except (FileNotFoundError, ValueError):
            return set()

    def pin(self, owner: str, digests: Iterable[str]) -> None:
        """Pin exactly `digests` for `owner`: new ones pinned (before the record says so, so a crash
        leaves at worst a pin without a record, never the reverse), ones no longer wanted unpinned."""
        wanted = set(digests)
        old = self.pinned(owner)
        for digest in wanted - old:
            self.store.pin(Digest.parse(digest), owner)
        self.root.mkdir(parents=True, exist_ok=True)
        record = self._record(owner)
        temporary = record.with_suffix(".tmp")
        temporary.write_text(json.dumps(sorted(wanted | old)))
        os.replace(temporary, record)
        for digest in old - wanted:
            self.store.unpin(Digest.parse(digest), owner)
        temporary.write_text(json.dumps(sorted(wanted)))
        os.replace(temporary, record)

    def unpin(self, owner: str) -> int:
        """Unpin everything `owner` pinned; how many digests."""
        digests = self.pinned(owner)
        for digest in digests:
            self.store.unpin(Digest.parse(digest), owner)
        self._record(owner).unlink(missing_ok=True)
        return len(digests)
