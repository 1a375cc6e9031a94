"""The node agent's pure logic: tasks from a NodeImage spec, which to run, retry and deadline
arithmetic, TTL of direct tasks, and the status document (the API server's side: tests/e2e)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from proxy.agent import nodeimage
from proxy.agent.nodeimage import (
    FAILED,
    PULLING,
    SUCCEEDED,
    WAITING,
    PullPolicy,
    SecretRef,
    TagState,
    Task,
)

NOW = datetime.datetime(2026, 12, 3, 12, 0, 0, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "ab" * 32


def node_image(images: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "n1", "resourceVersion": "7"}, "spec": {"images": images}}
    if status is not None:
        obj["status"] = status
    return obj


def task(name: str = "nginx", tag: str = "1.27", version: int = 0, **policy: Any) -> Task:
    return Task(name, tag, version, PullPolicy(**policy), (), owned=False)


def test_tasks_read_every_field_and_apply_the_crd_defaults() -> None:
    obj = node_image(
        {
            "ubuntu": {
                "pullSecrets": [{"namespace": "imagewarm-system", "name": "imagewarm-pull-1"}],
                "tags": [
                    {"tag": "22.04", "version": 2, "createdAt": "2026-01-01T00:00:00Z",
                     "pullPolicy": {"timeoutSeconds": 30, "backoffLimit": 1, "activeDeadlineSeconds": 90,
                                    "ttlSecondsAfterFinished": 300},
                     "ownerReferences": [{"kind": "ImagePullJob", "name": "j", "uid": "u"}]},
                    {"tag": DIGEST},
                ],
            },
            "broken": "not an entry",
        }
    )  # fmt: skip
    tasks = nodeimage.tasks_of(obj)
    assert set(tasks) == {("ubuntu", "22.04"), ("ubuntu", DIGEST)}
    first = tasks[("ubuntu", "22.04")]
    assert first.policy == PullPolicy(30, 1, 90, 300)
    assert first.version == 2 and first.owned and first.created_at == "2026-01-01T00:00:00Z"
    assert first.pull_secrets == (SecretRef("imagewarm-system", "imagewarm-pull-1"),)
    assert first.image == "ubuntu:22.04" and str(first.reference()) == "docker.io/library/ubuntu:22.04"
    assert first.pin_owner == "nodeimage/ubuntu:22.04"
    second = tasks[("ubuntu", DIGEST)]
    assert second.policy == PullPolicy(600, 3, None, None) and second.version == 0 and not second.owned
    assert second.image == f"ubuntu@{DIGEST}" and second.reference().digest == DIGEST


def test_states_are_read_back_from_the_status() -> None:
    obj = node_image(
        {},
        {"imageStatuses": {"nginx": {"tags": [
            {"tag": "1", "phase": "Pulling", "progress": 40, "startTime": "2026-12-03T11:00:00Z",
             "version": 1},
            {"tag": "2", "phase": "Bogus"},
        ]}}},
    )  # fmt: skip
    assert nodeimage.states_of(obj) == {
        ("nginx", "1"): TagState(PULLING, 1, 40, "2026-12-03T11:00:00Z"),
    }


def test_what_to_start_skips_finished_and_running_tasks_and_respects_the_slots() -> None:
    tasks = {t.key: t for t in [task(tag="a"), task(tag="b", version=1), task(tag="c"), task(tag="d")]}
    states = {
        ("nginx", "a"): TagState(SUCCEEDED, 0),  # done
        ("nginx", "b"): TagState(SUCCEEDED, 0),  # done for version 0, the spec wants 1: again
        ("nginx", "c"): TagState(PULLING, 0, start_time="2026-12-03T11:00:00Z"),  # an earlier run's: resume
    }
    assert [t.tag for t in nodeimage.to_start(tasks, states, [], 5)] == ["b", "c", "d"]
    assert [t.tag for t in nodeimage.to_start(tasks, states, [("nginx", "c")], 1)] == ["b"]
    assert nodeimage.to_start(tasks, states, [], 0) == []


def test_oldest_tasks_start_first() -> None:
    old = Task("z", "1", 0, PullPolicy(), (), False, created_at="2026-01-01T00:00:00Z")
    new = Task("a", "1", 0, PullPolicy(), (), False, created_at="2026-06-01T00:00:00Z")
    assert nodeimage.to_start({old.key: old, new.key: new}, {}, [], 1) == [old]


def test_running_tasks_are_cancelled_when_removed_or_re_versioned() -> None:
    tasks = {t.key: t for t in [task(tag="kept"), task(tag="bumped", version=3)]}
    running = {("nginx", "kept"): 0, ("nginx", "bumped"): 2, ("nginx", "gone"): 0}
    assert sorted(nodeimage.to_cancel(tasks, running)) == [("nginx", "bumped"), ("nginx", "gone")]


def test_backoff_doubles_from_one_second_and_is_capped() -> None:
    assert [nodeimage.backoff_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize(
    "policy, started, now, limit",
    [
        (PullPolicy(timeout_seconds=30), 0.0, 1000.0, 30.0),  # no deadline: the timeout
        (PullPolicy(timeout_seconds=30, active_deadline_seconds=100), 0.0, 50.0, 30.0),
        (PullPolicy(timeout_seconds=30, active_deadline_seconds=100), 0.0, 90.0, 10.0),  # cut to the deadline
        (PullPolicy(timeout_seconds=30, active_deadline_seconds=100), 0.0, 100.0, 0.0),  # out of time
    ],
)
def test_an_attempt_gets_its_timeout_cut_to_the_deadline(
    policy: PullPolicy, started: float, now: float, limit: float
) -> None:
    assert nodeimage.attempt_limit(policy, started, now) == limit


def test_only_finished_direct_tasks_expire_after_their_ttl() -> None:
    finished = TagState(SUCCEEDED, 0, completion_time="2026-12-03T11:59:00Z")
    direct = task(ttl_seconds_after_finished=60)
    assert nodeimage.ttl_expired(direct, finished, NOW)
    assert not nodeimage.ttl_expired(direct, finished, NOW - datetime.timedelta(seconds=1))
    assert not nodeimage.ttl_expired(direct, TagState(PULLING, 0), NOW)
    assert not nodeimage.ttl_expired(task(), finished, NOW)  # no TTL
    owned = Task("nginx", "1.27", 0, PullPolicy(ttl_seconds_after_finished=60), (), owned=True)
    assert not nodeimage.ttl_expired(owned, finished, NOW)  # the controller's to remove


def test_percent_reaches_100_only_when_complete() -> None:
    assert [nodeimage.percent(d, 1000) for d in (0, 5, 999, 1000)] == [0, 0, 99, 100]
    assert nodeimage.percent(0, 0) == 0


def test_status_counts_reports_and_drops_what_left_the_spec() -> None:
    tasks = {
        t.key: t for t in [task(tag="a"), task(tag="b", version=2), task("redis", "7"), task("redis", "8")]
    }
    states = {
        ("nginx", "a"): TagState(
            SUCCEEDED, 0, 100, "2026-12-03T11:00:00Z", "2026-12-03T11:01:00Z", DIGEST, "ok"
        ),
        ("nginx", "b"): TagState(SUCCEEDED, 1),  # an older version: Waiting for version 2
        ("redis", "7"): TagState(PULLING, 0, 30, "2026-12-03T11:00:00Z"),
        ("redis", "8"): TagState(FAILED, 0, message="manifest unknown"),
    }
    previous = {"imageStatuses": {"nginx": {}, "removed": {}}}
    status = nodeimage.status_document(tasks, states, previous, NOW)
    counters = [status[k] for k in ("desired", "succeeded", "failed", "pulling", "waiting")]
    assert counters == [4, 1, 1, 1, 1]
    assert status["imageStatuses"]["removed"] is None  # a merge patch removes it
    assert status["imageStatuses"]["nginx"]["tags"] == [
        {"tag": "a", "phase": SUCCEEDED, "version": 0, "progress": 100, "startTime": "2026-12-03T11:00:00Z",
         "completionTime": "2026-12-03T11:01:00Z", "imageID": DIGEST, "message": "ok"},
        {"tag": "b", "phase": WAITING, "version": 2, "progress": 0},
    ]  # fmt: skip
    assert "firstSyncStatus" not in status  # not everything finished yet


def test_first_sync_is_set_once_when_everything_first_finished() -> None:
    tasks = {t.key: t for t in [task(tag="a"), task(tag="b")]}
    states = {("nginx", "a"): TagState(SUCCEEDED, 0), ("nginx", "b"): TagState(FAILED, 0)}
    first = nodeimage.status_document(tasks, states, {}, NOW)["firstSyncStatus"]
    assert first == {
        "syncAt": "2026-12-03T12:00:00Z",
        "status": "Failed",
        "message": "1 of 2 pull tasks failed",
    }
    later = nodeimage.status_document(
        tasks, {}, {"firstSyncStatus": first}, NOW + datetime.timedelta(hours=1)
    )
    assert later["firstSyncStatus"] == first
    assert "firstSyncStatus" not in nodeimage.status_document({}, {}, {}, NOW)  # nothing to sync


def test_a_resumed_pull_keeps_its_start_time_and_a_new_version_starts_afresh() -> None:
    resumed = TagState(PULLING, 1, 40, "2026-12-03T11:00:00Z", message="attempt 1 failed")
    assert nodeimage.started(resumed, 1, NOW) == TagState(PULLING, 1, 40, "2026-12-03T11:00:00Z")
    assert nodeimage.started(resumed, 2, NOW) == TagState(PULLING, 2, 0, "2026-12-03T12:00:00Z")
    assert nodeimage.started(TagState(SUCCEEDED, 1), 1, NOW).start_time == "2026-12-03T12:00:00Z"


def test_the_agent_flags_parse_and_default() -> None:
    from tests.unit.test_peer_discovery import config

    defaults = config()
    assert (defaults.agent_parallel_pulls, defaults.agent_progress_interval, defaults.agent_status_delay) == (
        2, 10.0, 1.0,
    )  # fmt: skip
    given = config(
        "--agent-parallel-pulls", "5", "--agent-progress-interval", "1s", "--agent-status-delay", "200ms"
    )
    assert (given.agent_parallel_pulls, given.agent_progress_interval, given.agent_status_delay) == (
        5,
        1.0,
        0.2,
    )
