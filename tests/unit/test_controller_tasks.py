"""The pure logic of ImagePullJobs: task entries shared by jobs, target nodes, parallelism,
status counters and messages, re-pull timing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.jobstatus import NodeState, classify, count, jitter, message, plan, repull_due
from controller.listjobs import aggregate, child_name, spec_patch
from controller.nodeimages import metadata_patch
from controller.sidecarsets import images_of, job_name, prepull_template, prepulled
from controller.targets import SIDECARSET_ANNOTATION, InvalidTargets, target_nodes
from controller.tasks import ImageTarget, OwnerWants, job_policy, owner_keys, strictest, update_entry
from imagewarm import api, reference
from imagewarm.sidecarset import SidecarSet


def ref(name: str, uid: str = "") -> api.ObjectReference:
    return {
        "apiVersion": api.api_version(),
        "kind": "ImagePullJob",
        "namespace": "ns",
        "name": name,
        "uid": uid or f"uid-{name}",
    }


WANTS = {
    "uid-a": OwnerWants({"backoffLimit": 3, "timeoutSeconds": 600}, (("iw", "imagewarm-pull-1"),)),
    "uid-b": OwnerWants({"backoffLimit": 5, "timeoutSeconds": 60, "activeDeadlineSeconds": 100}),
}


def lookup(r: api.ObjectReference) -> OwnerWants | None:
    return WANTS.get(r.get("uid", ""))


# --- image targets -----------------------------------------------------------------------------


def test_image_targets_use_the_canonical_name_and_the_tag_or_digest() -> None:
    assert ImageTarget.of("nginx") == ImageTarget("docker.io/library/nginx", "latest")
    assert ImageTarget.of("registry.corp:5000/app:1") == ImageTarget("registry.corp:5000/app", "1")
    digest = "sha256:" + "a" * 64
    assert ImageTarget.of(f"nginx:1.27@{digest}") == ImageTarget("docker.io/library/nginx", digest)


@given(st.text(max_size=80))
def test_image_target_accepts_exactly_what_the_reference_parser_accepts(text: str) -> None:
    try:
        parsed = reference.parse(text)
    except reference.InvalidReference:
        with pytest.raises(reference.InvalidReference):
            ImageTarget.of(text)
        return
    target = ImageTarget.of(text)
    assert target.name == parsed.name and target.tag in (parsed.digest, parsed.tag, "latest")


# --- task entries ------------------------------------------------------------------------------


def test_jobs_share_one_tag_entry_with_the_strictest_policy_and_the_union_of_secrets() -> None:
    entry = update_entry(None, "1", lookup, add=ref("a"), created_at="2026-01-01T00:00:00Z")
    assert entry == {
        "tags": [
            {
                "tag": "1",
                "ownerReferences": [ref("a")],
                "version": 0,
                "createdAt": "2026-01-01T00:00:00Z",
                "pullPolicy": {"backoffLimit": 3, "timeoutSeconds": 600},
            }
        ],
        "pullSecrets": [{"namespace": "iw", "name": "imagewarm-pull-1"}],
    }
    both = update_entry(entry, "1", lookup, add=ref("b"))
    assert both is not None
    [tag] = both["tags"]
    assert [r["name"] for r in tag["ownerReferences"]] == ["a", "b"]
    assert tag["pullPolicy"] == {"backoffLimit": 5, "timeoutSeconds": 60, "activeDeadlineSeconds": 100}
    assert tag["version"] == 0, "joining does not re-pull"
    # Adding again is idempotent; another tag is its own task.
    assert update_entry(both, "1", lookup, add=ref("b")) == both
    two_tags = update_entry(both, "2", lookup, add=ref("a"))
    assert two_tags is not None and [t["tag"] for t in two_tags["tags"]] == ["1", "2"]
    # Removing an owner recomputes the policy from those left; the last owner takes the task.
    only_a = update_entry(both, "1", lookup, remove_uids=frozenset(["uid-b"]))
    assert only_a is not None and only_a["tags"][0]["pullPolicy"] == {
        "backoffLimit": 3,
        "timeoutSeconds": 600,
    }
    assert update_entry(only_a, "1", lookup, remove_uids=frozenset(["uid-a"])) is None
    assert update_entry(two_tags, "1", lookup, remove_uids=frozenset(["uid-a", "uid-b"])) == {
        "tags": [two_tags["tags"][1]],
        "pullSecrets": two_tags["pullSecrets"],
    }


def test_bumps_and_unknown_owners() -> None:
    entry = update_entry(None, "1", lookup, add=ref("a"))
    bumped = update_entry(entry, "1", lookup, bump=True)
    assert bumped is not None and bumped["tags"][0]["version"] == 1
    assert entry is not None and entry["tags"][0]["version"] == 0, "the input is not changed"
    # An owner the cache does not know keeps the secrets it may need, and the last policy stays.
    ghost = update_entry(entry, "1", lambda r: None)
    assert ghost == entry


def test_strictest_and_job_policy() -> None:
    assert strictest(
        [{"backoffLimit": 1, "timeoutSeconds": 9}, {"backoffLimit": 4, "timeoutSeconds": 30}]
    ) == {
        "backoffLimit": 4,
        "timeoutSeconds": 9,
    }
    spec = {
        "pullPolicy": {"backoffLimit": 2, "timeoutSeconds": 5},
        "completionPolicy": {"activeDeadlineSeconds": 50},
    }
    assert job_policy(spec) == {"backoffLimit": 2, "timeoutSeconds": 5, "activeDeadlineSeconds": 50}
    assert job_policy({}) == {"backoffLimit": 3, "timeoutSeconds": 600}


def node_image(
    name: str, tags: list[dict[str, Any]], statuses: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": "1"},
        "spec": {"images": {"r/app": {"tags": tags}}},
        "status": {"imageStatuses": {"r/app": {"tags": statuses or []}}},
    }


def test_owner_keys_name_the_jobs_with_tasks() -> None:
    obj = node_image("n", [{"tag": "1", "ownerReferences": [ref("a"), ref("b")]}])
    assert owner_keys(obj) == {"ns/a", "ns/b"}


# --- node state, parallelism, status -------------------------------------------------------------

TARGET = ImageTarget("r/app", "1")


@pytest.mark.parametrize(
    ("tags", "statuses", "phase"),
    [
        ([], [], "Pending"),
        ([{"tag": "1", "ownerReferences": [ref("b")]}], [], "Pending"),
        ([{"tag": "1", "ownerReferences": [ref("a")], "version": 0}], [], "Active"),
        ([{"tag": "1", "ownerReferences": [ref("a")]}], [{"tag": "1", "phase": "Pulling"}], "Active"),
        ([{"tag": "1", "ownerReferences": [ref("a")]}], [{"tag": "1", "phase": "Succeeded"}], "Succeeded"),
        (
            [{"tag": "1", "ownerReferences": [ref("a")], "version": 2}],
            [{"tag": "1", "phase": "Succeeded", "version": 1}],
            "Active",
        ),  # stale status: still pulling
        (
            [{"tag": "1", "ownerReferences": [ref("a")]}],
            [{"tag": "1", "phase": "Failed", "message": "x"}],
            "Failed",
        ),
    ],
)
def test_classify(tags: list[dict[str, Any]], statuses: list[dict[str, Any]], phase: str) -> None:
    assert classify("n", node_image("n", tags, statuses), TARGET, "uid-a").phase == phase


def states(**phases: str) -> list[NodeState]:
    return [NodeState(node, phase) for node, phase in phases.items()]  # type: ignore[arg-type]


def test_plan_keeps_at_most_parallelism_nodes_active() -> None:
    current = states(n1="Succeeded", n2="Active", n3="Pending", n4="Pending", n5="Pending")
    assert plan(current, 1).start == ()
    assert plan(current, 3).start == ("n3", "n4")
    assert plan(current, 0).start == (), "parallelism 0 pauses"
    assert plan(current, 10, due=["n1"]) == plan(current, 10).__class__(("n3", "n4", "n5"), ("n1",))
    assert plan(current, api.resolve_parallelism("50%", 5)).start == ("n3", "n4")


@given(
    st.lists(st.sampled_from(["Pending", "Active", "Succeeded", "Failed"]), max_size=40), st.integers(0, 50)
)
def test_plan_never_exceeds_the_limit(phases: list[str], limit: int) -> None:
    current = [NodeState(f"n{i}", p) for i, p in enumerate(phases)]  # type: ignore[arg-type]
    active = phases.count("Active")
    started = plan(current, limit).start
    assert len(started) == max(0, min(limit - active, phases.count("Pending")))


def test_counts_and_message() -> None:
    current = [
        NodeState("n1", "Succeeded"),
        NodeState("n2", "Failed", "no such tag"),
        NodeState("n3", "Active"),
        NodeState("n4", "Succeeded"),
        NodeState("n5", "Succeeded"),
    ]
    counts = count(current)
    assert (counts.desired, counts.succeeded, counts.failed, counts.active, counts.failed_nodes) == (
        5,
        3,
        1,
        1,
        ("n2",),
    )
    assert message(counts, {"n2": "no such tag"}, paused=False) == (
        "3/5 nodes succeeded, 1 failed (n2: no such tag), 1 pulling"
    )
    assert (
        message(count(states(a="Pending")), {}, paused=True)
        == "0/1 nodes succeeded, 1 waiting (paused: parallelism is 0)"
    )
    assert message(count([]), {}, paused=False) == "no node matches the job's selector"


def test_repulls_are_due_about_once_per_period_with_a_fixed_jitter() -> None:
    factors = [jitter("uid", f"n{i}") for i in range(200)]
    assert all(0.9 <= f <= 1.1 for f in factors) and max(factors) - min(factors) > 0.15
    assert jitter("uid", "n1") == jitter("uid", "n1")
    done = NodeState("n1", "Succeeded", completion_time="2026-01-01T00:00:00Z")
    due = repull_due(done, "uid", 86400)
    assert due is not None and 0.9 * 86400 <= due - 1767225600 <= 1.1 * 86400
    assert repull_due(NodeState("n1", "Active"), "uid", 86400) is None


# --- targets -------------------------------------------------------------------------------------


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


def pod(namespace: str, node_name: str, phase: str = "Running", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": "p", "labels": labels},
        "spec": {"nodeName": node_name},
        "status": {"phase": phase},
    }


NODES = [
    node("a", pool="x"),
    node("b", pool="y"),
    node("c", pool="x"),
    {"metadata": {"name": "gone", "labels": {"pool": "x"}, "deletionTimestamp": "2026-01-01T00:00:00Z"}},
]


def job(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "ns"}, "spec": {"image": "x", **spec}}


def test_targets() -> None:
    assert target_nodes(job(), NODES) == ["a", "b", "c"]
    assert target_nodes(job(selector={"names": ["c", "a", "nope"]}), NODES) == ["a", "c"]
    assert target_nodes(job(selector={"matchLabels": {"pool": "x"}}), NODES) == ["a", "c"]
    selector = {"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["x"]}]}
    assert target_nodes(job(selector=selector), NODES) == ["b"]
    pods = [
        pod("ns", "a", app="web"),
        pod("other", "b", app="web"),
        pod("ns", "c", "Succeeded", app="web"),
        pod("ns", "", app="web"),
    ]
    assert target_nodes(job(podSelector={"matchLabels": {"app": "web"}}), NODES, pods) == ["a"]
    with pytest.raises(InvalidTargets, match="operator In needs values"):
        target_nodes(job(selector={"matchExpressions": [{"key": "k", "operator": "In"}]}), NODES)


def test_sidecarset_targets_span_the_namespaces_it_covers() -> None:
    sidecarset = SidecarSet.from_object(
        {
            "metadata": {"name": "s"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "namespaceSelector": {"matchLabels": {"team": "t"}},
                "containers": [{"name": "c", "image": "log:1"}],
            },
        }
    )
    prepull = {
        "metadata": {"name": "j", "namespace": "iw", "annotations": {SIDECARSET_ANNOTATION: "s"}},
        "spec": {},
    }
    pods = [pod("t1", "a", app="web"), pod("t2", "b", app="web"), pod("u", "c", app="web")]
    labels = {"t1": {"team": "t"}, "t2": {"team": "t"}, "u": {}}
    assert target_nodes(prepull, NODES, pods, sidecarset=sidecarset, namespace_labels=labels) == ["a", "b"]
    assert target_nodes(prepull, NODES, pods, sidecarset=None) == []


# --- NodeImage metadata, list jobs, SidecarSets ----------------------------------------------------


def test_node_image_metadata_patch() -> None:
    live = {"metadata": {"name": "n", "uid": "u1", "labels": {"a": "1", "b": "2"}}}
    synced = {
        "metadata": {
            "name": "n",
            "resourceVersion": "5",
            "labels": {"a": "1", "b": "2"},
            "ownerReferences": [{"kind": "Node", "name": "n", "uid": "u1"}],
        }
    }
    assert metadata_patch(live, synced) is None
    live["metadata"]["labels"] = {"a": "9", "c": "3"}
    live["metadata"]["uid"] = "u2"
    patch = metadata_patch(live, synced)
    assert patch is not None
    assert patch["metadata"]["labels"] == {"a": "9", "c": "3", "b": None}
    assert (
        patch["metadata"]["ownerReferences"][0]["uid"] == "u2" and patch["metadata"]["resourceVersion"] == "5"
    )


def test_list_job_children() -> None:
    assert child_name("list", "nginx:1") == child_name("list", "nginx:1") != child_name("list", "nginx:2")
    assert len(child_name("x" * 300, "nginx")) <= 253
    child = {"spec": {"image": "a", "parallelism": 1, "sandboxConfig": {"labels": {}}}}
    assert spec_patch(child, {"image": "a", "parallelism": 2}) == {
        "spec": {"parallelism": 2, "sandboxConfig": None}
    }
    assert spec_patch(child, dict(child["spec"])) is None
    done = {
        "metadata": {"name": "c1"},
        "status": {"message": "1 failed", "conditions": [{"type": "Failed", "status": "True"}]},
    }
    ok = {"metadata": {"name": "c2"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    status = aggregate({"spec": {}}, {"a": done, "b": ok, "c": None})
    assert (status["desired"], status["active"], status["completed"], status["succeeded"]) == (3, 1, 2, 1)
    assert status["failedImageStatuses"] == [{"imagePullJob": "c1", "name": "a", "message": "1 failed"}]
    assert "completionTime" not in status
    assert "completionTime" in aggregate({"spec": {}}, {"a": done, "b": ok})


def test_sidecarset_prepull_settings() -> None:
    obj = {
        "metadata": {
            "name": "s",
            "annotations": {
                api.PREDOWNLOAD_PARALLELISM_ANNOTATION: "5",
                api.PREDOWNLOAD_TIMEOUT_ANNOTATION: "bad",
                "imagewarm.io/prepulled-images": '["log:1"]',
            },
        },
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "initContainers": [{"name": "i", "image": "init:1"}],
            "containers": [{"name": "c", "image": "log:1"}, {"name": "d", "image": "log:1"}],
        },
    }
    assert images_of(obj) == ["init:1", "log:1"]
    assert prepulled(obj) == {"log:1"}
    template = prepull_template(obj)
    assert template["parallelism"] == 5 and template["pullPolicy"]["timeoutSeconds"] == 600
    assert template["podSelector"] == {"matchLabels": {"app": "web"}}
    assert job_name("s", "log:1") != job_name("s", "init:1")


@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "remove", "bump"]), st.sampled_from(["a", "b", "c"]),
                  st.sampled_from(["1", "2"])),
        max_size=8,
    )
)  # fmt: skip
def test_update_entry_never_changes_the_entry_it_was_given(steps: list[tuple[str, str, str]]) -> None:
    """The entries come from the informer cache, shared by every reconciler: each update works on
    its own copies (shallow ones: the cached entry must stay as it was)."""
    import copy

    entry: api.ImageSpec | None = None
    for action, owner, tag in steps:
        before = copy.deepcopy(entry)
        new = update_entry(
            entry,
            tag,
            lookup,
            add=ref(owner) if action == "add" else None,
            remove_uids=frozenset([f"uid-{owner}"]) if action == "remove" else frozenset(),
            bump=action == "bump",
        )
        assert entry == before
        entry = new
