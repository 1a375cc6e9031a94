"""Pods -> CachedImage on the real cluster, with the real controller process (`python -m imagewarm
controller`): counts that follow a Deployment's scaling, expiry set once and kept across a
controller restart, deletion after the TTL, a returning pod clearing it, retain, an expired image in
use never deleted (kube-image-keeper's bugs), and a webhook-rewritten pod: its original image, the
node whose proxy holds it, its size through the proxy, the pin on that node's NodeImage (removed
when the CachedImage expires), and `imagewarm status` showing it all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagewarm import api
from imagewarm.reference import parse
from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry, start_registry
from localcluster.stack import Stack
from tests.fixtures.controller import ControllerProcess

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEWARM_", "PROMETHEUS_"))}


@pytest.fixture(scope="module")
def crds(crds_installed: Cluster) -> Cluster:
    return crds_installed


@pytest.fixture
def controller(crds: Cluster) -> Iterator[Callable[..., ControllerProcess]]:
    """`controller(ttl, *flags)` starts the real controller process; every one started is stopped
    afterwards, and the CachedImages the test left are deleted."""
    started: list[ControllerProcess] = []

    def start(ttl: str, *extra: str) -> ControllerProcess:
        running = ControllerProcess(crds, "--unused-image-ttl", ttl, *extra, name="cachedimages").start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
    crds.kubectl(
        "delete", "cachedimages", "-l", "app.kubernetes.io/managed-by=imagewarm-controller", "--wait=false"
    )


@pytest.fixture(scope="module")
def builder(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    return ImageBuilder(tmp_path_factory.mktemp("images"))


def fresh_image(cluster: Cluster, builder: ImageBuilder) -> str:
    """A runnable image of its own name in the cluster's registry (the kubelets trust it)."""
    repository = f"cached/{uuid.uuid4().hex[:8]}"
    push(cluster.registry, repository, "v1", builder.pause())
    return f"{cluster.registry.host}/{repository}:v1"


def get(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", *args, "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def cached_image(cluster: Cluster, image: str) -> dict[str, Any] | None:
    return get(cluster, "cachedimage", api.cached_image_name(str(parse(image))))


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll `check` until it returns something truthy; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout:.0f}s (last: {last!r})")


def used_by(cluster: Cluster, image: str, count: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = cached_image(cluster, image)
        return (
            found if found and (found.get("status") or {}).get("usedBy", {}).get("count") == count else None
        )

    found: dict[str, Any] = wait_for(f"CachedImage of {image} used by {count} pods", check)
    return found


def deployment(cluster: Cluster, namespace: str, name: str, image: str, replicas: int) -> None:
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "app", "image": image}],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(body))


def scale(cluster: Cluster, namespace: str, name: str, replicas: int) -> None:
    cluster.kubectl("-n", namespace, "scale", f"deployment/{name}", f"--replicas={replicas}")


def touch(cluster: Cluster, cached: dict[str, Any]) -> None:
    """Change the CachedImage (an annotation) so the controller reconciles it again."""
    name = cached["metadata"]["name"]
    cluster.kubectl(
        "annotate", "--overwrite", "cachedimage", name, f"test.imagewarm.io/touch={uuid.uuid4().hex}"
    )


def test_counts_follow_a_deployment_scaling_and_the_unused_image_expires(
    controller, cluster: Cluster, namespace: str, builder: ImageBuilder
) -> None:
    """kuik#111/#136 (stale counts) and the TTL: 3 -> 1 -> 0 pods, then deleted after 5 s unused."""
    image = fresh_image(cluster, builder)
    controller("5s")
    deployment(cluster, namespace, "web", image, replicas=3)
    three = used_by(cluster, image, 3)
    assert three["spec"]["sourceImage"] == str(parse(image))
    pods = three["status"]["usedBy"]["pods"]
    assert len(pods) == 3 and pods == sorted(pods) and all(p.startswith(f"{namespace}/web-") for p in pods)
    assert "expiresAt" not in three["spec"]
    scale(cluster, namespace, "web", 1)
    used_by(cluster, image, 1)
    scale(cluster, namespace, "web", 0)
    unused = used_by(cluster, image, 0)
    assert unused["status"]["usedBy"]["pods"] == []
    wait_for("the unused CachedImage deleted after its TTL", lambda: cached_image(cluster, image) is None)
    name = unused["metadata"]["name"]

    def reasons() -> set[str]:
        events = get(cluster, "-n", "default", "events", "--field-selector", f"involvedObject.name={name}")
        return {e["reason"] for e in (events or {}).get("items", [])}

    wait_for("the Unused and Expired Events of the CachedImage", lambda: {"Unused", "Expired"} <= reasons())


