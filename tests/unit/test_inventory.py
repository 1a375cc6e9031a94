"""The CachedImage inventory's pure logic: pods -> usage (original references, counts that follow
scaling), NodeImage tasks -> nodes and digests, the status, the expiry rules (each kube-image-keeper
bug as a named test), status-write spacing, and the pins expressed as NodeImage task owners."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller import caches, expiry, inventory, pins
from imagewarm import api
from imagewarm.reference import parse

NOW = dt.datetime(2026, 12, 3, 12, 0, 0, tzinfo=dt.UTC)
TTL = 3600.0
NGINX = "docker.io/library/nginx:1.27"
DIGEST = "sha256:" + "a" * 64


def pod(
    name: str,
    images: dict[str, str],
    *,
    namespace: str = "shop",
    node: str = "n1",
    phase: str = "Running",
    original: dict[str, str] | None = None,
    image_ids: dict[str, str] | None = None,
    init: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "uid": f"u-{name}",
        "resourceVersion": "1",
    }
    if original is not None:
        metadata["annotations"] = {api.ORIGINAL_IMAGES_ANNOTATION: json.dumps(original), "other": "x" * 100}
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [
            {"name": c, "image": i, "env": [{"name": "A", "value": "b"}]} for c, i in images.items()
        ],
    }
    if init:
        spec["initContainers"] = [{"name": c, "image": i} for c, i in init.items()]
    status: dict[str, Any] = {"phase": phase}
    if image_ids:
        status["containerStatuses"] = [{"name": c, "imageID": i, "ready": True} for c, i in image_ids.items()]
    return {"metadata": metadata, "spec": spec, "status": status}


# --- pods -> usage --------------------------------------------------------------------------------


def test_slim_pod_keeps_only_what_the_inventory_reads_and_reads_the_same():
    whole = pod(
        "a", {"app": "localhost:7439/docker.io/library/nginx:1.27"}, original={"app": "nginx:1.27"},
        image_ids={"app": f"localhost:7439/docker.io/library/nginx@{DIGEST}"}, init={"setup": "busybox"},
    )  # fmt: skip
    whole["metadata"]["labels"] = {"big": "label"}
    slim = caches.slim_pod(whole)
    assert slim["metadata"]["annotations"] == {api.ORIGINAL_IMAGES_ANNOTATION: '{"app": "nginx:1.27"}'}
    assert slim["spec"]["containers"] == [
        {"name": "app", "image": "localhost:7439/docker.io/library/nginx:1.27"}
    ]
    assert inventory.pod_use(slim) == inventory.pod_use(whole)


def test_a_rewritten_pod_counts_under_its_original_image():
    use = inventory.pod_use(
        pod("a", {"app": "localhost:7439/docker.io/library/nginx:1.27"}, original={"app": "nginx:1.27"})
    )
    assert use is not None
    assert use.images == (inventory.ImageUse(NGINX, proxied=True),)


def test_a_registry_port_maps_back_and_an_unrewritten_image_is_not_proxied():
    use = inventory.pod_use(
        pod(
            "a",
            {"app": "localhost:7439/registry.corp_5000/team/app:1", "side": "redis:7"},
            original={"app": "registry.corp:5000/team/app:1"},
        )
    )
    assert use is not None
    assert use.images == (
        inventory.ImageUse("docker.io/library/redis:7", proxied=False),
        inventory.ImageUse("registry.corp:5000/team/app:1", proxied=True),
    )


def test_a_proxied_image_without_the_annotation_maps_back_by_its_path():
    use = inventory.pod_use(pod("a", {"app": "localhost:7439/docker.io/library/nginx:1.27"}))
    assert use is not None and use.images == (inventory.ImageUse(NGINX, proxied=True),)


def test_the_kubelets_digest_is_read_from_the_container_status():
    use = inventory.pod_use(
        pod("a", {"app": "nginx:1.27"}, image_ids={"app": f"docker.io/library/nginx@{DIGEST}"})
    )
    assert use is not None and use.images[0].digest == DIGEST
    bare = inventory.pod_use(pod("a", {"app": "nginx:1.27"}, image_ids={"app": DIGEST}))
    assert bare is not None and bare.images[0].digest is None  # a config ID, not the manifest digest


def test_finished_pods_use_nothing_and_pending_ones_do():
    assert inventory.pod_use(pod("a", {"app": "nginx:1.27"}, phase="Succeeded")) is None
    assert inventory.pod_use(pod("a", {"app": "nginx:1.27"}, phase="Failed")) is None
    pending = inventory.pod_use(pod("a", {"app": "nginx:1.27"}, phase="Pending", node=""))
    assert pending is not None and not pending.running


def test_init_containers_count_and_one_image_twice_in_a_pod_is_one_use():
    use = inventory.pod_use(pod("a", {"app": "nginx:1.27", "copy": "nginx:1.27"}, init={"setup": "busybox"}))
    assert use is not None
    assert [i.reference for i in use.images] == ["docker.io/library/busybox", NGINX]


def test_usage_nodes_are_those_of_running_pods_that_pulled_through_the_proxy():
    index = inventory.PodIndex()
    proxied = {"app": "localhost:7439/docker.io/library/nginx:1.27"}
    index.apply("ADDED", pod("a", proxied, original={"app": "nginx:1.27"}, node="n1"))
    index.apply("ADDED", pod("b", proxied, original={"app": "nginx:1.27"}, node="n2", phase="Pending"))
    index.apply("ADDED", pod("c", {"app": "nginx:1.27"}, node="n3"))  # not rewritten: upstream pull
    usage = index.usage(NGINX)
    assert usage.pods == ("shop/a", "shop/b", "shop/c")
    assert usage.nodes == {"n1"}


def test_kuik_111_136_counts_follow_scale_up_and_down_and_deletion():
    index = inventory.PodIndex()
    pods = [pod(f"web-{i}", {"app": "nginx:1.27"}) for i in range(5)]
    for p in pods:
        assert index.apply("ADDED", p) == {NGINX}
    for p in pods:  # status updates, replays and relists of the same pods change nothing
        index.apply("MODIFIED", p)
        index.apply("ADDED", p)
    assert index.usage(NGINX).count == 5
    for p in pods[2:]:
        index.apply("DELETED", p)
    index.apply("DELETED", pods[4])  # a DELETED seen twice (relist after a watch)
    assert index.usage(NGINX).count == 2
    index.apply("MODIFIED", {**pods[0], "status": {"phase": "Succeeded"}})
    assert index.usage(NGINX).pods == ("shop/web-1",)


def test_a_pod_changing_image_moves_its_use():
    index = inventory.PodIndex()
    index.apply("ADDED", pod("a", {"app": "nginx:1.27"}))
    touched = index.apply("MODIFIED", pod("a", {"app": "nginx:1.28"}))
    assert touched == {NGINX, "docker.io/library/nginx:1.28"}
    assert index.usage(NGINX).count == 0 and index.usage("docker.io/library/nginx:1.28").count == 1
    assert index.references() == {"docker.io/library/nginx:1.28"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ADDED", "MODIFIED", "DELETED"]), st.integers(0, 6), st.sampled_from(["a", "b"])
        ),
        max_size=60,
    )
)
def test_the_index_always_equals_a_recount_of_the_pods_left(events):
    """Level-triggered: whatever order events come in, the index is the pods the cache holds."""
    index = inventory.PodIndex()
    cache: dict[str, dict[str, Any]] = {}
    for kind, number, image in events:
        p = pod(f"p{number}", {"app": f"{image}:1"})
        if kind == "DELETED":
            cache.pop(f"shop/p{number}", None)
        else:
            cache[f"shop/p{number}"] = p
        index.apply(kind, p)
    for image in ("a", "b"):
        reference = f"docker.io/library/{image}:1"
        uses = [u for u in map(inventory.pod_use, cache.values()) if u]
        assert index.usage(reference) == inventory.usage_of(reference, uses)


# --- NodeImage tasks ------------------------------------------------------------------------------


def nodeimage(node: str, tasks: dict[str, list[dict[str, Any]]], statuses: dict[str, list[dict[str, Any]]]):
    return {
        "metadata": {"name": node, "resourceVersion": "7"},
        "spec": {"images": {name: {"tags": tags} for name, tags in tasks.items()}},
        "status": {"imageStatuses": {name: {"tags": tags} for name, tags in statuses.items()}},
    }


def test_task_references_round_trip_with_tags_and_digests():
    assert inventory.task_reference("docker.io/library/nginx", "1.27") == NGINX
    assert inventory.task_reference("docker.io/library/nginx", DIGEST) == f"docker.io/library/nginx@{DIGEST}"
    assert inventory.entry_of(parse("nginx:1.27")) == ("docker.io/library/nginx", "1.27")
    assert inventory.entry_of(parse(f"nginx:1.27@{DIGEST}")) == ("docker.io/library/nginx", DIGEST)
    assert inventory.task_reference("Not Valid", "x") is None


def test_task_index_follows_nodeimage_statuses():
    index = inventory.TaskIndex()
    owner = {"kind": "ImagePullJob", "name": "j", "namespace": "d", "uid": "1"}
    first = nodeimage(
        "n1",
        {"docker.io/library/nginx": [{"tag": "1.27", "ownerReferences": [owner]}]},
        {"docker.io/library/nginx": [{"tag": "1.27", "phase": "Pulling", "progress": 40}]},
    )
    assert index.apply("ADDED", first) == {NGINX}
    assert index.tasks(NGINX) == (inventory.NodeTask("n1", "Pulling", owners=(owner,)),)
    done = nodeimage(
        "n1",
        {"docker.io/library/nginx": [{"tag": "1.27", "ownerReferences": [owner]}]},
        {"docker.io/library/nginx": [{"tag": "1.27", "phase": "Succeeded", "imageID": DIGEST}]},
    )
    assert index.apply("MODIFIED", done) == {NGINX}
    assert index.apply("MODIFIED", done) == set()  # nothing changed: no key to look at
    assert index.tasks(NGINX)[0].image_id == DIGEST
    assert index.owned_by("ImagePullJob", "j") == [("n1", NGINX, owner)]
    assert index.apply("DELETED", done) == {NGINX}
    assert index.tasks(NGINX) == ()


# --- status ---------------------------------------------------------------------------------------


def test_status_counts_lists_ten_pods_sorted_and_unions_the_nodes():
    usage = inventory.Usage(tuple(f"ns/p{i:02}" for i in range(25)), frozenset({"n2"}), frozenset({DIGEST}))
    tasks = [
        inventory.NodeTask("n1", "Succeeded", f"docker.io/library/nginx@{DIGEST}"),  # name@digest, or
        inventory.NodeTask("n4", "Succeeded", DIGEST),  # the digest alone
        inventory.NodeTask("n3", "Pulling"),
    ]
    status = inventory.desired_status(parse(NGINX), usage, tasks, {})
    assert status["usedBy"] == {"count": 25, "pods": [f"ns/p{i:02}" for i in range(10)]}
    assert status["nodes"] == ["n1", "n2", "n4"]
    assert status["phase"] == "Cached" and status["digest"] == DIGEST


def test_status_phase_pending_caching_failed():
    ref, usage = parse(NGINX), inventory.Usage(("a/b",))
    assert inventory.desired_status(ref, usage, [], {})["phase"] == "Pending"
    pulling = [inventory.NodeTask("n1", "Pulling"), inventory.NodeTask("n2", "Failed", message="401")]
    assert inventory.desired_status(ref, usage, pulling, {})["phase"] == "Caching"
    failed = inventory.desired_status(ref, usage, [inventory.NodeTask("n2", "Failed", message="denied")], {})
    assert failed["phase"] == "Failed" and failed["message"] == "node n2: denied"


def test_size_is_kept_for_its_digest_and_dropped_when_the_digest_moves():
    ref = parse(NGINX)
    usage = inventory.Usage(("a/b",), digests=frozenset({DIGEST}))
    measured = inventory.Measured(DIGEST, 1234, upstream_reachable=True)
    status = inventory.desired_status(ref, usage, [], {}, measured)
    assert status["size"] == 1234 and status["upstreamReachable"] is True
    assert inventory.desired_status(ref, usage, [], status)["size"] == 1234
    moved = inventory.Usage(("a/b",), digests=frozenset({"sha256:" + "b" * 64}))
    again = inventory.desired_status(ref, moved, [], status)
    assert "size" not in again
    assert inventory.status_patch(again, status)["size"] is None


def test_a_digest_pinned_image_has_its_own_digest():
    pinned = parse(f"nginx@{DIGEST}")
    assert inventory.desired_status(pinned, inventory.Usage(), [], {})["digest"] == DIGEST


def test_status_patch_is_empty_when_nothing_changed_and_removes_a_stale_message():
    ref, usage = parse(NGINX), inventory.Usage(("a/b",))
    failed = inventory.desired_status(ref, usage, [inventory.NodeTask("n2", "Failed")], {})
    assert inventory.status_patch(failed, failed) == {}
    pending = inventory.desired_status(ref, usage, [], failed)
    assert inventory.status_patch(pending, failed) == {"phase": "Pending", "message": None}


# --- expiry ---------------------------------------------------------------------------------------


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def used_status(count: int, last_seen: dt.datetime | None = NOW) -> dict[str, Any]:
    status: dict[str, Any] = {"usedBy": {"count": count, "pods": []}}
    if last_seen is not None:
        status["lastSeenUsed"] = expiry.format_time(last_seen)
    return status


def test_an_unused_image_gets_expires_at_last_seen_plus_ttl():
    action = expiry.expiry_action({}, used_status(0), used=False, now=at(10), ttl=TTL)
    assert action == expiry.ExpiryAction("set", expiry.format_time(at(TTL)), TTL - 10)


def test_kuik_396_expires_at_is_never_pushed_forward_while_unused():
    spec = {"expiresAt": expiry.format_time(at(TTL))}
    for later in (60, 600, TTL - 1):
        action = expiry.expiry_action(spec, used_status(0), used=False, now=at(later), ttl=TTL)
        assert action.action == "wait" and action.recheck == TTL - later
    # lastSeenUsed stays too: no status write moves it while the image is unused.
    assert expiry.last_seen_used(False, used_status(0), at(600)) is None


def test_kuik_199_a_restart_derives_the_same_expiry_from_stored_fields():
    stored = used_status(0, last_seen=NOW)
    before = expiry.expiry_action({}, stored, used=False, now=at(5), ttl=TTL)
    after_restart = expiry.expiry_action({}, stored, used=False, now=at(500), ttl=TTL)
    assert before.expires_at == after_restart.expires_at == expiry.format_time(at(TTL))


def test_kuik_540_567_an_image_in_use_never_expires_and_a_returning_pod_clears_expiry():
    spec = {"expiresAt": expiry.format_time(at(-1))}  # already due
    assert expiry.expiry_action(spec, used_status(1), used=True, now=NOW, ttl=TTL).action == "clear"
    assert expiry.expiry_action({}, used_status(1), used=True, now=NOW, ttl=TTL).action == "wait"
    # The stored status still counts a user: expiry waits until lastSeenUsed is recorded.
    assert expiry.expiry_action({}, used_status(3), used=False, now=NOW, ttl=TTL).action == "wait"


def test_an_expired_unused_image_is_deleted():
    spec = {"expiresAt": expiry.format_time(at(TTL))}
    assert expiry.expiry_action(spec, used_status(0), used=False, now=at(TTL), ttl=TTL).action == "delete"


def test_retain_never_expires_and_clears_an_expiry():
    spec = {"retain": True, "expiresAt": expiry.format_time(at(-100))}
    assert expiry.expiry_action(spec, used_status(0), used=False, now=at(10 * TTL), ttl=TTL).action == "clear"
    kept = expiry.expiry_action({"retain": True}, used_status(0), used=False, now=at(10 * TTL), ttl=TTL)
    assert kept.action == "wait" and kept.recheck is None


def test_an_image_never_seen_used_expires_from_its_creation():
    action = expiry.expiry_action({}, {}, used=False, now=at(10), ttl=TTL, created=expiry.format_time(NOW))
    assert action.expires_at == expiry.format_time(at(TTL))


def test_last_seen_used_is_set_when_the_last_user_goes_and_refreshed_hourly_while_used():
    assert expiry.last_seen_used(False, used_status(2, NOW), at(30)) == expiry.format_time(at(30))
    assert expiry.last_seen_used(True, used_status(2, NOW), at(30)) is None
    refresh = expiry.LAST_SEEN_REFRESH
    assert expiry.last_seen_used(True, used_status(2, NOW), at(refresh)) == expiry.format_time(at(refresh))
    assert expiry.last_seen_used(True, {}, NOW) == expiry.format_time(NOW)


def test_times_parse_as_the_api_server_writes_them():
    assert expiry.parse_time("2026-12-03T12:00:00Z") == NOW
    assert expiry.parse_time("not a time") is None and expiry.parse_time(None) is None


def test_status_writes_are_spaced_per_image():
    clock = [100.0]
    spacing = expiry.WriteSpacing(5.0, clock=lambda: clock[0])
    assert spacing.wait("a") == 0
    spacing.wrote("a")
    clock[0] = 102.0
    assert spacing.wait("a") == 3.0 and spacing.wait("b") == 0
    clock[0] = 105.0
    assert spacing.wait("a") == 0


def test_a_thousand_pod_scale_up_is_a_few_status_writes():
    """Reconciles after every one of 1,000 pod events, 10 ms apart: writes at most every 5 s."""
    clock = [0.0]
    spacing = expiry.WriteSpacing(5.0, clock=lambda: clock[0])
    index, stored, writes = inventory.PodIndex(), {}, 0
    for i in range(1000):
        clock[0] = i * 0.01
        index.apply("ADDED", pod(f"web-{i}", {"app": "nginx:1.27"}))
        desired = inventory.desired_status(parse(NGINX), index.usage(NGINX), [], stored)
        if inventory.status_patch(desired, stored) and spacing.wait(NGINX) == 0:
            stored, writes = desired, writes + 1
            spacing.wrote(NGINX)
    assert stored["usedBy"]["count"] in range(500, 1001)
    assert writes == 2  # at 0 s and 5 s; the last value follows at the reconcile the wait asks for


# --- pins -----------------------------------------------------------------------------------------

CACHED = {"metadata": {"name": "docker.io.library.nginx-1.27-abc", "uid": "ci-1"}}


def test_a_pin_adds_a_task_or_joins_a_jobs_task_once():
    owner = pins.owner_of(CACHED)
    assert pins.pin_entry(None, "1.27", owner, "2026-12-03T12:00:00Z") == {
        "tags": [
            {"tag": "1.27", "createdAt": "2026-12-03T12:00:00Z", "ownerReferences": [owner], "version": 0}
        ]
    }
    job = {"kind": "ImagePullJob", "namespace": "d", "name": "j", "uid": "j-1"}
    shared = {
        "pullSecrets": [{"name": "s"}],
        "tags": [{"tag": "1.27", "version": 2, "ownerReferences": [job]}],
    }
    joined = pins.pin_entry(shared, "1.27", owner, "t")
    assert joined == {
        "pullSecrets": [{"name": "s"}],
        "tags": [{"tag": "1.27", "version": 2, "ownerReferences": [job, owner]}],
    }
    assert shared["tags"][0]["ownerReferences"] == [job]  # not modified in place
    assert pins.pin_entry(joined, "1.27", owner, "t") == joined  # owned already: nothing to write


def test_unpin_removes_only_the_cached_images_owner_and_empty_tasks():
    owner = pins.owner_of(CACHED)
    job = {"kind": "ImagePullJob", "namespace": "d", "name": "j", "uid": "j-1"}
    name = CACHED["metadata"]["name"]
    entry = {
        "tags": [
            {"tag": "1.27", "ownerReferences": [job, owner]},
            {"tag": "1.28", "ownerReferences": [owner]},
        ]
    }
    assert pins.unpin_entry(entry, name, keep_uid="ci-1") == entry  # the live CachedImage keeps its pins
    assert pins.unpin_entry(entry, name, keep_uid=None) == {
        "tags": [{"tag": "1.27", "ownerReferences": [job]}]
    }
    assert pins.unpin_entry({"tags": [{"tag": "1.28", "ownerReferences": [owner]}]}, name, None) is None
    assert pins.unpin_entry(None, name, None) is None
