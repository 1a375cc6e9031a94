"""ImagePullJob -> NodeImage tasks, and the job's status (docs/DESIGN.md "Control plane").

Level-triggered: each reconcile reads the caches, computes each target node's state, writes only
the task entries that must change (start nodes up to `parallelism`, release nodes no longer
targeted, bump versions for re-pulls), and writes the status when it changed.

Writes per node per job: one to add the task, one to remove it. An Always job's tasks stay on
the NodeImages while it runs (a new leader after a failover sees what already succeeded and
re-adds nothing); once the job has recorded its result (Complete or Failed, counters frozen in
its status) its tasks are removed, so NodeImages do not grow with finished jobs. A Never job
keeps its tasks and bumps their version about once per `--repull-period` (jitter +-10%).
Deleting a job removes its tasks from every NodeImage, also when the controller was down at
the time: the finalizer `imagewarm.io/nodeimage-tasks` holds the job until they are gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from controller import metrics
from controller.context import Context
from controller.jobstatus import (
    NodeState,
    classify,
    count,
    message,
    parse_time,
    plan,
    repull_due,
    rfc3339,
)
from controller.nodeimagewriter import NodeImageWriter
from controller.pullsecrets import PullSecrets, copy_name
from controller.targets import SIDECARSET_ANNOTATION, InvalidTargets, target_nodes
from controller.tasks import (
    ImageTarget,
    OwnerWants,
    find_tag,
    job_policy,
    owner_keys,
    owner_ref,
    owns,
    status_of,
    update_entry,
)
from imagewarm import api
from imagewarm.informer import key_of
from imagewarm.kube import NotFound
from imagewarm.reference import InvalidReference
from imagewarm.sidecarset import InvalidSidecarSet, SidecarSet

log = logging.getLogger("imagewarm.controller.jobs")

NAME = "imagepulljobs"
FINALIZER = "imagewarm.io/nodeimage-tasks"
# The job generation whose spec the tasks were last brought in line with (an edit bumps it).
GENERATION_ANNOTATION = "imagewarm.io/tasks-generation"
COALESCE_SECONDS = 0.25


def finished(status: dict[str, Any]) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _condition(type_: str, reason: str, text: str, at: str) -> api.Condition:
    return {"type": type_, "status": "True", "reason": reason, "message": text, "lastTransitionTime": at}


class JobReconciler:
    name = NAME

    def __init__(self, ctx: Context) -> None:
        self.kube = ctx.kube
        self.events = ctx.events
        self.release_namespace = ctx.config.release_namespace
        self.repull_period = ctx.config.repull_period
        self.jobs = ctx.caches["imagepulljobs"]
        self.nodes = ctx.caches["nodes"]
        self.pods = ctx.caches["pods"]
        self.node_images = ctx.caches["nodeimages"]
        self.sidecarsets = ctx.caches["sidecarsets"]
        self.namespaces = ctx.caches["namespaces"]
        self.writer = NodeImageWriter(ctx.kube, self.node_images)
        self.secrets = PullSecrets(ctx.kube, self.release_namespace)
        self.clock = time.time
        # Our last status write per job uid: (the job's resourceVersion before it, the status
        # written), used until the cache shows the write (so a reconcile in between does not
        # see an old status: a second JobStarted, a new startTime).
        self._statuses: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._last_targets: dict[str, frozenset[str]] = {}  # job uid -> its targets at the last reconcile
        # job uid -> (its image target, node -> (NodeImage resourceVersion, the node's state))
        self._memo: dict[str, tuple[ImageTarget | None, dict[str, tuple[str, NodeState]]]] = {}

    # Owners' wishes (for the merged pull policy and secrets of shared entries) ---------------------

    def lookup(self, ref: api.ObjectReference) -> OwnerWants | None:
        if ref.get("kind") != "ImagePullJob":
            return None
        job = self.jobs.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if job is None or job["metadata"].get("uid") != ref.get("uid"):
            return None
        spec = job.get("spec") or {}
        namespace = job["metadata"].get("namespace", "")
        secrets = tuple(
            (self.release_namespace, copy_name(namespace, s)) for s in spec.get("pullSecrets") or []
        )
        return OwnerWants(job_policy(spec), secrets)

    # The reconcile ---------------------------------------------------------------------------------

    def reconcile(self, key: str) -> float | None:
        namespace, _, name = key.partition("/")
        job = self.jobs.get(key)
        if job is None:  # deleted without our finalizer (or before we added it)
            if self.release_everywhere(namespace, name, None):
                self.collect_secrets()
            return None
        metadata = job["metadata"]
        uid = metadata["uid"]
        if metadata.get("deletionTimestamp"):
            self._last_targets.pop(uid, None)
            self._memo.pop(uid, None)
            self.release_everywhere(namespace, name, uid)
            self.collect_secrets(exclude=uid)
            self._remove_finalizer(job)
            return None
        status = self._status(job)
        if finished(status):
            self._last_targets.pop(uid, None)
            self._memo.pop(uid, None)
            self.release_everywhere(namespace, name, uid)
            return self._ttl(job, status)
        spec = job.get("spec") or {}
        try:
            target = ImageTarget.of(str(spec.get("image", "")))
            targets = self.targets(job)
        except (InvalidReference, InvalidTargets) as exc:
            return self._invalid(job, status, str(exc))
        job = self._ensure_metadata(job)
        now = self.clock()
        copies, missing = self.secrets.ensure(namespace, spec.get("pullSecrets") or [])
        del copies  # the lookup names them; ensure() made them exist
        owner = owner_ref(job)
        lookup = self.lookup
        states = self._classify_all(uid, target, targets)

        # Nodes no longer targeted (a selector edit, a pod gone) lose the job's task. The scan of
        # every NodeImage runs only when the targets may have shrunk since the last reconcile.
        current = frozenset(targets)
        if not current >= self._last_targets.get(uid, frozenset(["(unknown)"])):
            for node in self.owned_nodes(uid, target) - current:
                self.writer.update(
                    node,
                    target.name,
                    lambda e: update_entry(e, target.tag, lookup, remove_uids=frozenset([uid])),
                )
        self._last_targets[uid] = current
        # A spec edit reaches the existing tasks: policy and secrets recomputed; failed tasks
        # (or all, under imagePullPolicy Always) run again.
        if self._edited(job):
            for node, state in states.items():
                if state.phase == "Pending":
                    continue
                bump = state.phase == "Failed" or spec.get("imagePullPolicy") == "Always"
                self._refresh(node, target, bump)
                states[node] = classify(node, self.writer.get(node), target, uid)
            self._record_generation(job)
            self.collect_secrets()  # an edit may have dropped a pull secret

        never = (spec.get("completionPolicy") or {}).get("type") == "Never"
        limit = api.resolve_parallelism(spec.get("parallelism"), len(targets))
        due, next_repull = self._due_repulls(states.values(), uid, now) if never else ([], None)
        work = plan(states.values(), limit, due)
        for node in work.start:
            self._start(node, target, owner, spec, now)
            states[node] = classify(node, self.writer.get(node), target, uid)
        for node in work.repull:
            self._refresh(node, target, bump=True)
            states[node] = classify(node, self.writer.get(node), target, uid)

        return self._write_status(job, status, states, now, never=never, paused=limit == 0,
                                  missing_secrets=missing, next_repull=next_repull)  # fmt: skip

    def _classify_all(self, uid: str, target: ImageTarget, targets: list[str]) -> dict[str, NodeState]:
        """Each target's state; a node whose NodeImage did not change since the last reconcile
        keeps its state without being looked at again (thousands of nodes per reconcile)."""
        view = self.writer.snapshot()
        memo_target, memo = self._memo.get(uid, (None, {}))
        if memo_target != target:
            memo = {}
        states = {}
        for node in targets:
            obj = view.get(node)
            version = str((obj or {}).get("metadata", {}).get("resourceVersion") or "")
            hit = memo.get(node)
            if hit is not None and version and hit[0] == version:
                states[node] = hit[1]
            else:
                state = states[node] = classify(node, obj, target, uid)
                memo[node] = (version, state)
        self._memo[uid] = (target, {n: memo[n] for n in targets})
        return states

    def _start(
        self, node: str, target: ImageTarget, owner: api.ObjectReference, spec: dict[str, Any], now: float
    ) -> None:
        obj = self.writer.get(node)
        if obj is None:
            return  # the NodeImage is not there yet: its creation wakes the job again
        item = find_tag(((obj.get("spec") or {}).get("images") or {}).get(target.name), target.tag)
        reported = status_of(obj, target.name, target.tag)
        # Joining a task another job already ran: under imagePullPolicy Always the agent must
        # resolve the tag again, so the version goes up; IfNotPresent takes the result as is.
        bump = (
            spec.get("imagePullPolicy") == "Always"
            and item is not None
            and reported is not None
            and int(reported.get("version") or 0) >= int(item.get("version") or 0)
            and reported.get("phase") in ("Succeeded", "Failed")
        )
        self.writer.update(
            node,
            target.name,
            lambda e: update_entry(e, target.tag, self.lookup, add=owner, bump=bump, created_at=rfc3339(now)),
        )

    def _due_repulls(
        self, states: Iterable[NodeState], uid: str, now: float
    ) -> tuple[list[str], float | None]:
        due, soonest = [], None
        for state in states:
            when = repull_due(state, uid, self.repull_period)
            if when is None:
                continue
            if when <= now:
                due.append(state.node)
            else:
                soonest = when if soonest is None else min(soonest, when)
        return due, soonest

    # Targets and ownership -------------------------------------------------------------------------

    def targets(self, job: dict[str, Any]) -> list[str]:
        annotations = job["metadata"].get("annotations") or {}
        spec = job.get("spec") or {}
        sidecarset = None
        namespace_labels = None
        pods: list[dict[str, Any]] = []
        if annotations.get(SIDECARSET_ANNOTATION):
            obj = self.sidecarsets.get(annotations[SIDECARSET_ANNOTATION])
            if obj is not None:
                try:
                    sidecarset = SidecarSet.from_object(obj)
                except InvalidSidecarSet:
                    sidecarset = None
            namespace_labels = {
                n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in self.namespaces.items()
            }
            pods = self.pods.items()
        elif spec.get("podSelector") is not None:
            pods = self.pods.items()
        return target_nodes(
            job, self.nodes.items(), pods, sidecarset=sidecarset, namespace_labels=namespace_labels
        )

    def owned_nodes(self, uid: str, target: ImageTarget | None = None) -> set[str]:
        """NodeImages holding a task of job `uid` (for `target`, or any)."""
        nodes = set()
        for obj in self.node_images.items():
            name = obj["metadata"]["name"]
            view = self.writer.get(name)
            images = ((view or {}).get("spec") or {}).get("images") or {}
            entries = [images.get(target.name)] if target is not None else list(images.values())
            for entry in entries:
                if any(owns(item, uid) for item in (entry or {}).get("tags") or []):
                    nodes.add(name)
        return nodes

    def release_everywhere(self, namespace: str, name: str, uid: str | None) -> int:
        """Remove job `uid` (None: any job of that namespace and name no longer cached) from every
        NodeImage; returns how many entries were written."""
        written = 0
        for obj in self.node_images.items():
            node = obj["metadata"]["name"]
            view = self.writer.get(node) or obj
            for image, entry in (((view.get("spec") or {}).get("images")) or {}).items():
                for item in (entry or {}).get("tags") or []:
                    uids = frozenset(
                        r.get("uid", "")
                        for r in item.get("ownerReferences") or []
                        if r.get("kind") == "ImagePullJob"
                        and r.get("namespace") == namespace
                        and r.get("name") == name
                        and (uid is None or r.get("uid") == uid)
                    )
                    if uids:
                        self._remove(node, image, item["tag"], uids)
                        written += 1
        return written

    def _refresh(self, node: str, target: ImageTarget, bump: bool) -> None:
        """Recompute the entry's policy and secrets from its owners; `bump`: run it again."""
        self.writer.update(node, target.name, lambda e: update_entry(e, target.tag, self.lookup, bump=bump))

    def _remove(self, node: str, image: str, tag: str, uids: frozenset[str]) -> None:
        self.writer.update(node, image, lambda e: update_entry(e, tag, self.lookup, remove_uids=uids))

    # Metadata: finalizer and the generation the tasks follow ---------------------------------------

    def _ensure_metadata(self, job: dict[str, Any]) -> dict[str, Any]:
        metadata = job["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        annotations = metadata.get("annotations") or {}
        patch: dict[str, Any] = {}
        if FINALIZER not in finalizers:
            patch["finalizers"] = [*finalizers, FINALIZER]
        if GENERATION_ANNOTATION not in annotations:
            patch["annotations"] = {GENERATION_ANNOTATION: str(metadata.get("generation", 1))}
        if not patch:
            return job
        patch["resourceVersion"] = metadata["resourceVersion"]
        path = api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"])
        return self.kube.patch(path, {"metadata": patch})

    def _edited(self, job: dict[str, Any]) -> bool:
        metadata = job["metadata"]
        seen = (metadata.get("annotations") or {}).get(GENERATION_ANNOTATION)
        return seen is not None and seen != str(metadata.get("generation", 1))

    def _record_generation(self, job: dict[str, Any]) -> None:
        metadata = job["metadata"]
        path = api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"])
        self.kube.patch(
            path, {"metadata": {"annotations": {GENERATION_ANNOTATION: str(metadata.get("generation", 1))}}}
        )

    def _remove_finalizer(self, job: dict[str, Any]) -> None:
        metadata = job["metadata"]
        finalizers = list(metadata.get("finalizers") or [])
        if FINALIZER not in finalizers:
            return
        finalizers.remove(FINALIZER)
        path = api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"])
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": metadata["resourceVersion"]}}
        with contextlib.suppress(NotFound):  # deleted meanwhile: nothing holds it any more
            self.kube.patch(path, body)

    def collect_secrets(self, exclude: str | None = None) -> None:
        referenced = {
            (j["metadata"]["namespace"], s)
            for j in self.jobs.items()
            if j["metadata"].get("uid") != exclude and not j["metadata"].get("deletionTimestamp")
            for s in (j.get("spec") or {}).get("pullSecrets") or []
        }
        self.secrets.collect(referenced)

    # Status ------------------------------------------------------------------------------------------

    def _status(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's status as of our last write (the cache may not show it yet)."""
        uid = job["metadata"]["uid"]
        with self._lock:
            written = self._statuses.get(uid)
            if written is not None and written[0] == job["metadata"].get("resourceVersion"):
                return dict(written[1])
            self._statuses.pop(uid, None)
        return dict(job.get("status") or {})

    def _write_status(
        self,
        job: dict[str, Any],
        old: dict[str, Any],
        states: dict[str, NodeState],
        now: float,
        *,
        never: bool,
        paused: bool,
        missing_secrets: list[str],
        next_repull: float | None,
    ) -> float | None:
        spec = job.get("spec") or {}
        policy = spec.get("completionPolicy") or {}
        stamp = rfc3339(now)
        start = old.get("startTime") or stamp
        counts = count(states.values())
        deadline = policy.get("activeDeadlineSeconds")
        started_at = parse_time(start) or now
        exceeded = bool(not never and deadline and not counts.finished and now >= started_at + deadline)
        if exceeded:
            text = f"activeDeadlineSeconds ({deadline}s) passed before the pull finished on this node"
            states = {
                n: s if s.phase in ("Succeeded", "Failed") else NodeState(n, "Failed", text)
                for n, s in states.items()
            }
            counts = count(states.values())
        failures = {n: s.message for n, s in states.items() if s.phase == "Failed"}
        new: dict[str, Any] = {
            **old,
            "startTime": start,
            "desired": counts.desired,
            "active": counts.active,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "failedNodes": list(counts.failed_nodes),
            "message": message(counts, failures, paused=paused),
        }
        if missing_secrets:
            new["message"] += (
                f"; pull secret(s) {', '.join(missing_secrets)} not found in namespace "
                f"{job['metadata']['namespace']}: create them (pulls run without them meanwhile)"
            )
        done = not never and (counts.finished or exceeded)
        if done:
            new["completionTime"] = stamp
            if exceeded:
                condition = _condition("Failed", "DeadlineExceeded", new["message"], stamp)
            elif counts.failed:
                condition = _condition("Failed", "NodesFailed", new["message"], stamp)
            else:
                condition = _condition("Complete", "AllNodesSucceeded", new["message"], stamp)
            new["conditions"] = [
                *(c for c in old.get("conditions") or [] if c.get("type") not in ("Complete", "Failed")),
                condition,
            ]
        self._events(job, old, new, failures, done)
        if new != old:
            metadata = job["metadata"]
            path = api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"], "status")
            before = metadata.get("resourceVersion", "")
            self.kube.patch(path, {"status": new})
            with self._lock:
                self._statuses[metadata["uid"]] = (before, new)
        if done:
            return 0.5  # release the finished job's tasks (and start its TTL)
        waits = []
        if deadline and not never:
            waits.append(started_at + deadline - now)
        if next_repull is not None:
            waits.append(next_repull - now)
        return max(0.5, min(waits)) if waits else None

    def _events(
        self,
        job: dict[str, Any],
        old: dict[str, Any],
        new: dict[str, Any],
        failures: dict[str, str],
        done: bool,
    ) -> None:
        if not old.get("startTime"):
            self.events.normal(
                job, "JobStarted", f"pulling {job['spec']['image']} on {new['desired']} node(s)"
            )
        for node in sorted(set(new["failedNodes"]) - set(old.get("failedNodes") or [])):
            self.events.warning(job, "NodeFailed", f"{node}: {failures.get(node, 'failed')}")
        if done:
            reason = "JobCompleted" if new["conditions"][-1]["type"] == "Complete" else "JobFailed"
            emit = self.events.normal if reason == "JobCompleted" else self.events.warning
            emit(job, reason, new["message"])

    def _invalid(self, job: dict[str, Any], status: dict[str, Any], problem: str) -> float | None:
        text = f"invalid spec: {problem}; fix the spec and the job resumes"
        if status.get("message") != text:
            self.events.warning(job, "InvalidSpec", text)
            metadata = job["metadata"]
            path = api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"], "status")
            self.kube.patch(path, {"status": {"message": text}})
            with self._lock:
                self._statuses[metadata["uid"]] = (
                    metadata.get("resourceVersion", ""),
                    {**status, "message": text},
                )
        return None

    def _ttl(self, job: dict[str, Any], status: dict[str, Any]) -> float | None:
        ttl = ((job.get("spec") or {}).get("completionPolicy") or {}).get("ttlSecondsAfterFinished")
        completed = parse_time(status.get("completionTime", ""))
        if ttl is None or completed is None:
            return None
        remaining = completed + int(ttl) - self.clock()
        if remaining > 0:
            return remaining
        metadata = job["metadata"]
        try:
            self.kube.delete(api.IMAGE_PULL_JOB.path(metadata["name"], metadata["namespace"]))
            log.info("finished job deleted after its TTL", extra={"job": key_of(job)})
        except NotFound:
            pass
        return None


def task_phases(node_images: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Tasks on all NodeImages by phase (Pending: no status for the current version yet)."""
    phases = {"Pending": 0, "Waiting": 0, "Pulling": 0, "Succeeded": 0, "Failed": 0}
    for obj in node_images:
        for name, entry in ((obj.get("spec") or {}).get("images") or {}).items():
            for item in (entry or {}).get("tags") or []:
                reported = status_of(obj, name, item["tag"])
                if reported is None or int(reported.get("version") or 0) < int(item.get("version") or 0):
                    phases["Pending"] += 1
                else:
                    phase = str(reported.get("phase"))
                    phases[phase] = phases.get(phase, 0) + 1
    return phases


def _unfinished_jobs(jobs: Iterable[dict[str, Any]]) -> list[str]:
    return [key_of(j) for j in jobs if not finished(j.get("status") or {})]


def create(ctx: Context) -> JobReconciler:
    reconciler = JobReconciler(ctx)
    runner = ctx.runner
    jobs = ctx.caches["imagepulljobs"]

    def all_unfinished() -> None:
        for key in _unfinished_jobs(jobs.items()):
            runner.enqueue(NAME, key, COALESCE_SECONDS)

    ctx.watch("imagepulljobs", NAME)
    seen_node_images: set[str] = set()

    def on_node_image(kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        for key in owner_keys(obj):
            runner.enqueue(NAME, key, COALESCE_SECONDS)
        if kind == "DELETED":
            seen_node_images.discard(name)
        elif name not in seen_node_images:
            seen_node_images.add(name)
            all_unfinished()  # a new node: jobs targeting it can start there

    ctx.caches["nodeimages"].add_handler(on_node_image)
    node_labels: dict[str, Any] = {}

    def on_node(kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        labels = None if kind == "DELETED" else (obj["metadata"].get("labels") or {})
        if node_labels.get(name, "unseen") != labels:
            node_labels[name] = labels
            all_unfinished()

    ctx.caches["nodes"].add_handler(on_node)
    pod_signatures: dict[str, Any] = {}

    def on_pod(kind: str, obj: dict[str, Any]) -> None:
        metadata = obj["metadata"]
        signature = None
        if kind != "DELETED" and not metadata.get("deletionTimestamp"):
            phase = (obj.get("status") or {}).get("phase")
            signature = (
                obj["spec"].get("nodeName"),
                phase in ("Succeeded", "Failed"),
                metadata.get("labels"),
            )
        uid = metadata.get("uid", key_of(obj))
        if pod_signatures.get(uid, "unseen") == signature:
            return
        if signature is None:
            pod_signatures.pop(uid, None)
        else:
            pod_signatures[uid] = signature
        for job in jobs.items():
            spec = job.get("spec") or {}
            annotations = job["metadata"].get("annotations") or {}
            if finished(job.get("status") or {}):
                continue
            if annotations.get(SIDECARSET_ANNOTATION) or (
                spec.get("podSelector") is not None
                and job["metadata"]["namespace"] == metadata.get("namespace")
            ):
                runner.enqueue(NAME, key_of(job), COALESCE_SECONDS)

    ctx.caches["pods"].add_handler(on_pod)

    def on_sidecarset(kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        for job in jobs.items():
            if (job["metadata"].get("annotations") or {}).get(SIDECARSET_ANNOTATION) == name:
                runner.enqueue(NAME, key_of(job), COALESCE_SECONDS)

    ctx.caches["sidecarsets"].add_handler(on_sidecarset)
    ctx.resync_all(NAME, "imagepulljobs")
    for phase in ("Pending", "Waiting", "Pulling", "Succeeded", "Failed"):
        metrics.TASKS.labels(phase).set_function(
            lambda p=phase: task_phases(ctx.caches["nodeimages"].items()).get(p, 0)  # type: ignore[misc]
        )
    return reconciler