def test_expires_at_is_set_once_kept_across_a_restart_and_a_returning_pod_clears_it(
    controller, cluster: Cluster, namespace: str, builder: ImageBuilder
) -> None:
    """kuik#396 (expiry pushed forward) and kuik#199 (reset by a restart)."""
    image = fresh_image(cluster, builder)
    running = controller("1h")
    deployment(cluster, namespace, "api", image, replicas=1)
    used_by(cluster, image, 1)
    scale(cluster, namespace, "api", 0)

    def expiring() -> dict[str, Any] | None:
        found = cached_image(cluster, image)
        return found if found and found["spec"].get("expiresAt") else None

    first = wait_for("expiresAt set on the unused image", expiring)
    expires, last_seen = first["spec"]["expiresAt"], first["status"]["lastSeenUsed"]
    assert expiry_seconds(last_seen, expires) == 3600
    for _ in range(3):
        touch(cluster, first)
    running.stop()
    controller("1h")
    touch(cluster, first)
    time.sleep(2)  # reconciles of the touched object have run; none may move the expiry
    after = cached_image(cluster, image)
    assert after is not None and after["metadata"]["uid"] == first["metadata"]["uid"]
    assert (after["spec"]["expiresAt"], after["status"]["lastSeenUsed"]) == (expires, last_seen)

    scale(cluster, namespace, "api", 1)
    wait_for(
        "expiresAt cleared by a pod using the image again",
        lambda: (c := cached_image(cluster, image)) and "expiresAt" not in c["spec"]
        and c["status"]["usedBy"]["count"] == 1,
    )  # fmt: skip


def expiry_seconds(start: str, end: str) -> float:
    import datetime as dt

    def at(text: str) -> dt.datetime:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))

    return (at(end) - at(start)).total_seconds()


def test_retain_never_expires(controller, cluster: Cluster, namespace: str, builder: ImageBuilder) -> None:
    image = fresh_image(cluster, builder)
    controller("2s")
    deployment(cluster, namespace, "kept", image, replicas=1)
    found = used_by(cluster, image, 1)
    cluster.kubectl(
        "patch", "cachedimage", found["metadata"]["name"], "--type=merge", "-p", '{"spec":{"retain":true}}'
    )
    scale(cluster, namespace, "kept", 0)
    used_by(cluster, image, 0)
    time.sleep(6)  # three TTLs
    kept = cached_image(cluster, image)
    assert kept is not None and kept["metadata"]["uid"] == found["metadata"]["uid"]
    assert "expiresAt" not in kept["spec"]


def test_the_retain_example_is_kept_up_to_date_and_never_expires(controller, cluster: Cluster) -> None:
    """examples/cachedimage.yaml: a user's CachedImage for an image no pod uses, named as the
    controller names it, gets its status and no expiry."""
    example = REPO / "examples" / "cachedimage.yaml"
    cluster.kubectl("apply", "-f", str(example))
    try:
        controller("1s")
        image = "registry.example.com/ops/recovery-toolbox:3.1"
        kept = wait_for(
            "the example's status written",
            lambda: (
                (c := cached_image(cluster, image))
                and (c.get("status") or {}).get("phase") == "Pending"
                and c
            ),
        )
        assert kept["status"]["usedBy"] == {"count": 0, "pods": []} and "lastSeenUsed" in kept["status"]
        time.sleep(3)  # three TTLs
        again = cached_image(cluster, image)
        assert again is not None and again["metadata"]["uid"] == kept["metadata"]["uid"]
        assert "expiresAt" not in again["spec"]
    finally:
        cluster.kubectl("delete", "-f", str(example), "--ignore-not-found")


