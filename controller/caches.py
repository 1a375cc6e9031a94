"""The controller's informer caches, and what of each object they keep.

Pods and Nodes are transformed as they arrive (the issue's scale rule): at 50,000 pods the cache
holds a few hundred bytes per pod, not whole objects. The custom resources are kept whole (the
controller reads most of their fields).
"""

from __future__ import annotations

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


def slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """namespace, name, uid, labels, annotations the controller reads, node, phase, images."""
    spec = pod.get("spec") or {}
    metadata = _metadata(pod, "namespace", "name", "uid", "resourceVersion", "labels", "deletionTimestamp")
    original = ((pod.get("metadata") or {}).get("annotations") or {}).get(api.ORIGINAL_IMAGES_ANNOTATION)
    if original:
        metadata["annotations"] = {api.ORIGINAL_IMAGES_ANNOTATION: original}

    def images(key: str) -> list[dict[str, str]]:
        return [{"name": c.get("name", ""), "image": c.get("image", "")} for c in spec.get(key) or []]

    return {
        "metadata": metadata,
        "spec": {
            "nodeName": spec.get("nodeName", ""),
            "containers": images("containers"),
            "initContainers": images("initContainers"),
        },
        "status": {"phase": (pod.get("status") or {}).get("phase", "")},
    }


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
    CacheSpec("nodeimages", api.NODE_IMAGE.path()),
    CacheSpec("imagepulljobs", api.IMAGE_PULL_JOB.path()),
    CacheSpec("imagelistpulljobs", api.IMAGE_LIST_PULL_JOB.path()),
    CacheSpec("sidecarsets", api.SIDECAR_SET.path()),
    CacheSpec("cachedimages", api.CACHED_IMAGE.path()),
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
