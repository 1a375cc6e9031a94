"""Simulated node agents: they run NodeImage tasks the way docs/DESIGN.md says the real agent
does, without pulling anything, so the controller can be tested and benchmarked on Node objects
that have no kubelet.

For every task (image name, tag, version) in a simulated node's NodeImage spec that has no
status at its version, the simulator writes `Pulling` (the first status write), and after
`pull_seconds` `Succeeded` with an imageID, or `Failed` with the message `outcome` returns (the
second write). Statuses of tags that left the spec are dropped. Everything goes through the API
server: JSON merge patches of the status subresource, the agent's counters included.
"""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from imagewarm import api
from imagewarm.informer import Informer
from imagewarm.kube import Conflict, Kube, KubeError, NotFound

# (node, image name, tag) -> None to succeed, or the failure message.
TaskOutcome = Callable[[str, str, str], str | None]
# (node, image name, tag) -> True to keep the task Pulling (a pull that takes long).
Hold = Callable[[str, str, str], bool]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fake_digest(name: str, tag: str) -> str:
    return "sha256:" + hashlib.sha256(f"{name}:{tag}".encode()).hexdigest()


class AgentSim:
    def __init__(
        self,
        kube: Kube,
        nodes: Iterable[str] | None = None,
        *,
        pull_seconds: float = 0.5,
        outcome: TaskOutcome = lambda node, name, tag: None,
        hold: Hold = lambda node, name, tag: False,
        threads: int = 2,
    ) -> None:
        """Simulates the agents of `nodes` (None: every NodeImage)."""
        self.kube = kube
        self.nodes = set(nodes) if nodes is not None else None
        self.pull_seconds = pull_seconds
        self.outcome = outcome
        self.hold = hold
        self.threads = threads
        self.cache = Informer(kube, api.NODE_IMAGE.path(), name="agentsim", handlers=(self._on_event,))
        self.writes = 0
        self._cond = threading.Condition()
        self._dirty: set[str] = set()
        self._busy: set[str] = set()
        self._timers: list[tuple[float, str]] = []
        self._pulling_since: dict[tuple[str, str, str, int], float] = {}
        self._stop = False
        self._workers: list[threading.Thread] = []

    def _mine(self, node: str) -> bool:
        return self.nodes is None or node in self.nodes

    def _on_event(self, kind: str, obj: dict[str, Any]) -> None:
        node = obj["metadata"]["name"]
        if kind != "DELETED" and self._mine(node):
            self._mark(node)

    def _mark(self, node: str) -> None:
        with self._cond:
            self._dirty.add(node)
            self._cond.notify()

    def start(self) -> AgentSim:
        self.cache.start()
        for i in range(self.threads):
            thread = threading.Thread(target=self._work, name=f"agentsim-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._workers:
            thread.join(5)
        self.cache.stop(timeout=0.1)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    now = time.monotonic()
                    while self._timers and self._timers[0][0] <= now:
                        self._dirty.add(heapq.heappop(self._timers)[1])
                    ready = self._dirty - self._busy
                    if ready:
                        node = min(ready)
                        self._dirty.discard(node)
                        self._busy.add(node)
                        break
                    wait = self._timers[0][0] - now if self._timers else None
                    self._cond.wait(wait)
            try:
                self._step(node)
            except KubeError:
                self._mark(node)  # try again (a conflict, the API server busy)
                time.sleep(0.05)
            finally:
                with self._cond:
                    self._busy.discard(node)
                    if node in self._dirty:
                        self._cond.notify()

    def _step(self, node: str) -> None:
        obj = self.cache.get(node)
        if obj is None:
            return
        spec_images = (obj.get("spec") or {}).get("images") or {}
        status = obj.get("status") or {}
        old_images = status.get("imageStatuses") or {}
        now, stamp = time.monotonic(), _now()
        images: dict[str, Any] = {}
        for name, entry in spec_images.items():
            old_tags = {t["tag"]: t for t in (old_images.get(name) or {}).get("tags") or []}
            tags = []
            for task in (entry or {}).get("tags") or []:
                tag, version = task["tag"], int(task.get("version") or 0)
                current = old_tags.get(tag)
                key = (node, name, tag, version)
                if current is None or int(current.get("version") or 0) < version:
                    current = {"tag": tag, "phase": "Pulling", "progress": 0, "startTime": stamp,
                               "version": version}  # fmt: skip
                    self._pulling_since[key] = now
                    self._later(node, self.pull_seconds)
                elif current.get("phase") in ("Pulling", "Waiting"):
                    since = self._pulling_since.setdefault(key, now)
                    if self.hold(node, name, tag):
                        self._later(node, 1.0)
                    elif now - since >= self.pull_seconds:
                        failure = self.outcome(node, name, tag)
                        current = dict(current, completionTime=stamp, progress=100)
                        if failure is None:
                            current.update(phase="Succeeded", imageID=f"{name}@{fake_digest(name, tag)}")
                        else:
                            current.update(phase="Failed", message=failure)
                        self._pulling_since.pop(key, None)
                    else:
                        self._later(node, since + self.pull_seconds - now)
                tags.append(current)
            images[name] = {"tags": tags}
        phases = [t["phase"] for entry in images.values() for t in entry["tags"]]
        wanted: dict[str, Any] = {
            "desired": len(phases),
            "succeeded": phases.count("Succeeded"),
            "failed": phases.count("Failed"),
            "pulling": phases.count("Pulling"),
            "waiting": phases.count("Waiting"),
            "imageStatuses": images,
        }
        if all(status.get(k) == v for k, v in wanted.items()) or (not images and not old_images):
            return  # nothing changed, or a NodeImage without tasks that never had any
        patch_images: dict[str, Any] = {**images, **{n: None for n in old_images if n not in images}}
        patch = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "status": {**wanted, "imageStatuses": patch_images},
        }
        try:
            self.kube.patch(api.NODE_IMAGE.path(node, subresource="status"), patch)
            self.writes += 1
        except NotFound:
            return
        except Conflict:
            pass  # the watch brings the newer object, which marks the node again

    def _later(self, node: str, seconds: float) -> None:
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, seconds), node))
            self._cond.notify()
