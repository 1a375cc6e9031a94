"""The node agent's pure logic over its NodeImage (docs/DESIGN.md, "Control plane"): the tasks the
spec asks for, which of them to run, the retry and deadline arithmetic of one task, and the status
document the agent writes. No I/O here: every function takes the time it needs as an argument.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from imagewarm.reference import Reference, parse

Key = tuple[str, str]  # (spec.images key, tag) identifies a task on a node

WAITING, PULLING, SUCCEEDED, FAILED = "Waiting", "Pulling", "Succeeded", "Failed"
FINISHED = (SUCCEEDED, FAILED)
# The CRD's defaults (OpenKruise's), for entries written without them.
DEFAULT_TIMEOUT_SECONDS = 600
DEFAULT_BACKOFF_LIMIT = 3
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 60.0


@dataclass(frozen=True)
class PullPolicy:
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class Task:
    """One tag entry of `spec.images[name].tags[]`."""

    name: str
    tag: str
    version: int
    policy: PullPolicy
    pull_secrets: tuple[SecretRef, ...]
    owned: bool  # has ownerReferences (a controller's task) or not (written directly by a user)
    created_at: str = ""

    @property
    def key(self) -> Key:
        return (self.name, self.tag)

    @property
    def image(self) -> str:
        """`<name>:<tag>`, or `<name>@<tag>` when the tag is a digest (`sha256:...`)."""
        return f"{self.name}@{self.tag}" if ":" in self.tag else f"{self.name}:{self.tag}"

    def reference(self) -> Reference:
        """The canonical reference (`ubuntu:22.04` -> `docker.io/library/ubuntu:22.04`).
        Raises InvalidReference (a ValueError) naming the bad part."""
        return parse(self.image)

    @property
    def pin_owner(self) -> str:
        return f"nodeimage/{self.name}:{self.tag}"


@dataclass(frozen=True)
class TagState:
    """What the agent reports for one task (`status.imageStatuses[name].tags[]`)."""

    phase: str = WAITING
    version: int = 0
    progress: int = 0
    start_time: str = ""
    completion_time: str = ""
    image_id: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def tasks_of(nodeimage: Mapping[str, Any]) -> dict[Key, Task]:
    """The tasks of a NodeImage's spec, by key. Entries that are not objects are ignored (the CRD's
    schema already refuses them)."""
    tasks: dict[Key, Task] = {}
    images = (nodeimage.get("spec") or {}).get("images") or {}
    for name, entry in images.items():
        if not isinstance(entry, Mapping):
            continue
        secrets = tuple(
            SecretRef(str(ref.get("namespace") or ""), str(ref["name"]))
            for ref in entry.get("pullSecrets") or []
            if isinstance(ref, Mapping) and ref.get("name")
        )
        for tag in entry.get("tags") or []:
            if not isinstance(tag, Mapping) or not tag.get("tag"):
                continue
            raw = tag.get("pullPolicy") or {}
            policy = PullPolicy(
                timeout_seconds=_int(raw.get("timeoutSeconds"), DEFAULT_TIMEOUT_SECONDS)
                or DEFAULT_TIMEOUT_SECONDS,
                backoff_limit=max(0, _int(raw.get("backoffLimit"), DEFAULT_BACKOFF_LIMIT) or 0),
                active_deadline_seconds=_int(raw.get("activeDeadlineSeconds"), None),
                ttl_seconds_after_finished=_int(raw.get("ttlSecondsAfterFinished"), None),
            )
            task = Task(
                name=str(name),
                tag=str(tag["tag"]),
                version=_int(tag.get("version"), 0) or 0,
                policy=policy,
                pull_secrets=secrets,
                owned=bool(tag.get("ownerReferences")),
                created_at=str(tag.get("createdAt") or ""),
            )
            tasks[task.key] = task
    return tasks


def states_of(nodeimage: Mapping[str, Any]) -> dict[Key, TagState]:
    """The reported states of a NodeImage's status, by key (what a restarted agent resumes from)."""
    states: dict[Key, TagState] = {}
    images = (nodeimage.get("status") or {}).get("imageStatuses") or {}
    for name, entry in images.items():
        for tag in (entry or {}).get("tags") or []:
            if not isinstance(tag, Mapping) or not tag.get("tag") or tag.get("phase") not in (
                WAITING, PULLING, SUCCEEDED, FAILED,
            ):  # fmt: skip
                continue
            states[(str(name), str(tag["tag"]))] = TagState(
                phase=str(tag["phase"]),
                version=_int(tag.get("version"), 0) or 0,
                progress=_int(tag.get("progress"), 0) or 0,
                start_time=str(tag.get("startTime") or ""),
                completion_time=str(tag.get("completionTime") or ""),
                image_id=str(tag.get("imageID") or ""),
                message=str(tag.get("message") or ""),
            )
    return states


def is_done(task: Task, state: TagState | None) -> bool:
    """Whether the task's current version has finished (Succeeded or Failed): nothing to run."""
    return state is not None and state.finished and state.version >= task.version


