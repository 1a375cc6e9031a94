"""SidecarSets (OpenKruise semantics, group imagewarm.io) parsed once from their objects, and which pods
they select: the webhook injects them, the controller pre-pulls their images on the nodes that will
run them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from imagewarm.api import SIDECARSET_HASH_ANNOTATION
from imagewarm.errors import ImagewarmError
from imagewarm.selectors import InvalidSelector, LabelSelector

IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public"})


class InvalidSidecarSet(ImagewarmError, ValueError):
    """A SidecarSet object that cannot be used; the message names the field."""


@dataclass(frozen=True)
class SidecarSet:
    """A SidecarSet parsed once from its object (as the API returns it)."""

    name: str
    revision: str
    selector: LabelSelector
    namespace: str = ""
    namespace_selector: LabelSelector | None = None
    containers: tuple[dict[str, Any], ...] = ()
    init_containers: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    image_pull_secrets: tuple[dict[str, Any], ...] = ()
    paused: bool = False

    @classmethod
    def from_object(cls, obj: Any) -> SidecarSet:
        """Raises InvalidSidecarSet naming what is wrong."""
        if not isinstance(obj, dict):
            raise InvalidSidecarSet("not an object")
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        name = metadata.get("name")
        if not isinstance(name, str) or not name or not isinstance(spec, dict):
            raise InvalidSidecarSet("metadata.name and spec are required")

        def objects(key: str) -> tuple[dict[str, Any], ...]:
            items = spec.get(key) or []
            if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("name") for i in items):
                raise InvalidSidecarSet(f"SidecarSet {name}: spec.{key} must be a list of named objects")
            return tuple(items)

        try:
            selector = LabelSelector.parse(spec.get("selector"))
            ns_raw = spec.get("namespaceSelector")
            namespace_selector = LabelSelector.parse(ns_raw) if ns_raw is not None else None
        except InvalidSelector as exc:
            raise InvalidSidecarSet(f"SidecarSet {name}: {exc}") from None
        containers = objects("containers")
        strategy = spec.get("injectionStrategy") or {}
        annotations = metadata.get("annotations") or {}
        return cls(
            name=name,
            revision=str(annotations.get(SIDECARSET_HASH_ANNOTATION) or revision_of(containers)),
            selector=selector,
            namespace=str(spec.get("namespace") or ""),
            namespace_selector=namespace_selector,
            containers=containers,
            init_containers=objects("initContainers"),
            volumes=objects("volumes"),
            image_pull_secrets=objects("imagePullSecrets"),
            paused=isinstance(strategy, dict) and strategy.get("paused") is True,
        )

    def matches(
        self, labels: dict[str, str], namespace: str, namespace_labels: dict[str, str] | None
    ) -> bool:
        """Kruise's rule: an empty selector matches no pod; `namespace` and `namespaceSelector` narrow.
        Unknown namespace labels (None) never match a `namespaceSelector`."""
        if self.paused or namespace in IGNORED_NAMESPACES or self.selector.empty:
            return False
        if self.namespace and self.namespace != namespace:
            return False
        if self.namespace_selector is not None and (
            namespace_labels is None or not self.namespace_selector.matches(namespace_labels)
        ):
            return False
        return self.selector.matches(labels)


def revision_of(containers: Iterable[dict[str, Any]]) -> str:
    """A stable hash of the sidecar containers (what kruise's revision hash covers)."""
    text = json.dumps(list(containers), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
