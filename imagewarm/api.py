"""The imagewarm.io/v1alpha1 API: wire formats of the custom resources, and the few helpers every
component needs to name and build them.

The schemas that the API server enforces live in ``charts/imagewarm/crds/<kind>.yaml``; the
TypedDicts here mirror them field for field (OpenKruise's ``apps.kruise.io/v1alpha1`` names) so
code reading a custom object from the API gets a typed view of the same dict. Keys the server
defaults (``parallelism``, ``completionPolicy.type``, ``pullPolicy``, ``imagePullPolicy``) are
present on every stored object; the ``DEFAULT_*`` constants are for objects not yet stored.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Required, TypedDict

GROUP = "imagewarm.io"
VERSION = "v1alpha1"

# Defaults the CRDs apply, for code handling objects the server has not defaulted yet.
DEFAULT_PARALLELISM = 1
DEFAULT_BACKOFF_LIMIT = 3
DEFAULT_TIMEOUT_SECONDS = 600

# Labels and annotations of other objects that the components read and write.
ENABLED_LABEL = f"{GROUP}/enabled"  # on a namespace: "false" opts out, "true" opts in (opt-in mode)
SKIP_ANNOTATION = f"{GROUP}/skip"  # on a pod: "true" leaves it unchanged
ORIGINAL_IMAGES_ANNOTATION = f"{GROUP}/original-images"  # on a pod: container name -> original image
SIDECARSET_HASH_ANNOTATION = f"{GROUP}/sidecarset-hash"

# SidecarSet annotations tuning the ImagePullJob made for its images (OpenKruise's
# apps.kruise.io/image-predownload-* in our group).
PREDOWNLOAD_PARALLELISM_ANNOTATION = f"{GROUP}/image-predownload-parallelism"
PREDOWNLOAD_TIMEOUT_ANNOTATION = f"{GROUP}/image-predownload-timeout-seconds"


def api_version() -> str:
    """The ``apiVersion`` of every imagewarm object: ``imagewarm.io/v1alpha1``."""
    return f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class Resource:
    """One kind of the API, as the CRD declares it (tests check the two agree)."""

    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...]

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        """The CustomResourceDefinition's name, ``<plural>.<group>``."""
        return f"{self.plural}.{GROUP}"

    def path(
        self, name: str | None = None, namespace: str | None = None, subresource: str | None = None
    ) -> str:
        """The REST path of the collection, or of one object (and its ``status`` subresource).

        Raises ValueError when a namespace is given for a cluster-scoped kind, or a subresource
        without a name."""
        if namespace is not None and not self.namespaced:
            raise ValueError(f"{self.kind} is cluster-scoped: call path() without a namespace")
        if subresource is not None and name is None:
            raise ValueError("a subresource belongs to one object: pass its name too")
        parts = ["/apis", GROUP, VERSION]
        if namespace is not None:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


IMAGE_PULL_JOB = Resource("ImagePullJob", "imagepulljobs", namespaced=True, short_names=("ipj",))
IMAGE_LIST_PULL_JOB = Resource(
    "ImageListPullJob", "imagelistpulljobs", namespaced=True, short_names=("ilpj",)
)
NODE_IMAGE = Resource("NodeImage", "nodeimages", namespaced=False, short_names=("ni",))
SIDECAR_SET = Resource("SidecarSet", "sidecarsets", namespaced=False, short_names=("sidecars",))
CACHED_IMAGE = Resource("CachedImage", "cachedimages", namespaced=False, short_names=("cachedimg",))
RESOURCES = (IMAGE_PULL_JOB, IMAGE_LIST_PULL_JOB, NODE_IMAGE, SIDECAR_SET, CACHED_IMAGE)

# ---------------------------------------------------------------------------------------------
# Shared pieces

CompletionPolicyType = Literal["Always", "Never"]
ImagePullPolicy = Literal["Always", "IfNotPresent"]
ImagePullPhase = Literal["Waiting", "Pulling", "Succeeded", "Failed"]
CachedImagePhase = Literal["Pending", "Caching", "Cached", "Failed"]


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    resourceVersion: str
    generation: int
    creationTimestamp: str
    deletionTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]
    finalizers: list[str]