def to_start(
    tasks: Mapping[Key, Task], states: Mapping[Key, TagState], running: Iterable[Key], slots: int
) -> list[Task]:
    """The tasks to start now: not done, not running, at most `slots` of them, oldest first
    (`createdAt`, then name and tag). A task reported Pulling by an earlier run of the agent is not
    done: it is resumed (its verified blobs are cached)."""
    busy = set(running)
    pending = [task for key, task in tasks.items() if key not in busy and not is_done(task, states.get(key))]
    pending.sort(key=lambda task: (task.created_at, task.name, task.tag))
    return pending[: max(0, slots)]


def to_cancel(tasks: Mapping[Key, Task], running: Mapping[Key, int]) -> list[Key]:
    """Running tasks (key -> version being run) to stop: gone from the spec, or re-versioned (the
    controller asks for a new pull; it starts once the old one stopped)."""
    return [key for key, version in running.items() if key not in tasks or tasks[key].version != version]


# Retries and deadlines -------------------------------------------------------------------------


def backoff_delay(retry: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS) -> float:
    """Seconds to wait before retry number `retry` (0 for the first): base, doubling, capped."""
    return float(min(cap, base * 2.0 ** max(0, retry)))


def attempt_limit(policy: PullPolicy, started: float, now: float) -> float:
    """Seconds the next attempt may take: its `timeoutSeconds`, cut to what is left of the task's
    `activeDeadlineSeconds` (counted from `started`, the task's start). 0 or less: out of time."""
    limit = float(policy.timeout_seconds)
    if policy.active_deadline_seconds is not None:
        limit = min(limit, started + policy.active_deadline_seconds - now)
    return limit


def ttl_expired(task: Task, state: TagState | None, now: datetime.datetime) -> bool:
    """Whether a finished task written directly (no ownerReferences) has outlived its
    `ttlSecondsAfterFinished`: the agent then removes it from the spec. Owned tasks are their
    controller's to remove."""
    ttl = task.policy.ttl_seconds_after_finished
    if ttl is None or task.owned or not is_done(task, state) or state is None:
        return False
    finished_at = parse_time(state.completion_time)
    return finished_at is not None and (now - finished_at).total_seconds() >= ttl


# Status ------------------------------------------------------------------------------------------


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


def percent(done: int, total: int) -> int:
    """Whole percent of bytes, 100 only when all are there."""
    if total <= 0:
        return 0
    return min(99, done * 100 // total) if done < total else 100


def _tag_status(tag: str, state: TagState) -> dict[str, Any]:
    out: dict[str, Any] = {"tag": tag, "phase": state.phase, "version": state.version}
    out["progress"] = state.progress
    for field, value in (
        ("startTime", state.start_time),
        ("completionTime", state.completion_time),
        ("imageID", state.image_id),
        ("message", state.message),
    ):
        if value:
            out[field] = value
    return out


def effective(task: Task, state: TagState | None) -> TagState:
    """The state to report for `task`: a state of an older version counts as Waiting for the new one."""
    if state is None or state.version < task.version:
        return TagState(version=task.version)
    return state


def status_document(
    tasks: Mapping[Key, Task],
    states: Mapping[Key, TagState],
    previous: Mapping[str, Any],
    now: datetime.datetime,
) -> dict[str, Any]:
    """The whole `status` to write for `tasks` in `states`, given the `previous` status on the
    server: counters over the spec's tasks, one entry per task (statuses of tasks gone from the spec
    are dropped: image names no longer there are set to null, as a merge patch removes them), and
    `firstSyncStatus`, set once, when every task first finished, and kept after."""
    images: dict[str, Any] = {}
    counts = {WAITING: 0, PULLING: 0, SUCCEEDED: 0, FAILED: 0}
    for key in sorted(tasks):
        state = effective(tasks[key], states.get(key))
        counts[state.phase] += 1
        images.setdefault(key[0], {"tags": []})["tags"].append(_tag_status(key[1], state))
    for gone in (previous.get("imageStatuses") or {}).keys() - images.keys():
        images[gone] = None
    status: dict[str, Any] = {
        "desired": len(tasks),
        "succeeded": counts[SUCCEEDED],
        "failed": counts[FAILED],
        "pulling": counts[PULLING],
        "waiting": counts[WAITING],
        "imageStatuses": images,
    }
    first = previous.get("firstSyncStatus")
    if first:
        status["firstSyncStatus"] = first
    elif tasks and counts[SUCCEEDED] + counts[FAILED] == len(tasks):
        failed = counts[FAILED]
        summary = f"{failed} of {len(tasks)} pull tasks failed" if failed else "all pull tasks succeeded"
        status["firstSyncStatus"] = {
            "syncAt": format_time(now),
            "status": "Failed" if failed else "Succeeded",
            "message": summary,
        }
    return status


def started(state: TagState, version: int, now: datetime.datetime) -> TagState:
    """The state of a task (re)starting: Pulling; a resumed pull of the same version keeps its
    startTime (its deadline runs from there) and progress."""
    if state.phase == PULLING and state.version == version and state.start_time:
        return replace(state, message="")
    return TagState(phase=PULLING, version=version, start_time=format_time(now))
