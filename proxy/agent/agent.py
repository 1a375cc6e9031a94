"""The node agent: one per node, in its own process started by the proxy's gunicorn master
(`imagewarm proxy --node-name N`, see proxy.agent.process).

It watches only its own NodeImage (an informer with `fieldSelector=metadata.name=N`) and keeps it
level-triggered: on every change, and once a second, it compares the spec's tasks with what runs
and what was reported, starts tasks up to `--agent-parallel-pulls`, cancels those that left the
spec or got a new version, unpins what left the spec, removes direct tasks past their
`ttlSecondsAfterFinished`, and hands the status to the reporter (coalesced writes).
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagewarm import platforms
from imagewarm.informer import Informer
from imagewarm.kube import Conflict, Kube, KubeError
from imagewarm.platforms import Platform
from proxy import metrics
from proxy.agent import nodeimage
from proxy.agent.nodeimage import Key, TagState, Task
from proxy.agent.pins import Pins
from proxy.agent.reporter import Reporter, Schedule
from proxy.agent.runner import Context, TaskRun
from proxy.cache.store import BlobStore

log = logging.getLogger("imagewarm.proxy.agent")

NODEIMAGES = "/apis/imagewarm.io/v1alpha1/nodeimages"
TICK_SECONDS = 1.0


@dataclass(frozen=True)
class Settings:
    node: str
    proxy_url: str
    parallel_pulls: int = 2
    progress_interval: float = 10.0
    status_delay: float = 1.0


def node_platform(kube: Kube, node: str) -> Platform:
    """The node's os/arch from its Node's `status.nodeInfo` (what the kubelet reports), else this
    machine's (a Node object without a kubelet has none)."""
    try:
        info = (kube.get(f"/api/v1/nodes/{node}").get("status") or {}).get("nodeInfo") or {}
    except KubeError:
        info = {}
    if info.get("operatingSystem") and info.get("architecture"):
        return Platform(str(info["operatingSystem"]).lower(), str(info["architecture"]).lower())
    return platforms.this_platform()


