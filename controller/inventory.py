"""The image inventory: which images the cluster's pods use, and where the node proxies hold them.

Pure logic for the CachedImage reconciler (`controller.cachedimages`): no API calls here.

- The Pod cache holds `controller.caches.slim_pod` (what `pod_use` reads: images, the
  original-images annotation, node, phase, container statuses' imageIDs), not whole objects.
- `PodIndex` and `TaskIndex` map an image reference to its users and to its NodeImage tasks. They
  are *derived from the informer caches*: each event replaces everything known about one object
  (set semantics), so a count is always the number of pods in the cache, whatever events came,
  were missed or were replayed by a relist (kube-image-keeper counted events: kuik#111, #136).
- `desired_status` computes a CachedImage's status from what the indexes say.

Every image is keyed by its ORIGINAL canonical reference (`str(reference.parse(text))`): a pod the
webhook rewrote names `localhost:7439/<registry-segment>/<repository>...` in its spec and the
original in the `imagewarm.io/original-images` annotation (container name -> original image).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from imagewarm import api
from imagewarm.reference import InvalidReference, Reference, from_proxied, parse

# How many pods `status.usedBy.pods` lists (the count is always the whole number).
LISTED_PODS = 10
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
_STATUS_LISTS = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")
_TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class ImageUse:
    """One image a pod uses: the original canonical reference, whether the kubelet pulls it through
    the node proxy (the webhook rewrote it), and the digest the kubelet reports for it, if any."""

    reference: str
    proxied: bool
    digest: str | None = None


@functools.lru_cache(maxsize=65536)
def _image_use(reference: str, proxied: bool, digest: str | None) -> ImageUse:
    """One shared ImageUse per distinct value (a Deployment's pods all hold the same one)."""
    return ImageUse(reference, proxied, digest)


@dataclass(frozen=True, slots=True)
class PodUse:
    """What a pod that is not finished uses. `running`: phase Running, so the kubelet has pulled
    its images (through the proxy of `node`, for the proxied ones)."""

    key: str
    node: str
    running: bool
    images: tuple[ImageUse, ...]


def _originals(metadata: Mapping[str, Any]) -> dict[str, str]:
    text = (metadata.get("annotations") or {}).get(api.ORIGINAL_IMAGES_ANNOTATION)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def _digest_of_image_id(image_id: object) -> str | None:
    """`sha256:…` from a container status imageID such as `docker.io/library/nginx@sha256:…`
    (a bare `sha256:…` is the config's ID, not the manifest digest: ignored)."""
    if not isinstance(image_id, str) or "@" not in image_id:
        return None
    digest = image_id.rpartition("@")[2]
    return digest if digest.startswith(("sha256:", "sha512:")) else None


def original_reference(image: str, original: str | None) -> tuple[Reference, bool] | None:
    """(original reference, pulled through the proxy) of a container whose spec says `image` and
    whose annotation entry (if any) says `original`; None when neither parses. A proxied spec image
    without an annotation (the annotation was removed) still maps back by `from_proxied`."""
    if original is not None:
        try:
            return parse(original), True
        except InvalidReference:
            pass
    back = from_proxied(image)
    if back is not None:
        return back, True
    try:
        return parse(image), False
    except InvalidReference:
        return None


def pod_use(pod: Mapping[str, Any]) -> PodUse | None:
    """What `pod` (a `slim_pod` or a whole Pod) uses; None once it has finished (Succeeded or
    Failed: its containers are gone). A terminating pod still counts: its containers still run."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or ""
    if phase in _TERMINAL_PHASES:
        return None
    originals = _originals(metadata)
    digests = {
        s.get("name"): _digest_of_image_id(s.get("imageID"))
        for field in _STATUS_LISTS
        for s in status.get(field) or []
    }
    uses: dict[str, ImageUse] = {}
    for field in _CONTAINER_LISTS:
        for container in spec.get(field) or []:
            image, name = container.get("image"), container.get("name")
            if not isinstance(image, str):
                continue
            found = original_reference(image, originals.get(str(name)))
            if found is None:
                continue
            ref, proxied = found
            key = sys.intern(str(ref))  # thousands of pods share one reference: one copy
            previous = uses.get(key)
            digest = digests.get(name) or (previous.digest if previous else None)
            uses[key] = _image_use(key, proxied or bool(previous and previous.proxied), digest)
    if not uses:
        return None
    key = f"{metadata.get('namespace')}/{metadata.get('name')}"
    return PodUse(key, spec.get("nodeName") or "", phase == "Running", tuple(sorted(uses.values(), key=str)))


@dataclass(frozen=True)
class Usage:
    """Who uses one image: `pods` sorted (`namespace/name`), `nodes` where a Running pod pulled it
    through the node's proxy, `digests` the kubelets reported."""

    pods: tuple[str, ...] = ()
    nodes: frozenset[str] = frozenset()
    digests: frozenset[str] = frozenset()

    @property
    def count(self) -> int:
        return len(self.pods)


def usage_of(reference: str, uses: Iterable[PodUse]) -> Usage:
    """The Usage of `reference` among `uses`."""
    pods: list[str] = []
    nodes: set[str] = set()
    digests: set[str] = set()
    for use in uses:
        for image in use.images:
            if image.reference != reference:
                continue
            pods.append(use.key)
            if use.running and image.proxied and use.node:
                nodes.add(use.node)
            if image.digest:
                digests.add(image.digest)
    return Usage(tuple(sorted(set(pods))), frozenset(nodes), frozenset(digests))


class PodIndex:
    """Pods by the images they use, fed with the Pod informer's events. Thread-safe."""

    def __init__(self) -> None:
        self._uses: dict[str, PodUse] = {}
        self._by_image: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def apply(self, kind: str, pod: Mapping[str, Any]) -> set[str]:
        """Record the pod as the event leaves it; returns the references whose usage may have
        changed (what it used before and what it uses now)."""
        use = None if kind == "DELETED" else pod_use(pod)
        if use is not None:
            key = use.key  # one string for the index and the use (50,000 of them)
        else:
            metadata = pod.get("metadata") or {}
            key = f"{metadata.get('namespace')}/{metadata.get('name')}"
        with self._lock:
            old = self._uses.pop(key, None)
            touched = {i.reference for i in old.images} if old else set()
            for reference in touched:
                users = self._by_image.get(reference)
                if users is not None:
                    users.discard(key)
                    if not users:
                        del self._by_image[reference]
            if use is not None:
                self._uses[key] = use
                for image in use.images:
                    self._by_image.setdefault(image.reference, set()).add(key)
                    touched.add(image.reference)
        return touched

    def usage(self, reference: str) -> Usage:
        with self._lock:
            uses = [self._uses[k] for k in self._by_image.get(reference, ())]
        return usage_of(reference, uses)

    def references(self) -> set[str]:
        with self._lock:
            return set(self._by_image)


# ---------------------------------------------------------------------------------------------
# NodeImage tasks


def _discard(index: dict[Any, set[str]], key: Any, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def task_reference(name: str, tag: str) -> str | None:
    """The canonical reference of NodeImage entry `name` (`docker.io/library/nginx`) with tag `tag`
    (a digest for a digest-pinned image, DESIGN.md "Control plane"); None when it does not parse."""
    text = f"{name}@{tag}" if tag.startswith(("sha256:", "sha512:")) else f"{name}:{tag}"
    try:
        return str(parse(text))
    except InvalidReference:
        return None


def entry_of(reference: Reference) -> tuple[str, str]:
    """(NodeImage `spec.images` key, tag) for a reference: the inverse of `task_reference`. A
    reference with tag and digest is pulled by its digest."""
    return reference.name, reference.digest or reference.tag or "latest"


def task_digest(image_id: str | None) -> str | None:
    """The digest of a task status's `imageID`: `sha256:…`, or the digest of `name@sha256:…`."""
    if not image_id:
        return None
    digest = image_id.rpartition("@")[2]
    return digest if digest.startswith(("sha256:", "sha512:")) else None


@dataclass(frozen=True)
class NodeTask:
    """A task of one node for one image: its spec owners and the agent's status (phase None: the
    agent has not reported on it yet)."""

    node: str
    phase: str | None
    image_id: str | None = None
    message: str = ""
    owners: tuple[Mapping[str, Any], ...] = ()


def node_tasks(nodeimage: Mapping[str, Any]) -> dict[str, NodeTask]:
    """Every task of a NodeImage, by canonical reference (spec entries and status entries)."""
    node = str((nodeimage.get("metadata") or {}).get("name"))
    owners: dict[str, tuple[Mapping[str, Any], ...]] = {}
    for name, entry in ((nodeimage.get("spec") or {}).get("images") or {}).items():
        for tag in (entry or {}).get("tags") or []:
            reference = task_reference(name, str(tag.get("tag")))
            if reference:
                owners[reference] = tuple(tag.get("ownerReferences") or ())
    statuses: dict[str, Mapping[str, Any]] = {}
    for name, entry in ((nodeimage.get("status") or {}).get("imageStatuses") or {}).items():
        for tag in (entry or {}).get("tags") or []:
            reference = task_reference(name, str(tag.get("tag")))
            if reference:
                statuses[reference] = tag
    tasks = {}
    for reference in owners.keys() | statuses.keys():
        status = statuses.get(reference) or {}
        tasks[reference] = NodeTask(
            node,
            status.get("phase"),
            status.get("imageID") or None,
            str(status.get("message") or ""),
            owners.get(reference, ()),
        )
    return tasks


class TaskIndex:
    """NodeImage tasks by image, fed with the NodeImage informer's events. Thread-safe."""

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, NodeTask]] = {}
        self._by_image: dict[str, set[str]] = {}
        self._by_owner: dict[tuple[str, str], set[str]] = {}  # (kind, name) -> nodes
        self._lock = threading.Lock()

    @staticmethod
    def _owners(tasks: Mapping[str, NodeTask]) -> set[tuple[str, str]]:
        return {(str(o.get("kind")), str(o.get("name"))) for t in tasks.values() for o in t.owners}

    def apply(self, kind: str, nodeimage: Mapping[str, Any]) -> set[str]:
        """Record the NodeImage as the event leaves it; returns the references whose tasks changed."""
        node = str((nodeimage.get("metadata") or {}).get("name"))
        tasks = {} if kind == "DELETED" else node_tasks(nodeimage)
        with self._lock:
            old = self._nodes.pop(node, {})
            for reference in old:
                _discard(self._by_image, reference, node)
            for owner in self._owners(old):
                _discard(self._by_owner, owner, node)
            if tasks:
                self._nodes[node] = tasks
            for reference in tasks:
                self._by_image.setdefault(reference, set()).add(node)
            for owner in self._owners(tasks):
                self._by_owner.setdefault(owner, set()).add(node)
        return {r for r in old.keys() | tasks.keys() if old.get(r) != tasks.get(r)}

    def tasks(self, reference: str) -> tuple[NodeTask, ...]:
        with self._lock:
            nodes = sorted(self._by_image.get(reference, ()))
            return tuple(self._nodes[n][reference] for n in nodes)

    def owned_by(self, kind: str, name: str) -> list[tuple[str, str, Mapping[str, Any]]]:
        """(node, reference, owner) for every task owned by an object of `kind` named `name`."""
        with self._lock:
            nodes = sorted(self._by_owner.get((kind, name), ()))
            return [
                (node, reference, owner)
                for node in nodes
                for reference, task in self._nodes[node].items()
                for owner in task.owners
                if owner.get("kind") == kind and owner.get("name") == name
            ]


