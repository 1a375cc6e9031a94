"""Kubernetes Events (core/v1) for what the controller did: `kubectl describe` shows them.

Recording is best effort (a failed write is logged, never raised: an Event must not fail a
reconcile). The same object, reason and message within `dedupe_seconds` counts the existing
Event up (`count`, `lastTimestamp`) instead of creating another one, as the kubelet does.
Events of cluster-scoped objects (NodeImage, SidecarSet) go to the `default` namespace.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from controller import metrics
from imagewarm.kube import Kube, KubeError, NotFound

log = logging.getLogger("imagewarm.controller.events")

COMPONENT = "imagewarm-controller"
EventType = Literal["Normal", "Warning"]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    def __init__(self, kube: Kube, *, dedupe_seconds: float = 600.0, max_remembered: int = 4096) -> None:
        self.kube = kube
        self.dedupe_seconds = dedupe_seconds
        self.max_remembered = max_remembered
        self._recent: dict[tuple[str, str, str], tuple[str, str, int, float]] = {}
        self._lock = threading.Lock()

    def normal(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.record(obj, "Normal", reason, message)

    def warning(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.record(obj, "Warning", reason, message)

    def record(self, obj: dict[str, Any], type_: EventType, reason: str, message: str) -> None:
        metadata = obj.get("metadata") or {}
        involved = {
            "apiVersion": obj.get("apiVersion", ""),
            "kind": obj.get("kind", ""),
            "name": metadata.get("name", ""),
            "uid": metadata.get("uid", ""),
        }
        namespace = metadata.get("namespace") or "default"
        if metadata.get("namespace"):
            involved["namespace"] = namespace
        dedupe = (str(metadata.get("uid") or involved["name"]), reason, message)
        metrics.EVENTS.labels(type_, reason).inc()
        stamp = now_rfc3339()
        with self._lock:
            seen = self._recent.get(dedupe)
            if seen is not None and time.monotonic() - seen[3] > self.dedupe_seconds:
                seen = None
        try:
            if seen is not None:
                ns, name, count, _ = seen
                self.kube.patch(
                    f"/api/v1/namespaces/{ns}/events/{name}", {"count": count + 1, "lastTimestamp": stamp}
                )
                remember = (ns, name, count + 1, seen[3])
            else:
                name = f"{involved['name']}.{uuid.uuid4().hex[:12]}"
                self.kube.create(
                    f"/api/v1/namespaces/{namespace}/events",
                    {
                        "apiVersion": "v1",
                        "kind": "Event",
                        "metadata": {"name": name, "namespace": namespace},
                        "involvedObject": involved,
                        "type": type_,
                        "reason": reason,
                        "message": message[:1024],
                        "source": {"component": COMPONENT},
                        "reportingComponent": COMPONENT,
                        "firstTimestamp": stamp,
                        "lastTimestamp": stamp,
                        "count": 1,
                    },
                )
                remember = (namespace, name, 1, time.monotonic())
        except NotFound:  # the counted Event expired meanwhile (or the namespace went)
            with self._lock:
                self._recent.pop(dedupe, None)
            return
        except KubeError as exc:
            log.warning("cannot record an event", extra={"reason": reason, "error": str(exc)})
            return
        with self._lock:
            if len(self._recent) >= self.max_remembered:
                self._recent.clear()
            self._recent[dedupe] = remember