class Agent:
    def __init__(self, kube: Kube, store: BlobStore, cache_dir: Path, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self.pins = Pins(store, cache_dir / "agent" / "pins")
        self.informer = Informer(
            kube,
            NODEIMAGES,
            name=f"nodeimage {settings.node}",
            field_selector=f"metadata.name={settings.node}",
            handlers=(lambda _kind, _obj: self._wake.set(),),
        )
        self.reporter = Reporter(
            self._status,
            self._write_status,
            Schedule(status_delay=settings.status_delay, progress_interval=settings.progress_interval),
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._states: dict[Key, TagState] = {}
        self._tasks: dict[Key, Task] = {}
        self._runs: dict[Key, TaskRun] = {}
        self._seeded = False
        self._first_sync: dict[str, Any] | None = None
        self._reported_images: set[str] = set()
        self._context: Context | None = None

    # Lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Agent:
        threading.Thread(target=self._main, name="agent", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.reporter.stop()
        self.informer.stop(timeout=1)
        with self._lock:
            for run in self._runs.values():
                run.cancel()

    def _main(self) -> None:
        platform = node_platform(self.kube, self.settings.node)
        self._context = Context(self.kube, self.settings.proxy_url, platform, self.pins, self.settings.node)
        log.info(
            "node agent started",
            extra={
                "node": self.settings.node,
                "platform": str(platform),
                "parallel_pulls": self.settings.parallel_pulls,
            },
        )
        self.informer.start()
        threading.Thread(target=self.reporter.run, name="agent-reporter", daemon=True).start()
        while not self._stop.is_set():
            if self.informer.synced:
                try:
                    self.reconcile()
                except Exception:
                    log.exception("node agent reconcile failed; retrying", extra={"node": self.settings.node})
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    # Reconcile -----------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """One level-triggered pass over the NodeImage as the informer has it."""
        obj = self.informer.get(self.settings.node)
        tasks = nodeimage.tasks_of(obj) if obj else {}
        assert self._context is not None
        changed = False
        with self._lock:
            if obj is not None and not self._seeded:
                # A restarted agent resumes from what it reported: finished tasks stay finished,
                # Pulling ones run again (their verified blobs are cached).
                self._states = nodeimage.states_of(obj)
                self._first_sync = (obj.get("status") or {}).get("firstSyncStatus")
                self._reported_images = set((obj.get("status") or {}).get("imageStatuses") or {})
                self._seeded = True
                changed = True
            if tasks != self._tasks:
                changed = True
            self._tasks = tasks
            running = {key: run.task.version for key, run in self._runs.items()}
            for key in nodeimage.to_cancel(tasks, running):
                self._runs[key].cancel()
                log.info("pull task cancelled", extra={"node": self.settings.node, "task": "/".join(key)})
            for key in list(self._states):
                if key not in tasks:
                    del self._states[key]
            slots = self.settings.parallel_pulls - len(self._runs)
            for task in nodeimage.to_start(tasks, self._states, self._runs, slots):
                state = nodeimage.started(
                    nodeimage.effective(task, self._states.get(task.key)), task.version, _now()
                )
                self._states[task.key] = state
                run = TaskRun(task, state, self._context, self._update)
                self._runs[task.key] = run
                thread = threading.Thread(target=self._run, args=(run,), name=f"pull {task.image}")
                thread.daemon = True
                thread.start()
                log.info(
                    "pull task started",
                    extra={"node": self.settings.node, "image": task.image, "version": task.version},
                )
                changed = True
            expired = [k for k, t in tasks.items() if nodeimage.ttl_expired(t, self._states.get(k), _now())]
        if obj is not None:  # no NodeImage (yet): keep the pins
            self._unpin_gone(tasks)
        if expired and obj is not None:
            self._remove_expired(obj, expired)
        if changed:
            self.reporter.changed(urgent=True)

    def _run(self, run: TaskRun) -> None:
        try:
            run.run()
        finally:
            with self._lock:
                if self._runs.get(run.task.key) is run:
                    del self._runs[run.task.key]
            self._wake.set()

    def _update(self, key: Key, state: TagState, urgent: bool) -> None:
        with self._lock:
            if key not in self._tasks:
                return
            self._states[key] = state
        self.reporter.changed(urgent=urgent)

    def _unpin_gone(self, tasks: dict[Key, Task]) -> None:
        wanted = {task.pin_owner for task in tasks.values()}
        for owner in self.pins.owners() - wanted:
            count = self.pins.unpin(owner)
            log.info("unpinned a task that left the spec", extra={"owner": owner, "blobs": count})

    def _remove_expired(self, obj: dict[str, Any], expired: list[Key]) -> None:
        """Remove finished direct tasks past their TTL: one merge patch of the affected image entries,
        carrying the resourceVersion read (a conflict waits for the next pass)."""
        images = (obj.get("spec") or {}).get("images") or {}
        patch: dict[str, Any] = {}
        for name in {name for name, _ in expired}:
            gone = {tag for n, tag in expired if n == name}
            kept = [t for t in images[name].get("tags") or [] if t.get("tag") not in gone]
            patch[name] = {"tags": kept} if kept else None
        version = obj["metadata"]["resourceVersion"]
        body = {"metadata": {"resourceVersion": version}, "spec": {"images": patch}}
        try:
            self.kube.patch(f"{NODEIMAGES}/{self.settings.node}", body, kind="merge")
        except Conflict:
            return
        except KubeError as exc:
            log.warning("could not remove expired pull tasks", extra={"error": str(exc)})
            return
        log.info(
            "removed finished pull tasks past their ttlSecondsAfterFinished",
            extra={"node": self.settings.node, "tasks": ["/".join(key) for key in expired]},
        )

    # Status --------------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._seeded:
                return None
            if not self._tasks and not self._reported_images and not self._first_sync:
                # Nothing to report on a NodeImage that never had a task: no write at all (an agent
                # rollout over 5,000 idle nodes is then 0 writes, not 5,000).
                return None
            previous: dict[str, Any] = {"imageStatuses": {key: {} for key in self._reported_images}}
            if self._first_sync:
                previous["firstSyncStatus"] = self._first_sync
            status = nodeimage.status_document(self._tasks, self._states, previous, _now())
            self._first_sync = status.get("firstSyncStatus")
        for phase in ("waiting", "pulling", "succeeded", "failed"):
            metrics.AGENT_TASKS.labels(phase=phase.capitalize()).set(status[phase])
        return status

    def _write_status(self, status: dict[str, Any]) -> None:
        self.kube.patch(f"{NODEIMAGES}/{self.settings.node}/status", {"status": status}, kind="merge")
        with self._lock:
            self._reported_images = {name for name, entry in status["imageStatuses"].items() if entry}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
