"""An ImagePullJob's progress (pure): each target node's state, which nodes to start next under
`parallelism`, and the status counters and message.

A node's state for a job, from its NodeImage:
- Pending: the job has no task there (not started yet, or released);
- Active: the task is there and the agent has not reported on its current version (a status
  whose version is below the spec's is stale: the node is still pulling), or reports Waiting or
  Pulling;
- Succeeded / Failed: the agent's result for the current version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from controller.tasks import ImageTarget, entry_of, find_tag, owns, status_of

Phase = Literal["Pending", "Active", "Succeeded", "Failed"]
FAILED_NODES_IN_MESSAGE = 3


@dataclass(frozen=True)
class NodeState:
    node: str
    phase: Phase
    message: str = ""
    completion_time: str = ""  # when the agent finished the current version


def classify(node: str, node_image: dict[str, Any] | None, target: ImageTarget, uid: str) -> NodeState:
    item = find_tag(entry_of(node_image, target.name), target.tag)
    if not owns(item, uid):
        return NodeState(node, "Pending")
    assert item is not None
    status = status_of(node_image, target.name, target.tag)
    if status is None or int(status.get("version") or 0) < int(item.get("version") or 0):
        return NodeState(node, "Active")
    phase = status.get("phase")
    if phase == "Succeeded":
        return NodeState(node, "Succeeded", completion_time=status.get("completionTime", ""))
    if phase == "Failed":
        return NodeState(
            node, "Failed", status.get("message") or "the pull failed", status.get("completionTime", "")
        )
    return NodeState(node, "Active")


def parse_time(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, None for an empty or bad one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None
    except ValueError:
        return None


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def jitter(uid: str, node: str, spread: float = 0.1) -> float:
    """A factor in [1 - spread, 1 + spread], fixed per (job, node): re-pulls spread out over time
    and survive controller restarts unchanged."""
    digest = hashlib.sha256(f"{uid}/{node}".encode()).digest()
    return 1 - spread + 2 * spread * int.from_bytes(digest[:4], "big") / 0xFFFFFFFF


def repull_due(state: NodeState, uid: str, period: float) -> float | None:
    """When a finished node of a Never job pulls again (epoch seconds), None if not finished."""
    if state.phase not in ("Succeeded", "Failed"):
        return None
    finished = parse_time(state.completion_time)
    if finished is None:
        return None
    return finished + period * jitter(uid, state.node)


@dataclass(frozen=True)
class Plan:
    start: tuple[str, ...]  # nodes to add the job's task to
    repull: tuple[str, ...]  # nodes whose task version is bumped (a Never job's re-pull)


def plan(states: Iterable[NodeState], limit: int, due: Iterable[str] = ()) -> Plan:
    """Start pending nodes (sorted by name) and then due re-pulls, so that no more than `limit`
    nodes are active for the job at once (`limit` 0 starts nothing: paused)."""
    states = list(states)
    active = sum(1 for s in states if s.phase == "Active")
    slots = max(0, limit - active)
    pending = sorted(s.node for s in states if s.phase == "Pending")
    start = pending[:slots]
    repull = sorted(due)[: max(0, slots - len(start))]
    return Plan(tuple(start), tuple(repull))


@dataclass(frozen=True)
class Counts:
    desired: int
    active: int
    succeeded: int
    failed: int
    pending: int
    failed_nodes: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return self.active == 0 and self.pending == 0


def count(states: Iterable[NodeState]) -> Counts:
    states = list(states)
    by: dict[str, list[NodeState]] = {"Pending": [], "Active": [], "Succeeded": [], "Failed": []}
    for s in states:
        by[s.phase].append(s)
    return Counts(
        desired=len(states),
        active=len(by["Active"]),
        succeeded=len(by["Succeeded"]),
        failed=len(by["Failed"]),
        pending=len(by["Pending"]),
        failed_nodes=tuple(sorted(s.node for s in by["Failed"])),
    )


def message(counts: Counts, failures: Mapping[str, str], *, paused: bool) -> str:
    """E.g. "3/5 nodes succeeded, 1 failed (iw-node-2: <agent message>), 1 pulling"."""
    if counts.desired == 0:
        return "no node matches the job's selector"
    parts = [f"{counts.succeeded}/{counts.desired} nodes succeeded"]
    if counts.failed:
        shown = [f"{n}: {failures.get(n, 'failed')}" for n in counts.failed_nodes[:FAILED_NODES_IN_MESSAGE]]
        more = counts.failed - len(shown)
        parts.append(f"{counts.failed} failed ({'; '.join(shown)}{f'; and {more} more' if more else ''})")
    if counts.active:
        parts.append(f"{counts.active} pulling")
    if counts.pending:
        parts.append(f"{counts.pending} waiting" + (" (paused: parallelism is 0)" if paused else ""))
    return ", ".join(parts)
