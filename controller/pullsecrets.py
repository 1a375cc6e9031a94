"""Copies of jobs' pull secrets in the release namespace (docs/DESIGN.md "Pull secrets").

A job's `pullSecrets` name Secrets in the job's namespace. Agents may read Secrets only in the
release namespace, so the controller keeps a copy of each referenced one there, named
`imagewarm-pull-<hash of namespace/name>` and labelled `imagewarm.io/pull-secret-of`. A copy is
written only when its data or type differs from the source (no write per reconcile, kruise#2381);
a source is read again at most every `recheck_seconds`. Copies no job references any more are
deleted; one already gone is not an error and is not logged (kruise#2235). Secret data never
reaches a log line.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from imagewarm.kube import Kube, NotFound

log = logging.getLogger("imagewarm.controller.pullsecrets")

LABEL = "imagewarm.io/pull-secret-of"
SOURCE_ANNOTATION = "imagewarm.io/pull-secret-source"
PREFIX = "imagewarm-pull-"


def copy_name(namespace: str, name: str) -> str:
    return PREFIX + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:16]


def label_value(namespace: str, name: str) -> str:
    """`<namespace>.<name>` (a label value holds 63 characters: longer ones are hashed)."""
    value = f"{namespace}.{name}"
    return value if len(value) <= 63 else copy_name(namespace, name).removeprefix(PREFIX)


class MissingSecret(LookupError):
    """A job names a Secret that does not exist in its namespace."""


class PullSecrets:
    def __init__(self, kube: Kube, namespace: str, *, recheck_seconds: float = 60.0) -> None:
        self.kube = kube
        self.namespace = namespace
        self.recheck_seconds = recheck_seconds
        self._checked: dict[str, tuple[float, str]] = {}  # copy name -> (when, source resourceVersion)
        self._lock = threading.Lock()
        self.writes = 0

    def path(self, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/secrets"
        return f"{base}/{name}" if name else base

    def ensure(self, namespace: str, names: Iterable[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """The copies `(release namespace, copy name)` of the Secrets `names` of `namespace`,
        written where they differ; and the names that do not exist (the job's status says so)."""
        copies, missing = [], []
        for name in names:
            target = copy_name(namespace, name)
            try:
                self._sync(namespace, name, target)
            except MissingSecret:
                missing.append(name)
                continue
            copies.append((self.namespace, target))
        return copies, missing

    def _sync(self, namespace: str, name: str, target: str) -> None:
        with self._lock:
            checked = self._checked.get(target)
        if checked is not None and time.monotonic() - checked[0] < self.recheck_seconds:
            return
        try:
            source = self.kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except NotFound:
            raise MissingSecret(f"{namespace}/{name}") from None
        source_version = str(source["metadata"].get("resourceVersion", ""))
        if checked is not None and checked[1] == source_version:
            with self._lock:
                self._checked[target] = (time.monotonic(), source_version)
            return
        wanted = {"type": source.get("type", "Opaque"), "data": source.get("data") or {}}
        try:
            current: dict[str, Any] | None = self.kube.get(self.path(target))
        except NotFound:
            current = None
        if current is None:
            self.kube.create(self.path(), self._body(namespace, name, target, wanted))
            self.writes += 1
            log.info("pull secret copied", extra={"source": f"{namespace}/{name}", "copy": target})
        elif {"type": current.get("type"), "data": current.get("data") or {}} != wanted:
            body = self._body(namespace, name, target, wanted)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self.kube.replace(self.path(target), body)
            self.writes += 1
            log.info("pull secret copy updated", extra={"source": f"{namespace}/{name}", "copy": target})
        with self._lock:
            self._checked[target] = (time.monotonic(), source_version)

    def _body(self, namespace: str, name: str, target: str, wanted: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": target,
                "namespace": self.namespace,
                "labels": {LABEL: label_value(namespace, name), "app.kubernetes.io/managed-by": "imagewarm"},
                "annotations": {SOURCE_ANNOTATION: f"{namespace}/{name}"},
            },
            **wanted,
        }

    def collect(self, referenced: set[tuple[str, str]]) -> int:
        """Delete the copies whose source `(namespace, name)` no job references; returns how many."""
        listing = self.kube.get(self.path(), labelSelector=LABEL)
        deleted = 0
        for secret in listing.get("items") or []:
            metadata = secret.get("metadata") or {}
            source = (metadata.get("annotations") or {}).get(SOURCE_ANNOTATION, "")
            namespace, _, name = source.partition("/")
            if (namespace, name) in referenced:
                continue
            try:
                self.kube.delete(self.path(metadata["name"]))
                deleted += 1
                log.info("unreferenced pull secret copy deleted", extra={"copy": metadata["name"]})
            except NotFound:
                pass  # already gone: nothing to do, nothing to say
            with self._lock:
                self._checked.pop(metadata["name"], None)
        return deleted