# ---------------------------------------------------------------------------------------------
# Status


@dataclass(frozen=True)
class Measured:
    """What a look at the image's manifest found (`controller.cachedimages` asks a node proxy):
    the size of config and layers for the nodes' platform, and whether the upstream answered."""

    digest: str
    size: int | None = None
    upstream_reachable: bool | None = None


def desired_status(
    reference: Reference,
    usage: Usage,
    tasks: Iterable[NodeTask],
    stored: Mapping[str, Any],
    measured: Measured | None = None,
) -> dict[str, Any]:
    """The CachedImage status that `usage` and `tasks` call for, without `lastSeenUsed` (the
    expiry rules own it: `controller.expiry`). `stored` is the status as stored; its size and
    reachability are kept while the digest does not change and nothing new was measured.

    nodes: where a node proxy holds the image: nodes with a Succeeded task for it, and nodes where
    a pod pulled it through the proxy and runs. phase: Cached when on a node, else Caching while a
    task pulls it, else Failed when a task failed (its message), else Pending."""
    tasks = tuple(tasks)
    succeeded = [t for t in tasks if t.phase == "Succeeded"]
    nodes = sorted(usage.nodes | {t.node for t in succeeded})
    digest: str | None = reference.digest
    if digest is None:
        from_tasks = sorted({d for t in succeeded if (d := task_digest(t.image_id))})
        from_pods = sorted(usage.digests)
        digest = (from_tasks or from_pods or [str(stored.get("digest") or "")])[0] or None
    status: dict[str, Any] = {
        "usedBy": {"count": usage.count, "pods": list(usage.pods[:LISTED_PODS])},
        "nodes": nodes,
    }
    failed = [t for t in tasks if t.phase == "Failed"]
    if nodes:
        status["phase"] = "Cached"
    elif any(t.phase == "Pulling" for t in tasks):
        status["phase"] = "Caching"
    elif failed:
        status["phase"] = "Failed"
        status["message"] = f"node {failed[0].node}: {failed[0].message or 'the pull failed'}"
    else:
        status["phase"] = "Pending"
    if digest:
        status["digest"] = digest
        if measured is not None and measured.digest == digest:
            if measured.size is not None:
                status["size"] = measured.size
            if measured.upstream_reachable is not None:
                status["upstreamReachable"] = measured.upstream_reachable
        elif stored.get("digest") == digest:
            for field in ("size", "upstreamReachable"):
                if field in stored:
                    status[field] = stored[field]
    return status


def status_patch(desired: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning `stored` into `desired` for the fields `desired_status` owns (a field
    it no longer sets, such as `message`, is removed); empty when nothing differs."""
    owned = ("phase", "message", "digest", "size", "nodes", "usedBy", "upstreamReachable")
    patch: dict[str, Any] = {}
    for field in owned:
        if field in desired:
            if stored.get(field) != desired[field]:
                patch[field] = desired[field]
        elif field in stored:
            patch[field] = None
    return patch
