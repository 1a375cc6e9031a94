"""Pods -> CachedImage: one per image in use, named `cached_image_name(str(reference))` after the
pod's ORIGINAL image (`controller.inventory`), kept, expired and deleted (`controller.expiry`).

The key is the CachedImage's name. A reconcile reads only the caches (and their indexes, derived
from them): the usage of the image, its NodeImage tasks, the stored object; then it writes what
differs, in this order:
1. create the CachedImage when a pod uses an image that has none;
2. its status (usedBy, nodes, digest, phase, lastSeenUsed, size), at most one write per image
   every `expiry.STATUS_WRITE_INTERVAL` seconds (a Deployment of 1,000 pods is a few writes);
3. expiry: `spec.expiresAt` set once when unused, cleared when used or retained; deletion once it
   passed, after checking every pod of the cache again, with uid and resourceVersion preconditions;
4. pins: the node tasks it owns where its pods pulled it through the proxy (`controller.pins`); a
   deleted CachedImage's owner is removed from every task.

Sizes (`status.size`: config + layers for the nodes' platform) are read from the manifest through
a node proxy (`--image-proxy`; the manifest only, no blob) once per digest; the same answer says
whether the upstream answered (`upstreamReachable`: false when the proxy served a stale tag, true
when it fetched from the upstream, unchanged when it answered from its cache). Without
`--image-proxy` both stay unset. A private image's manifest needs credentials the controller does
not have: its size stays unset too (logged once).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from controller import expiry, inventory, metrics, pins
from controller.context import Context
from controller.nodeimagewriter import NodeImageWriter
from imagewarm import api, platforms
from imagewarm.kube import AlreadyExists, Conflict, NotFound
from imagewarm.reference import InvalidReference, Reference, parse

log = logging.getLogger("imagewarm.controller.cachedimages")

NAME = "cachedimages"
MISSING_NODEIMAGE_RECHECK = 5.0
POD_EVENT_DELAY = 1.0
NODEIMAGE_EVENT_DELAY = 1.0
MEASURE_RETRY = 300.0  # a failed size lookup is tried again after this long
MANAGED_BY = {"app.kubernetes.io/managed-by": "imagewarm-controller"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CachedImageReconciler:
    name = NAME

    def __init__(
        self,
        ctx: Context,
        *,
        clock: Callable[[], dt.datetime] = _now,
        spacing: expiry.WriteSpacing | None = None,
    ) -> None:
        self.kube = ctx.kube
        self.events = ctx.events
        self.ttl = ctx.config.unused_image_ttl
        self.image_proxy = ctx.config.image_proxy
        self.pods = ctx.caches["pods"]
        self.nodes = ctx.caches["nodes"]
        self.nodeimages = ctx.caches["nodeimages"]
        self.cached = ctx.caches["cachedimages"]
        self.clock = clock
        self.spacing = spacing or expiry.WriteSpacing()
        self.writer = NodeImageWriter(ctx.kube, self.nodeimages)
        self.pod_index = inventory.PodIndex()
        self.task_index = inventory.TaskIndex()
        self._references: dict[str, str] = {}  # CachedImage name -> canonical reference
        self._measured: dict[str, tuple[float, inventory.Measured | None]] = {}
        self._lock = threading.Lock()

    # Keys -----------------------------------------------------------------------------------------

    def name_of(self, reference: str) -> str:
        name = api.cached_image_name(reference)
        with self._lock:
            self._references[name] = reference
        return name

    def on_pod(self, kind: str, pod: dict[str, Any]) -> list[str]:
        return [self.name_of(r) for r in self.pod_index.apply(kind, pod)]

    def on_nodeimage(self, kind: str, nodeimage: dict[str, Any]) -> list[str]:
        return [self.name_of(r) for r in self.task_index.apply(kind, nodeimage)]

    def on_cached_image(self, kind: str, cached: dict[str, Any]) -> list[str]:
        name = str(cached["metadata"]["name"])
        source = (cached.get("spec") or {}).get("sourceImage")
        if kind != "DELETED" and isinstance(source, str):
            try:
                reference = str(parse(source))
            except InvalidReference:
                reference = ""
            if reference and api.cached_image_name(reference) == name:
                with self._lock:
                    self._references[name] = reference
        return [name]

    def all_keys(self) -> list[str]:
        names = {str(c["metadata"]["name"]) for c in self.cached.items()}
        return sorted(names | {self.name_of(r) for r in self.pod_index.references()})

    def _reference(self, name: str) -> str | None:
        with self._lock:
            return self._references.get(name)

    # Reconcile ------------------------------------------------------------------------------------

    def reconcile(self, key: str) -> float | None:
        if not (self.pods.synced and self.nodeimages.synced and self.cached.synced):
            return 1.0  # never judge usage from a cache still filling (an empty one means "unused")
        stored = self.cached.get(key)
        reference = self._reference(key)
        usage = self.pod_index.usage(reference) if reference else inventory.Usage()
        if stored is None:
            if not usage.count or reference is None:
                self._unpin(key, keep_uid=None)
                self.spacing.forget(key)
                return None
            stored = self._create(key, reference)
            if stored is None:
                return 1.0
        if reference is None:  # a CachedImage whose sourceImage does not name it: not ours to keep
            return None
        now = self.clock()
        ref = parse(reference)
        if usage.count and (stored.get("spec") or {}).get("expiresAt"):
            stored = self._set_expiry(stored, None)  # in use again: at once, not after a coalesced write
        status = stored.get("status") or {}
        tasks = self.task_index.tasks(reference)
        desired = inventory.desired_status(ref, usage, tasks, status)
        measured = self._measure(ref, desired.get("digest"), status, usage, tasks)
        if measured is not None:
            desired = inventory.desired_status(ref, usage, tasks, status, measured)
        patch = inventory.status_patch(desired, status)
        seen = expiry.last_seen_used(usage.count > 0, status, now)
        if seen is not None:
            patch["lastSeenUsed"] = seen
        if patch:
            wait = self.spacing.wait(key)
            if wait > 0:
                return wait  # coalesced: the next write carries the latest state
            stored = self.kube.patch(api.CACHED_IMAGE.path(key, subresource="status"), {"status": patch})
            self.spacing.wrote(key)
            metrics.CACHED_IMAGE_WRITES.labels("status").inc()
            status = stored.get("status") or {}
        recheck: list[float] = []
        action = expiry.expiry_action(
            stored.get("spec") or {}, status, usage.count > 0, now, self.ttl,
            (stored.get("metadata") or {}).get("creationTimestamp"),
        )  # fmt: skip
        if action.action == "delete":
            return self._expire(key, reference, stored)
        if action.action in ("set", "clear"):
            stored = self._set_expiry(stored, action.expires_at)
        if action.recheck is not None:
            recheck.append(action.recheck)
        if usage.count:
            recheck.append(expiry.LAST_SEEN_REFRESH)
        if not self._pin(ref, stored, usage, now):
            recheck.append(MISSING_NODEIMAGE_RECHECK)
        self._unpin(key, keep_uid=stored["metadata"]["uid"])
        return min(recheck) if recheck else None

    # Steps ----------------------------------------------------------------------------------------

    def _create(self, name: str, reference: str) -> dict[str, Any] | None:
        body = {
            "apiVersion": api.api_version(),
            "kind": "CachedImage",
            "metadata": {"name": name, "labels": dict(MANAGED_BY)},
            "spec": {"sourceImage": reference},
        }
        try:
            created: dict[str, Any] = self.kube.create(api.CACHED_IMAGE.path(), body)
        except AlreadyExists:
            return None  # the cache is behind: its event brings the key back
        metrics.CACHED_IMAGE_WRITES.labels("create").inc()
        log.info("CachedImage created", extra={"cachedimage": name, "image": reference})
        return created

    def _set_expiry(self, stored: dict[str, Any], expires_at: str | None) -> dict[str, Any]:
        """Write (or, with None, remove) spec.expiresAt, on the resourceVersion the decision was
        made on: a concurrent change conflicts and the reconcile runs again (never a second value)."""
        metadata = stored["metadata"]
        patch = {
            "metadata": {"resourceVersion": metadata["resourceVersion"]},
            "spec": {"expiresAt": expires_at},
        }
        updated: dict[str, Any] = self.kube.patch(api.CACHED_IMAGE.path(metadata["name"]), patch)
        metrics.CACHED_IMAGE_WRITES.labels("expiry").inc()
        source = stored["spec"]["sourceImage"]
        if expires_at is not None:
            self.events.normal(updated, "Unused", f"no pod uses {source}; it expires at {expires_at}")
            log.info("CachedImage unused", extra={"cachedimage": metadata["name"], "expires_at": expires_at})
        else:
            log.info("CachedImage expiry cleared", extra={"cachedimage": metadata["name"]})
        return updated

    def _expire(self, name: str, reference: str, stored: dict[str, Any]) -> float | None:
        """Delete an expired CachedImage, unless a pod of the cache uses it at this moment (the
        index may lag the cache by an event: kuik#540, #567 deleted images in use)."""
        uses = [u for u in map(inventory.pod_use, self.pods.items()) if u is not None]
        if inventory.usage_of(reference, uses).count:
            return 0.0  # its pod's event is on its way; the next reconcile clears expiresAt
        metadata = stored["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": metadata["uid"], "resourceVersion": metadata["resourceVersion"]},
        }
        try:
            self.kube.request("DELETE", api.CACHED_IMAGE.path(name), body=options)
        except NotFound:
            pass
        except Conflict:
            return 0.0  # changed since it was read: decide again on what is stored now
        metrics.CACHED_IMAGE_WRITES.labels("delete").inc()
        self.events.normal(
            stored, "Expired", f"no pod used {reference} since {stored['spec'].get('expiresAt')}"
        )
        log.info("CachedImage expired and deleted", extra={"cachedimage": name, "image": reference})
        self._unpin(name, keep_uid=None)
        self.spacing.forget(name)
        return None

    def _pin(self, ref: Reference, stored: dict[str, Any], usage: inventory.Usage, now: dt.datetime) -> bool:
        """Own the task for the image on every node where a pod pulled it through the proxy and
        runs. False when a node has no NodeImage yet (look again later)."""
        owner = pins.owner_of(stored)
        image, tag = inventory.entry_of(ref)
        created_at = expiry.format_time(now)
        complete = True
        for node in sorted(usage.nodes):
            before = self.writer.writes
            written = self.writer.update(node, image, lambda e: pins.pin_entry(e, tag, owner, created_at))
            complete = complete and written is not None
            if self.writer.writes > before:
                metrics.CACHED_IMAGE_WRITES.labels("pin").inc()
        return complete

    def _unpin(self, name: str, keep_uid: str | None) -> None:
        """Remove the owners named `name` (but `keep_uid`) from every node's tasks."""
        places = {
            (node, inventory.entry_of(parse(reference))[0])
            for node, reference, owner in self.task_index.owned_by(pins.KIND, name)
            if owner.get("uid") != keep_uid
        }
        for node, image in sorted(places):
            before = self.writer.writes
            self.writer.update(node, image, lambda e: pins.unpin_entry(e, name, keep_uid))
            if self.writer.writes > before:
                metrics.CACHED_IMAGE_WRITES.labels("unpin").inc()

    def _measure(
        self,
        ref: Reference,
        digest: str | None,
        status: dict[str, Any],
        usage: inventory.Usage,
        tasks: tuple[inventory.NodeTask, ...],
    ) -> inventory.Measured | None:
        """The size of `digest` through the image proxy, when it is not stored yet (once per digest,
        a failure tried again after MEASURE_RETRY)."""
        if not self.image_proxy or not digest or (status.get("digest") == digest and "size" in status):
            return None
        key = f"{ref}@{digest}"
        with self._lock:
            tried = self._measured.get(key)
        if tried is not None and (tried[1] is not None or time.monotonic() - tried[0] < MEASURE_RETRY):
            return tried[1]
        from imagewarm import warmup

        platform = self._platform(usage, tasks)
        measured: inventory.Measured | None
        try:
            answer = warmup.measure(ref, self.image_proxy, platform=platform, timeout=10)
            reachable = {"stale": False, "miss": True}.get(answer.cache or "")
            if answer.digest == digest:
                measured = inventory.Measured(digest, answer.size, reachable)
            else:  # the tag moved upstream: the nodes hold `digest`, measure that one
                pinned = warmup.measure(
                    ref.with_digest(digest), self.image_proxy, platform=platform, timeout=10
                )
                measured = inventory.Measured(digest, pinned.size, reachable)
        except warmup.WarmError as exc:
            log.info("image size unknown", extra={"image": str(ref), "error": str(exc)})
            measured = None
        with self._lock:
            self._measured[key] = (time.monotonic(), measured)
        return measured

    def _platform(self, usage: inventory.Usage, tasks: tuple[inventory.NodeTask, ...]) -> platforms.Platform:
        """The platform of a node holding the image (the controller's own when none says)."""
        for node in sorted(usage.nodes | {t.node for t in tasks}):
            info = ((self.nodes.get(node) or {}).get("status") or {}).get("nodeInfo") or {}
            if info.get("operatingSystem") and info.get("architecture"):
                return platforms.Platform(info["operatingSystem"], info["architecture"])
        return platforms.this_platform()


def create(ctx: Context) -> CachedImageReconciler:
    reconciler = CachedImageReconciler(ctx)

    def feed(
        keys: Callable[[str, dict[str, Any]], list[str]], after: float = 0.0
    ) -> Callable[[str, dict[str, Any]], None]:
        def handler(kind: str, obj: dict[str, Any]) -> None:
            for key in keys(kind, obj):
                ctx.runner.enqueue(NAME, key, after)

        return handler

    # The indexes are updated on the informers' threads before the keys are queued. Pod and
    # NodeImage events wait a moment: a key already waiting is not queued twice, so a
    # Deployment's burst of pod events, or a job's thousands of task updates, is one reconcile
    # of the image per delay, not one per event (its status is written every few seconds anyway).
    ctx.caches["pods"].add_handler(feed(reconciler.on_pod, POD_EVENT_DELAY))
    ctx.caches["nodeimages"].add_handler(feed(reconciler.on_nodeimage, NODEIMAGE_EVENT_DELAY))
    ctx.caches["cachedimages"].add_handler(feed(reconciler.on_cached_image))
    ctx.resync[NAME] = reconciler.all_keys
    return reconciler