class OwnerReference(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[str]
    name: Required[str]
    uid: Required[str]
    controller: bool
    blockOwnerDeletion: bool


class ObjectReference(TypedDict, total=False):
    apiVersion: str
    kind: str
    namespace: str
    name: str
    uid: str
    resourceVersion: str
    fieldPath: str


class LabelSelectorRequirement(TypedDict, total=False):
    key: Required[str]
    operator: Required[Literal["In", "NotIn", "Exists", "DoesNotExist"]]
    values: list[str]


class LabelSelector(TypedDict, total=False):
    matchLabels: dict[str, str]
    matchExpressions: list[LabelSelectorRequirement]


class Condition(TypedDict, total=False):
    type: Required[str]
    status: Required[Literal["True", "False", "Unknown"]]
    observedGeneration: int
    lastTransitionTime: str
    reason: str
    message: str


# ---------------------------------------------------------------------------------------------
# ImagePullJob and ImageListPullJob


class NodeSelector(LabelSelector, total=False):
    """Node names XOR a label selector over nodes (the CRD rejects both)."""

    names: list[str]


class CompletionPolicy(TypedDict, total=False):
    type: CompletionPolicyType
    activeDeadlineSeconds: int
    ttlSecondsAfterFinished: int


class PullPolicy(TypedDict, total=False):
    backoffLimit: int
    timeoutSeconds: int


class SandboxConfig(TypedDict, total=False):
    labels: dict[str, str]
    annotations: dict[str, str]


class ImagePullJobTemplate(TypedDict, total=False):
    """The spec fields an ImagePullJob shares with an ImageListPullJob."""

    parallelism: int | str
    selector: NodeSelector
    podSelector: LabelSelector
    completionPolicy: CompletionPolicy
    pullPolicy: PullPolicy
    pullSecrets: list[str]
    sandboxConfig: SandboxConfig
    imagePullPolicy: ImagePullPolicy


class ImagePullJobSpec(ImagePullJobTemplate, total=False):
    image: Required[str]


class ImagePullJobStatus(TypedDict, total=False):
    startTime: str
    completionTime: str
    desired: int
    active: int
    succeeded: int
    failed: int
    failedNodes: list[str]
    message: str
    conditions: list[Condition]


class ImagePullJob(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[Literal["ImagePullJob"]]
    metadata: Required[ObjectMeta]
    spec: Required[ImagePullJobSpec]
    status: ImagePullJobStatus


class ImageListPullJobSpec(ImagePullJobTemplate, total=False):
    images: Required[list[str]]


class FailedImageStatus(TypedDict, total=False):
    imagePullJob: str
    name: str
    message: str


class ImageListPullJobStatus(TypedDict, total=False):
    startTime: str
    completionTime: str
    desired: int
    active: int
    completed: int
    succeeded: int
    failedImageStatuses: list[FailedImageStatus]


class ImageListPullJob(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[Literal["ImageListPullJob"]]
    metadata: Required[ObjectMeta]
    spec: Required[ImageListPullJobSpec]
    status: ImageListPullJobStatus


# ---------------------------------------------------------------------------------------------
# NodeImage


class ReferenceObject(TypedDict, total=False):
    namespace: str
    name: Required[str]


class ImageTagPullPolicy(TypedDict, total=False):
    ttlSecondsAfterFinished: int
    timeoutSeconds: int
    backoffLimit: int
    activeDeadlineSeconds: int


class ImageTagSpec(TypedDict, total=False):
    tag: Required[str]
    createdAt: str
    pullPolicy: ImageTagPullPolicy
    ownerReferences: list[ObjectReference]
    version: int


class ImageSpec(TypedDict, total=False):
    pullSecrets: list[ReferenceObject]
    tags: Required[list[ImageTagSpec]]


class NodeImageSpec(TypedDict, total=False):
    images: dict[str, ImageSpec]


class ImageTagStatus(TypedDict, total=False):
    tag: Required[str]
    phase: Required[ImagePullPhase]
    progress: int
    startTime: str
    completionTime: str
    imageID: str
    message: str
    version: int


class ImageStatus(TypedDict):
    tags: list[ImageTagStatus]


class SyncStatus(TypedDict, total=False):
    syncAt: str
    status: Literal["Succeeded", "Failed"]
    message: str


class NodeImageStatus(TypedDict, total=False):
    desired: int
    succeeded: int
    failed: int
    pulling: int
    waiting: int
    firstSyncStatus: SyncStatus
    imageStatuses: dict[str, ImageStatus]


class NodeImage(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[Literal["NodeImage"]]
    metadata: Required[ObjectMeta]
    spec: NodeImageSpec
    status: NodeImageStatus


# ---------------------------------------------------------------------------------------------
# SidecarSet


class TransferEnvVar(TypedDict, total=False):
    sourceContainerName: str
    sourceContainerNameFrom: dict[str, Any]
    envName: str
    envNames: list[str]


class SidecarContainer(TypedDict, total=False):
    """A core/v1 Container (its other keys pass through untyped) plus OpenKruise's fields."""

    name: Required[str]
    image: Required[str]
    podInjectPolicy: Literal["BeforeAppContainer", "AfterAppContainer"]
    upgradeStrategy: dict[str, str]
    shareVolumePolicy: dict[str, Literal["enabled", "disabled"]]
    transferEnv: list[TransferEnvVar]
    command: list[str]
    args: list[str]
    env: list[dict[str, Any]]
    volumeMounts: list[dict[str, Any]]
    imagePullPolicy: str


class NamespaceSelector(LabelSelector, total=False):
    """Namespace names XOR a label selector over namespaces (the CRD rejects both)."""

    namespaces: list[str]


class SidecarSetInjectionStrategy(TypedDict, total=False):
    paused: bool
    revision: dict[str, str]


class SidecarSetSpec(TypedDict, total=False):
    selector: Required[LabelSelector]
    namespace: str
    namespaceSelector: NamespaceSelector
    containers: list[SidecarContainer]
    initContainers: list[SidecarContainer]
    volumes: list[dict[str, Any]]
    imagePullSecrets: list[dict[str, str]]
    injectionStrategy: SidecarSetInjectionStrategy
    updateStrategy: dict[str, Any]
    revisionHistoryLimit: int
    patchPodMetadata: list[dict[str, Any]]


class SidecarSetStatus(TypedDict, total=False):
    observedGeneration: int
    matchedPods: int
    updatedPods: int
    readyPods: int
    updatedReadyPods: int
    latestRevision: str
    collisionCount: int


class SidecarSetObject(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[Literal["SidecarSet"]]
    metadata: Required[ObjectMeta]
    spec: Required[SidecarSetSpec]
    status: SidecarSetStatus


# ---------------------------------------------------------------------------------------------
# CachedImage


class CachedImageSpec(TypedDict, total=False):
    sourceImage: Required[str]
    expiresAt: str
    retain: bool


class UsedBy(TypedDict, total=False):
    pods: list[str]
    count: int


class CachedImageStatus(TypedDict, total=False):
    phase: CachedImagePhase
    message: str
    digest: str
    size: int
    nodes: list[str]
    usedBy: UsedBy
    lastSeenUsed: str
    upstreamReachable: bool


class CachedImage(TypedDict, total=False):
    apiVersion: Required[str]
    kind: Required[Literal["CachedImage"]]
    metadata: Required[ObjectMeta]
    spec: Required[CachedImageSpec]
    status: CachedImageStatus


# ---------------------------------------------------------------------------------------------
# Helpers

_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")


def resolve_parallelism(parallelism: int | str | None, nodes: int) -> int:
    """How many of `nodes` may pull at once for a job: an int as is, a percentage of `nodes`
    rounded up (so "10%" of 3 nodes is 1, not a silent pause), None as the default 1.
    0 and "0%" pause the job. Raises ValueError for anything the CRD would reject."""
    if parallelism is None:
        return DEFAULT_PARALLELISM
    if isinstance(parallelism, bool):
        raise ValueError(f"parallelism must be an integer or a percentage, not {parallelism!r}")
    if isinstance(parallelism, int):
        if parallelism < 0:
            raise ValueError(f"parallelism must not be negative, got {parallelism}")
        return parallelism
    if not _PERCENT.match(parallelism):
        raise ValueError(f'parallelism must be an integer or a percentage such as "50%", got {parallelism!r}')
    return math.ceil(int(parallelism[:-1]) * nodes / 100)


# A DNS-1123 subdomain: what the API server accepts as the name of a cluster-scoped object.
_NAME_MAX = 253
_HASH_LENGTH = 10
_NOT_NAME_CHARACTERS = re.compile(r"[^a-z0-9.]+")
_DOTTED_SEPARATORS = re.compile(r"[.-]*\.[.-]*")


def cached_image_name(image: str) -> str:
    """The CachedImage name for an image reference: readable, stable and unique per reference.

    Pass the canonical reference (``str(imagewarm.reference.parse(text))``) so that spellings of
    one image share one object. The name is the reference lowered, with every run of characters
    a Kubernetes name cannot hold replaced by ``-`` (``.`` where the run held a dot), cut to fit,
    then ``-`` and the first 10 hex digits of the reference's SHA-256 (so ``a/b:c`` and
    ``a/b-c`` stay distinct)."""
    if not image:
        raise ValueError("cached_image_name needs an image reference, got an empty string")
    digest = hashlib.sha256(image.encode()).hexdigest()[:_HASH_LENGTH]
    readable = _NOT_NAME_CHARACTERS.sub("-", image.lower())
    # Each dot-separated label must start and end alphanumeric: a run of separators holding a
    # dot becomes one dot.
    readable = _DOTTED_SEPARATORS.sub(".", readable)
    readable = readable[: _NAME_MAX - _HASH_LENGTH - 1]
    # A name starts and ends with an alphanumeric character; trim separators left at the cut.
    readable = readable.strip(".-")
    return f"{readable}-{digest}" if readable else digest


def image_pull_job(
    name: str,
    image: str,
    *,
    namespace: str,
    template: ImagePullJobTemplate | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owner: OwnerReference | None = None,
) -> ImagePullJob:
    """A new ImagePullJob object, ready to create; `template` fields are copied into its spec."""
    metadata: ObjectMeta = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    spec: ImagePullJobSpec = {**(template or {}), "image": image}
    return {"apiVersion": api_version(), "kind": "ImagePullJob", "metadata": metadata, "spec": spec}


def owner_reference(obj: dict[str, Any], *, controller: bool = True) -> OwnerReference:
    """An ownerReference to `obj` (a stored object: it needs ``metadata.uid``), so that the API
    server's garbage collector deletes what we create for it when it goes."""
    metadata = obj.get("metadata") or {}
    if not metadata.get("uid"):
        raise ValueError(
            "an owner reference needs a stored object with metadata.uid: read it from the API first"
        )
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }
