"""Writes one image entry of a NodeImage's spec, and reads NodeImages as of our own last write.

Every write is a JSON merge patch of `spec.images[<name>]` alone, carrying the resourceVersion
it was computed from: a conflict (another job or the agent wrote meanwhile) re-reads the object
and recomputes the entry, so concurrent jobs never overwrite each other's tasks (kruise#1517).

The informer cache lags our own writes by a watch event. A reconcile that ran before the event
arrived would not see the task it just added and, under `parallelism: 1`, start a second node.
So `get` answers with the object our write returned for as long as the cache still holds a
version older than that write (one we read or wrote before it); once the cache moves on, the
cache answers again. No resourceVersion is compared for order: only for equality.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.caches import without_managed_fields
from imagewarm import api
from imagewarm.informer import Informer
from imagewarm.kube import Conflict, Kube, NotFound

Compute = Callable[[api.ImageSpec | None], api.ImageSpec | None]
ATTEMPTS = 8


@dataclass
class _Written:
    obj: dict[str, Any]
    older: set[str] = field(default_factory=set)  # resourceVersions known to precede `obj`


def _version(obj: dict[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class NodeImageWriter:
    def __init__(self, kube: Kube, cache: Informer) -> None:
        self.kube = kube
        self.cache = cache
        self._written: dict[str, _Written] = {}
        self._lock = threading.Lock()
        self.writes = 0  # spec patches sent (for tests and the benchmark)

    def get(self, name: str) -> dict[str, Any] | None:
        cached = self.cache.get(name)
        with self._lock:
            written = self._written.get(name)
            if written is None:
                return cached
            if cached is not None and _version(cached) in written.older:
                return written.obj
            del self._written[name]
        return cached

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every NodeImage by name, as `get` would answer for each."""
        objects = self.cache.snapshot()
        with self._lock:
            for name, written in list(self._written.items()):
                cached = objects.get(name)
                if cached is not None and _version(cached) in written.older:
                    objects[name] = written.obj
                else:
                    del self._written[name]
        return objects

    def update(self, name: str, image: str, compute: Compute) -> dict[str, Any] | None:
        """Set `spec.images[image]` of NodeImage `name` to `compute(current entry)` (None removes
        it); nothing is written when that is the current entry. Returns the NodeImage as after
        the write, None if it does not exist."""
        older: set[str] = set()
        obj = self.get(name)
        for _ in range(ATTEMPTS):
            if obj is None:
                return None
            current = ((obj.get("spec") or {}).get("images") or {}).get(image)
            wanted = compute(current)
            if wanted == current:
                return obj
            rv = _version(obj)
            # What the cache holds now precedes our write (the cache only moves forward). Read it
            # before writing: after the write it may already show a later change by someone else.
            cached = self.cache.get(name)
            if cached is not None:
                older.add(_version(cached))
            patch = {"metadata": {"resourceVersion": rv}, "spec": {"images": {image: wanted}}}
            try:
                result = self.kube.patch(api.NODE_IMAGE.path(name), patch)
            except Conflict:
                older.add(rv)
                try:
                    obj = self.kube.get(api.NODE_IMAGE.path(name))
                except NotFound:
                    return None
                continue
            except NotFound:
                return None
            self.writes += 1
            older.add(rv)
            result = without_managed_fields(result)  # as the cache keeps it
            with self._lock:
                previous = self._written.get(name)
                self._written[name] = _Written(result, older | (previous.older if previous else set()))
            return result
        raise Conflict(f"NodeImage {name}: the image entry {image} kept changing; retrying later")