def test_kuik_540_an_expired_image_in_use_is_not_deleted(
    controller, cluster: Cluster, namespace: str, builder: ImageBuilder
) -> None:
    """The image's expiresAt passes while the controller is down and a pod starts using it again:
    the controller that comes back sees the pod before judging, and clears the expiry."""
    image = fresh_image(cluster, builder)
    running = controller("8s")
    deployment(cluster, namespace, "late", image, replicas=1)
    used_by(cluster, image, 1)
    running.stop()  # before the scale-down: the stored status still counts the pod
    scale(cluster, namespace, "late", 0)
    wait_for("the pod gone", lambda: not get(cluster, "-n", namespace, "pods")["items"])  # type: ignore[index]
    running = controller("8s")
    expiring = wait_for(
        "expiresAt set", lambda: (c := cached_image(cluster, image)) and c["spec"].get("expiresAt") and c
    )
    running.stop()
    time.sleep(9)  # expiresAt is now in the past
    scale(cluster, namespace, "late", 1)
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Available", "deployment/late", "--timeout=60s")
    controller("8s")
    kept = wait_for(
        "expiresAt cleared for the image in use",
        lambda: (c := cached_image(cluster, image)) and "expiresAt" not in c["spec"] and c,
    )
    assert kept["metadata"]["uid"] == expiring["metadata"]["uid"]  # never deleted and recreated
    assert kept["status"]["usedBy"]["count"] == 1


# --- through the webhook and the proxy -------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def stack(crds: Cluster, upstream: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack.start(crds, [upstream], workdir=tmp_path_factory.mktemp("stack"))
    yield running
    running.stop()


def status_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagewarm", "status", "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip


def test_a_rewritten_pod_is_counted_under_its_original_image_held_and_pinned_on_its_node(
    controller, stack: Stack, upstream: Registry, cluster: Cluster, namespace: str, builder: ImageBuilder
) -> None:
    pulled = builder.pause()
    push(upstream, "team/app", "1.0", pulled)
    original = f"{upstream.host}/team/app:1.0"
    controller("4s", "--image-proxy", stack.proxy_url)
    node = cluster.nodes[1].name
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "rewritten", "namespace": namespace},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": original}],
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod/rewritten", "--timeout=90s")
    stored_pod = get(cluster, "-n", namespace, "pod", "rewritten")
    assert stored_pod is not None and stored_pod["spec"]["containers"][0]["image"].startswith(
        stack.proxy_prefix
    )

    def held() -> dict[str, Any] | None:
        found = cached_image(cluster, original)
        status = (found or {}).get("status") or {}
        return found if status.get("nodes") == [node] and "size" in status else None

    found = wait_for("the CachedImage of the original image, on the pod's node, with its size", held)
    status = found["status"]
    assert found["spec"]["sourceImage"] == str(parse(original))
    assert status["phase"] == "Cached" and status["digest"] == pulled.digest
    assert status["size"] == sum(b.size for b in pulled.blobs)
    assert status["usedBy"] == {"count": 1, "pods": [f"{namespace}/rewritten"]}

    # The pin: the node's task for the image, owned by the CachedImage (the agent pins its blobs).
    def pinned() -> list[dict[str, Any]]:
        nodeimage = get(cluster, "nodeimage", node) or {}
        entry = (nodeimage.get("spec") or {}).get("images", {}).get(parse(original).name) or {}
        return [o for t in entry.get("tags", []) if t["tag"] == "1.0" for o in t.get("ownerReferences", [])]

    owners = wait_for("the pin task on the node's NodeImage", pinned)
    assert owners == [
        {"apiVersion": api.api_version(), "kind": "CachedImage", "name": found["metadata"]["name"],
         "uid": found["metadata"]["uid"]}
    ]  # fmt: skip

    shown = status_cli(cluster, "--proxy", stack.proxy_url)
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    row = next(r for r in rows if r and r[0] == parse(original).familiar)
    assert row[1:3] == ["Cached", pulled.digest[:19]]
    assert f"1: {node}" in " ".join(row) and row[-2:] == ["1", "-"]
    proxy_row = next(r for r in rows if r and r[0] == stack.proxy_url)
    assert proxy_row[-1].endswith("%")

    cluster.kubectl("-n", namespace, "delete", "pod", "rewritten", "--wait=true")
    wait_for("the CachedImage expired", lambda: cached_image(cluster, original) is None)
    wait_for("the pin removed from the node's NodeImage", lambda: not pinned())
