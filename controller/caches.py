"""The controller's informer caches, and what of each object they keep.

Pods and Nodes are transformed as they arrive (the issue's scale rule): at 50,000 pods the cache
holds under a kilobyte per pod, not whole objects (what pods have in common is shared). The
custom resources are kept whole but for `managedFields` (the controller reads most of their
fields).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagewarm import api
from imagewarm.informer import Informer, Source

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def _metadata(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    return {k: metadata[k] for k in keys if k in metadata}


def slim_node(node: dict[str, Any]) -> dict[str, Any]:
    """name, uid, resourceVersion, labels and the node's OS and architecture."""
    info = (node.get("status") or {}).get("nodeInfo") or {}
    return {
        "metadata": _metadata(node, "name", "uid", "resourceVersion", "labels", "deletionTimestamp"),
        "status": {"nodeInfo": {k: info[k] for k in ("operatingSystem", "architecture") if k in info}},
    }


def _shared(value: object) -> str:
    """One copy of a string thousands of pods repeat (images, node names, digests)."""
    return sys.intern(value) if isinstance(value, str) else ""


# The parts of a slim pod that a Deployment's pods have in common (labels, the annotation, the
# containers, a phase) are one object shared by all of them, found by content: at 50,000 pods
# this halves the cache. Cached objects are read-only (every handler and reconciler shares
# them); the caches are bounded, an evicted entry only stops being shared with later pods.
_SHARED_PARTS = 65536
_NO_CONTAINERS: list[dict[str, str]] = []


@functools.lru_cache(maxsize=_SHARED_PARTS)
def _labels(items: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(items)


@functools.lru_cache(maxsize=_SHARED_PARTS)
def _annotations(original: str) -> dict[str, str]:
    return {api.ORIGINAL_IMAGES_ANNOTATION: original}


@functools.lru_cache(maxsize=_SHARED_PARTS)
def _entries(key: str, pairs: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """[{"name": ..., key: ...}, ...] for (name, value) pairs."""
    return [{"name": name, key: value} for name, value in pairs]


@functools.lru_cache(maxsize=_SHARED_PARTS)
def _status(phase: str, statuses: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    for key, pairs in statuses:
        status[key] = _entries("imageID", pairs)
    return status


def _pairs(items: list[dict[str, Any]], key: str) -> tuple[tuple[str, str], ...]:
    return tuple((_shared(c.get("name")), _shared(c.get(key))) for c in items if isinstance(c, dict))


def _containers(spec: dict[str, Any], field: str) -> list[dict[str, str]]:
    items = spec.get(field)
    return _entries("image", _pairs(items, "image")) if items else _NO_CONTAINERS


def slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """namespace, name, uid, labels, annotations the controller reads, node, phase, images, and
    the imageID (digest) of each container status. Parts equal across pods are shared objects:
    never modify a slim pod."""
    spec = pod.get("spec") or {}
    metadata = _metadata(pod, "name", "uid", "deletionTimestamp")
    whole = pod.get("metadata") or {}
    if "namespace" in whole:
        metadata["namespace"] = _shared(whole["namespace"])
    labels = whole.get("labels")
    if isinstance(labels, dict):
        metadata["labels"] = _labels(tuple(sorted((str(k), str(v)) for k, v in labels.items())))
    original = (whole.get("annotations") or {}).get(api.ORIGINAL_IMAGES_ANNOTATION)
    if original and isinstance(original, str):
        metadata["annotations"] = _annotations(original)
    status = pod.get("status") or {}
    statuses = tuple(  # the digest each image resolved to (CachedImage status.digest)
        (key, _pairs(status[key], "imageID"))
        for key in ("containerStatuses", "initContainerStatuses")
        if status.get(key)
    )
    slim = {
        "metadata": metadata,
        "spec": {
            "nodeName": _shared(spec.get("nodeName")),
            "containers": _containers(spec, "containers"),
            "initContainers": _containers(spec, "initContainers"),
        },
        "status": _status(_shared(status.get("phase")), statuses),
    }
    if spec.get("ephemeralContainers"):
        slim["spec"]["ephemeralContainers"] = _containers(spec, "ephemeralContainers")
    return slim


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without `metadata.managedFields` (server-side apply's bookkeeping, which no
    reconciler reads: a third of a NodeImage that two writers, the controller and the agent, keep)."""
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and "managedFields" in metadata:
        obj = {**obj, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
    return obj


@dataclass(frozen=True)
class CacheSpec:
    """One informer the controller runs: the collection's path and what is kept of its objects."""

    name: str
    path: str
    transform: Transform | None = None


# Every cache in one place (a reconciler that needs another kind adds it here).
CACHES: tuple[CacheSpec, ...] = (
    CacheSpec("nodes", "/api/v1/nodes", slim_node),
    CacheSpec("pods", "/api/v1/pods", slim_pod),
    CacheSpec("namespaces", "/api/v1/namespaces", lambda ns: {"metadata": _metadata(ns, "name", "labels")}),
    CacheSpec("nodeimages", api.NODE_IMAGE.path(), without_managed_fields),
    CacheSpec("imagepulljobs", api.IMAGE_PULL_JOB.path(), without_managed_fields),
    CacheSpec("imagelistpulljobs", api.IMAGE_LIST_PULL_JOB.path(), without_managed_fields),
    CacheSpec("sidecarsets", api.SIDECAR_SET.path(), without_managed_fields),
    CacheSpec("cachedimages", api.CACHED_IMAGE.path(), without_managed_fields),
)


class Caches:
    """The started-or-not informers by name (`caches["pods"]`)."""

    def __init__(self, source: Source, specs: tuple[CacheSpec, ...] = CACHES) -> None:
        self.informers = {s.name: Informer(source, s.path, name=s.name, transform=s.transform) for s in specs}

    def __getitem__(self, name: str) -> Informer:
        return self.informers[name]

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    def wait_synced(self, timeout: float) -> list[str]:
        """The names of the caches still not synced after `timeout` seconds (empty: all synced)."""
        import time

        deadline = time.monotonic() + timeout
        for informer in self.informers.values():
            informer.wait_synced(max(0.0, deadline - time.monotonic()))
        return [name for name, i in self.informers.items() if not i.synced]

    @property
    def synced(self) -> bool:
        return all(i.synced for i in self.informers.values())

    def stop(self) -> None:
        for informer in self.informers.values():
            informer.stop(timeout=0.1)
