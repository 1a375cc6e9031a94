"""A watch-backed local cache of one kind of object: list, then watch from the list's resourceVersion.

Reads (`items`, `get`) never call the API server and are safe from any thread. The background thread
keeps the cache current: when a watch ends or drops it resumes from the last resourceVersion seen
(bookmarks included); when the server answers 410 Gone it lists again and replaces the cache; other
failures are retried with capped exponential backoff, which starts again from `min_backoff` after
every success (a list, an event, a watch the server ended), so a failure long ago never delays
the next retry. `synced` turns true after the first complete list has reached the cache and every
handler, and stays true (the cache may then be stale, never empty by mistake).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from imagewarm.kube import Gone, KubeError

log = logging.getLogger("imagewarm.informer")

Handler = Callable[[str, dict[str, Any]], None]
LIST_PAGE_SIZE = 500  # as client-go's reflector
Transform = Callable[[dict[str, Any]], dict[str, Any]]
Progress = Callable[["Informer"], None]


class Source(Protocol):
    """What an informer reads from (`imagewarm.kube.Kube` has this shape)."""

    def get(self, path: str, **params: Any) -> dict[str, Any]: ...

    def watch(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_seconds: int = 300,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]: ...


def key_of(obj: dict[str, Any]) -> str:
    """`namespace/name` for namespaced objects, `name` for cluster-scoped ones."""
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata.get('name')}" if namespace else str(metadata.get("name"))


class Informer:
    """Cache of the objects at the collection `path` (e.g. `/api/v1/namespaces` or
    `/apis/imagewarm.io/v1alpha1/sidecarsets`), optionally only those matching `label_selector`
    and `field_selector`. `handlers` are called on the informer's thread with
    ("ADDED"|"MODIFIED"|"DELETED", object) for every change, including those a relist reveals.

    `transform`, when given, maps every object as it arrives (list or watch) to what is kept: the
    cache and the handlers only ever see its result, so a program can hold a few fields of each of
    thousands of Pods instead of whole objects. It must keep `metadata.name` (and `namespace`).

    `on_progress`, when given, is called on the informer's thread after every list, event and
    bookmark (a program's metrics of how current its cache is: `state()`).

    Lists are read `page_size` objects at a time, so the whole objects of a page are all that is
    ever held beside the cache."""

    def __init__(
        self,
        source: Source,
        path: str,
        *,
        name: str = "",
        watch_timeout: int = 300,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        label_selector: str = "",
        field_selector: str = "",
        handlers: tuple[Handler, ...] = (),
        transform: Transform | None = None,
        on_progress: Progress | None = None,
        page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        self.source = source
        self.path = path
        self.name = name or path
        self.watch_timeout = watch_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Both selectors go to the list and to every watch (e.g. one object: `metadata.name=<name>`).
        self.params = {
            key: value
            for key, value in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if value
        }
        self.handlers = handlers
        self.transform = transform
        self.on_progress = on_progress
        self.page_size = page_size  # objects per list request (0: the whole collection at once)
        self.resource_version = ""
        self.lists = 0  # how many times the collection was listed (1 + relists)
        self.watches = 0  # how many watch requests were made
        # When the API server last told us how current the cache is (a list, an event or a bookmark;
        # time.time()). A watch sends a bookmark about every minute: a much older one is a stuck watch.
        self.progressed_at = 0.0
        self._objects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Reads ---------------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get(key)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every object by key, as of now (a shallow copy: one lock for thousands of reads)."""
        with self._lock:
            return dict(self._objects)

    def state(self) -> dict[str, Any]:
        """How current the cache is, for probes and metrics."""
        with self._lock:
            objects = len(self._objects)
        since = round(time.time() - self.progressed_at, 3) if self.progressed_at else None
        return {
            "synced": self.synced,
            "resourceVersion": self.resource_version,
            "objects": objects,
            "lists": self.lists,
            "watches": self.watches,
            "secondsSinceProgress": since,
        }

    def add_handler(self, handler: Handler) -> None:
        """Add a handler; call it before `start()` so that it sees every object."""
        self.handlers = (*self.handlers, handler)

    # Lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self.run, name=f"informer {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop; it does after the current watch request returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """List and watch until `stop()`."""
        backoff = self.min_backoff
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    backoff = self.min_backoff
                self.watches += 1
                for event in self.source.watch(
                    self.path, self.resource_version, timeout_seconds=self.watch_timeout, params=self.params
                ):
                    self._apply(event)
                    backoff = self.min_backoff
                    if self._stop.is_set():
                        return
                backoff = self.min_backoff  # the server ended the watch: resume at once
            except Gone:
                log.info("watch expired; listing again", extra={"informer": self.name})
                need_list = True
            except KubeError as exc:
                log.warning(
                    "list/watch failed; retrying",
                    extra={"informer": self.name, "error": str(exc), "retry_seconds": backoff},
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception:  # a bug must not silently end the cache's updates
                log.exception("informer error; listing again", extra={"informer": self.name})
                need_list = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    # Updates -------------------------------------------------------------------------------------

    def _list(self) -> None:
        """List in pages of `page_size` (one snapshot: the API server's continue token), each page
        transformed before the next is read: 50,000 whole Pods are never in memory at once."""
        params: dict[str, Any] = (
            {**self.params, "limit": self.page_size} if self.page_size else dict(self.params)
        )
        fresh: dict[str, dict[str, Any]] = {}
        while True:
            listing = self.source.get(self.path, **params)
            for obj in listing.get("items") or []:
                if self.transform is not None:
                    obj = self.transform(obj)
                fresh[key_of(obj)] = obj
            metadata = listing.get("metadata") or {}
            del listing
            if not metadata.get("continue"):
                break
            params["continue"] = metadata["continue"]  # an expired token answers 410: listed again
        with self._lock:
            old, self._objects = self._objects, fresh
            self.resource_version = str(metadata.get("resourceVersion") or "")
            self.lists += 1
        for key, obj in fresh.items():
            if key not in old:
                self._notify("ADDED", obj)
            elif old[key] != obj:
                self._notify("MODIFIED", obj)
        for key, obj in old.items():
            if key not in fresh:
                self._notify("DELETED", obj)
        # Synced once the handlers saw the whole list too: what they derive (the controller's pod
        # index) is complete then. Set before them, a reconcile could count 50,000 pods' images
        # from an index still filling and find an image in use unused.
        self._synced.set()
        self._progressed()

    def _apply(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            self._progressed()
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        if self.transform is not None:
            obj = self.transform(obj)
        with self._lock:
            if kind == "DELETED":
                self._objects.pop(key_of(obj), None)
            else:
                self._objects[key_of(obj)] = obj
            if version:
                self.resource_version = str(version)
        self._progressed()
        self._notify(kind, obj)

    def _progressed(self) -> None:
        self.progressed_at = time.time()
        if self.on_progress is not None:
            try:
                self.on_progress(self)
            except Exception:
                log.exception("informer progress hook failed", extra={"informer": self.name})

    def _notify(self, kind: str, obj: dict[str, Any]) -> None:
        for handler in self.handlers:
            try:
                handler(kind, obj)
            except Exception:
                log.exception("informer handler failed", extra={"informer": self.name, "event": kind})
