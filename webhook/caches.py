"""What the view reads instead of calling the API server: SidecarSets and namespace labels.

Both come from watch-backed caches (`imagewarm.informer.Informer` or anything with the `Store`
shape). SidecarSets are parsed once per resourceVersion, not per request.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from imagewarm.sidecarset import InvalidSidecarSet, SidecarSet

log = logging.getLogger("imagewarm.webhook")


class Store(Protocol):
    @property
    def synced(self) -> bool: ...

    def items(self) -> list[dict[str, Any]]: ...

    def get(self, key: str) -> dict[str, Any] | None: ...

    def wait_synced(self, timeout: float) -> bool: ...

    def state(self) -> dict[str, Any]: ...


class SidecarSets:
    """Parsed SidecarSets from a store; an invalid one is logged once and left out."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._parsed: dict[tuple[str, str], SidecarSet | None] = {}
        self._lock = threading.Lock()
        self._waited = False

    def current(self, wait: float) -> tuple[list[SidecarSet], bool]:
        """(SidecarSets, synced). The first request waits up to `wait` seconds for the first sync;
        when the cache has not synced by then (API server unreachable, CRD not installed) no later
        request waits again: the list is whatever has been seen (possibly empty), synced is False."""
        synced = self.store.synced
        if not synced and not self._waited:
            synced = self.store.wait_synced(wait)
            self._waited = True
        result: list[SidecarSet] = []
        seen: set[tuple[str, str]] = set()
        for obj in self.store.items():
            metadata = obj.get("metadata") or {}
            key = (str(metadata.get("name")), str(metadata.get("resourceVersion")))
            seen.add(key)
            with self._lock:
                if key not in self._parsed:
                    try:
                        self._parsed[key] = SidecarSet.from_object(obj)
                    except InvalidSidecarSet as exc:
                        log.warning(
                            "SidecarSet ignored: fix it to have it injected", extra={"error": str(exc)}
                        )
                        self._parsed[key] = None
                parsed = self._parsed[key]
            if parsed is not None:
                result.append(parsed)
        with self._lock:
            for key in set(self._parsed) - seen:
                del self._parsed[key]
        return result, synced


def namespace_labels(store: Store | None, namespace: str) -> dict[str, str] | None:
    """The labels of `namespace`, or None when the cache does not (yet) know it."""
    if store is None or not namespace:
        return None
    obj = store.get(namespace)
    if obj is None:
        return None
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}
