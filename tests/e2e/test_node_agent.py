"""The node agent on the real cluster: one `imagewarm proxy --node-name` per node (localcluster.
nodeproxies, as the chart's DaemonSet), NodeImage tasks written directly (OpenKruise's low-level
API), pulled by that node's agent through its own proxy, reported in the NodeImage status; then the
node's real kubelet starts a pod of the image from that proxy's cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagewarm.digest import Digest
from imagewarm.informer import Informer
from imagewarm.kube import Kube
from imagewarm.reference import registry_segment
from imagewarm.warmup import warm
from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.nodeproxies import NodeProxies
from localcluster.registry import Registry, start_registry
from localcluster.slowlink import SlowLink
from localcluster.stack import Stack
from proxy.cache.paths import Layout
from tests.e2e.node_agent_harness import (
    eventually,
    nodeimage,
    put_task,
    remove_image,
    tag_status,
    wait_phase,
)
from tests.e2e.test_pull_through import run_pod
from tests.fixtures.controller import ControllerProcess, condition, create_job, job_object, wait_for

pytestmark = pytest.mark.e2e

RELEASE_NAMESPACE = "imagewarm-system"
SLOW_BYTES_PER_SECOND = 4 << 20


@pytest.fixture(scope="module")
def upstream(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("agent-upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def slow(upstream: Registry) -> Iterator[SlowLink]:
    """The upstream behind a 4 MiB/s link (per connection)."""
    host, port = upstream.host.rsplit(":", 1)
    link = SlowLink(host, int(port), SLOW_BYTES_PER_SECOND).start()
    yield link
    link.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    return ImageBuilder(tmp_path_factory.mktemp("agent-images"))


@pytest.fixture(scope="module")
def nodes(
    crds_installed: Cluster,
    cluster: Cluster,
    upstream: Registry,
    slow: SlowLink,
    auth_registry: Registry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeProxies]:
    started = NodeProxies.start(
        cluster,
        [upstream.host, slow.host, auth_registry.host],
        workdir=tmp_path_factory.mktemp("node-proxies"),
        proxy_args=["--agent-progress-interval", "1s"],
    )
    yield started
    started.stop()


def cached(cache_dir: Path, digest: str) -> bool:
    return Layout(cache_dir).blob(Digest.parse(digest)).exists()


def pins(cache_dir: Path, digest: str) -> set[str]:
    directory = Layout(cache_dir).pin_dir(Digest.parse(digest))
    return {Layout.pin_owner(path) for path in directory.iterdir()} if directory.exists() else set()


def test_a_direct_task_is_pulled_by_the_nodes_agent_and_a_pod_then_starts_from_its_cache(
    cluster: Cluster, upstream: Registry, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    image = images.busybox(data_size=4 << 20)
    push(upstream, "agent/app", "1", image)
    node = cluster.nodes[0].name
    name = f"{upstream.host}/agent/app"
    before = len(upstream.requests())
    put_task(kube, node, name, [{"tag": "1", "version": 0, "pullPolicy": {"timeoutSeconds": 60}}])

    status = wait_phase(kube, node, name, "1", ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", status
    assert status["imageID"] == image.digest and status["progress"] == 100 and status["version"] == 0
    assert status["startTime"] <= status["completionTime"]
    node_status = nodeimage(kube, node)["status"]
    assert node_status["desired"] >= 1 and node_status["succeeded"] >= 1
    fetched = upstream.blob_gets("agent/app", since=before)
    assert sorted(fetched) == sorted(b.digest for b in image.blobs), "each blob fetched upstream once"
    proxy = nodes[node]
    assert len(proxy.agent_pids()) == 1, "one agent per node, not one per worker"
    assert all(pins(proxy.cache_dir, b.digest) == {f"nodeimage/{name}:1"} for b in image.blobs)
    assert proxy.metric("imagewarm_agent_pulls_total", result="succeeded") >= 1
    # Pulling, progress and Succeeded: coalesced (a pull this fast is one write), never one per chunk.
    assert 1 <= proxy.metric("imagewarm_agent_status_writes_total") <= 10
    assert proxy.metric("imagewarm_agent_warmed_bytes_total") >= sum(b.size for b in image.blobs)

    # The real kubelet of that node pulls the rewritten image from its own node's proxy: no upstream.
    hits = proxy.metric("imagewarm_proxy_cache_hit_bytes_total")
    pod = run_pod(cluster, f"{nodes.prefix}/{registry_segment(upstream.host)}/agent/app:1", node)
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
    assert upstream.blob_gets("agent/app", since=before) == fetched, "the pod's pull fetched nothing upstream"
    assert proxy.metric("imagewarm_proxy_cache_hit_bytes_total") > hits
    cluster.kubectl("delete", "pod", pod["metadata"]["name"], "--wait=false")

    # The task leaves the spec: its status goes, and so do its pins.
    remove_image(kube, node, name)
    eventually(lambda: tag_status(kube, node, name, "1") is None, "the removed task's status dropped")
    eventually(lambda: not any(pins(proxy.cache_dir, b.digest) for b in image.blobs), "unpinned")


def test_failures_end_with_a_message_that_says_what_failed_and_what_to_do(
    cluster: Cluster,
    upstream: Registry,
    nodes: NodeProxies,
    kube: Kube,
    images: ImageBuilder,
    registry_factory,
) -> None:
    node = cluster.nodes[1].name
    image = images.synthetic(layers=1, layer_size=100_000, seed=131)
    push(upstream, "agent/exists", "1", image)
    missing = f"{upstream.host}/agent/exists"
    put_task(kube, node, missing, [{"tag": "nope", "pullPolicy": {"backoffLimit": 1, "timeoutSeconds": 30}}])

    stopped = registry_factory()
    push(stopped, "agent/gone", "1", image)
    stopped.stop()
    unreachable = f"{stopped.host}/agent/gone"
    put_task(kube, node, unreachable, [{"tag": "1", "pullPolicy": {"backoffLimit": 0}}])

    failed = wait_phase(kube, node, missing, "nope", ("Succeeded", "Failed"))
    assert failed["phase"] == "Failed"
    assert "manifest unknown" in failed["message"] and "check the repository and tag" in failed["message"]
    assert "after 2 attempts (backoffLimit 1)" in failed["message"]
    assert failed["completionTime"] and "imageID" not in failed

    # The proxy does not serve a registry it was not given: it says so.
    refused = wait_phase(kube, node, unreachable, "1", ("Succeeded", "Failed"))
    assert refused["phase"] == "Failed" and "after 1 attempt (backoffLimit 0)" in refused["message"]
    assert "403" in refused["message"] and "does not serve this registry" in refused["message"]
    assert nodes[node].metric("imagewarm_agent_pulls_total", result="retried") >= 1
    assert nodes[node].metric("imagewarm_agent_pulls_total", result="failed") >= 2
    for name in (missing, unreachable):
        remove_image(kube, node, name)


def test_an_unreachable_upstream_fails_the_task_after_its_retries(
    cluster: Cluster, upstream: Registry, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    node = cluster.nodes[1].name
    image = images.synthetic(layers=1, layer_size=100_000, seed=132)
    push(upstream, "agent/down", "1", image)
    name = f"{upstream.host}/agent/down"
    upstream.stop()
    try:
        put_task(kube, node, name, [{"tag": "1", "pullPolicy": {"backoffLimit": 1, "timeoutSeconds": 30}}])
        failed = wait_phase(kube, node, name, "1", ("Succeeded", "Failed"))
    finally:
        upstream.start()
    assert failed["phase"] == "Failed" and "after 2 attempts" in failed["message"]
    assert "could not reach" in failed["message"] and "retry when it is back" in failed["message"]
    remove_image(kube, node, name)


def test_a_timed_out_attempt_is_resumed_by_the_next_and_the_blob_is_fetched_once(
    cluster: Cluster, upstream: Registry, slow: SlowLink, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    # A 12 MiB layer behind a 4 MiB/s link takes 3 s; every attempt may take 1 s. The proxy's fill
    # goes on when an attempt gives up, and the next attempt joins it: the task finishes, and the
    # upstream sends the layer once.
    image = images.synthetic(layers=1, layer_size=12 << 20, seed=133)
    push(upstream, "agent/big", "1", image)
    node = cluster.nodes[1].name
    name = f"{slow.host}/agent/big"
    before = len(upstream.requests())
    put_task(kube, node, name, [{"tag": "1", "pullPolicy": {"timeoutSeconds": 1, "backoffLimit": 10}}])
    done = wait_phase(kube, node, name, "1", ("Succeeded", "Failed"))
    assert done["phase"] == "Succeeded", done
    assert done["imageID"] == image.digest
    assert sorted(upstream.blob_gets("agent/big", since=before)) == sorted(b.digest for b in image.blobs)
    assert nodes[node].metric("imagewarm_agent_pulls_total", result="retried") >= 1
    remove_image(kube, node, name)


def test_an_attempt_whose_upstream_connection_breaks_is_resumed_by_the_retry(
    cluster: Cluster, upstream: Registry, slow: SlowLink, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    # Unlike a timeout (the proxy's fill goes on), a reset of the upstream connection ends the fill
    # and fails the attempt. The proxy keeps what arrived, and the retry asks only for the rest.
    image = images.synthetic(layers=1, layer_size=16 << 20, seed=141)
    push(upstream, "agent/cut", "1", image)
    layer = image.layers[0].digest
    node = cluster.nodes[0].name
    proxy = nodes[node]
    name = f"{slow.host}/agent/cut"
    counters = ("imagewarm_proxy_resumed_fills_total", "imagewarm_proxy_resume_fallbacks_total")
    start = {metric: proxy.metric(metric) for metric in counters}
    kept_before = proxy.metric("imagewarm_proxy_interrupted_fills_total", partial="kept")
    retried_before = proxy.metric("imagewarm_agent_pulls_total", result="retried")
    before = len(upstream.requests())
    slow.cut_after(8 << 20, "reset")  # about half the layer (what crosses before it is a few KiB)
    put_task(kube, node, name, [{"tag": "1", "pullPolicy": {"backoffLimit": 3, "timeoutSeconds": 60}}])

    done = wait_phase(kube, node, name, "1", ("Succeeded", "Failed"))
    assert done["phase"] == "Succeeded" and done["imageID"] == image.digest, done
    assert slow.cuts >= 1
    assert proxy.metric("imagewarm_agent_pulls_total", result="retried") > retried_before
    assert proxy.metric("imagewarm_proxy_interrupted_fills_total", partial="kept") == kept_before + 1
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == start[counters[0]] + 1
    assert proxy.metric("imagewarm_proxy_resume_fallbacks_total") == start[counters[1]]
    gets = [
        status
        for method, path, status in upstream.requests()[before:]
        if method == "GET" and path.endswith(f"/blobs/{layer}")
    ]
    # The cut GET (the registry may log it late) and one 206 of the rest: never the whole layer twice.
    assert gets.count(206) == 1 and gets.count(200) <= 1, gets
    assert cached(proxy.cache_dir, layer)
    remove_image(kube, node, name)


def test_an_active_deadline_fails_a_pull_that_cannot_finish_in_time(
    cluster: Cluster, upstream: Registry, slow: SlowLink, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    image = images.synthetic(layers=1, layer_size=16 << 20, seed=134)
    push(upstream, "agent/late", "1", image)
    node = cluster.nodes[0].name
    name = f"{slow.host}/agent/late"
    put_task(
        kube, node, name, [{"tag": "1", "pullPolicy": {"activeDeadlineSeconds": 2, "timeoutSeconds": 600}}]
    )
    failed = wait_phase(kube, node, name, "1", ("Succeeded", "Failed"))
    assert failed["phase"] == "Failed"
    assert failed["message"].startswith("activeDeadlineSeconds (2s) passed after 1 attempt")
    assert "timed out" in failed["message"] and "raise it or timeoutSeconds" in failed["message"]
    remove_image(kube, node, name)


def test_pull_secrets_warm_a_private_image_and_the_password_is_nowhere(
    cluster: Cluster, nodes: NodeProxies, kube: Kube, images: ImageBuilder, auth_registry: Registry
) -> None:
    image = images.synthetic(layers=2, layer_size=200_000, seed=135)
    push(auth_registry, "private/agent", "v1", image)
    username, password = auth_registry.auth
    cluster.kubectl("create", "namespace", RELEASE_NAMESPACE, check=False)
    secret = "imagewarm-pull-e2e-agent"
    cluster.kubectl("-n", RELEASE_NAMESPACE, "delete", "secret", secret, "--ignore-not-found")
    cluster.kubectl(
        "-n", RELEASE_NAMESPACE, "create", "secret", "docker-registry", secret,
        f"--docker-server={auth_registry.host}", f"--docker-username={username}",
        f"--docker-password={password}",
    )  # fmt: skip
    node = cluster.nodes[0].name
    name = f"{auth_registry.host}/private/agent"
    policy = {"backoffLimit": 0, "timeoutSeconds": 30}
    put_task(
        kube,
        node,
        name,
        [{"tag": "v1", "pullPolicy": policy}],
        [{"namespace": RELEASE_NAMESPACE, "name": secret}],
    )
    ok = wait_phase(kube, node, name, "v1", ("Succeeded", "Failed"))
    assert ok["phase"] == "Succeeded" and ok["imageID"] == image.digest, ok

    # The same image with a secret that is not there, and with none at all.
    other = f"{auth_registry.host}/private/agent-other"
    push(auth_registry, "private/agent-other", "v1", image)
    put_task(
        kube,
        node,
        other,
        [{"tag": "v1", "pullPolicy": policy}],
        [{"namespace": RELEASE_NAMESPACE, "name": "absent"}],
    )
    absent = wait_phase(kube, node, other, "v1", ("Succeeded", "Failed"))
    assert absent["phase"] == "Failed"
    assert f"pull secret {RELEASE_NAMESPACE}/absent not found" in absent["message"]
    anonymous = f"{auth_registry.host}/private/agent-anonymous"
    push(auth_registry, "private/agent-anonymous", "v1", image)
    put_task(kube, node, anonymous, [{"tag": "v1", "pullPolicy": policy}])
    refused = wait_phase(kube, node, anonymous, "v1", ("Succeeded", "Failed"))
    assert refused["phase"] == "Failed" and "credentials refused" in refused["message"]

    everything = json.dumps(nodeimage(kube, node)) + nodes[node].log()
    assert password not in everything
    for each in (name, other, anonymous):
        remove_image(kube, node, each)
    cluster.kubectl("-n", RELEASE_NAMESPACE, "delete", "secret", secret, "--ignore-not-found")


def test_warmed_images_are_pinned_and_survive_cache_pressure(
    cluster: Cluster, upstream: Registry, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    # An agent-only node whose proxy may hold 6 MB and evicts every second.
    proxy = nodes.add_agent_node(
        "iw-agent-pins", args=["--max-cache-bytes", "6000000", "--eviction-interval", "1s"]
    )
    warmed = images.synthetic(layers=2, layer_size=2_000_000, seed=136)
    other = images.synthetic(layers=2, layer_size=2_000_000, seed=137)
    push(upstream, "agent/pinned", "1", warmed)
    push(upstream, "agent/unpinned", "1", other)
    name = f"{upstream.host}/agent/pinned"
    put_task(kube, proxy.node, name, [{"tag": "1"}])
    assert wait_phase(kube, proxy.node, name, "1", ("Succeeded", "Failed"))["phase"] == "Succeeded"

    # Another image through the same proxy, unpinned: over the limit, the evictor must make room.
    warm(f"{upstream.host}/agent/unpinned:1", proxy.url)
    eventually(
        lambda: not any(cached(proxy.cache_dir, b.digest) for b in other.layers),
        "the unpinned layers evicted",
    )
    assert all(cached(proxy.cache_dir, b.digest) for b in warmed.blobs), "the warmed image's blobs stay"
    assert proxy.metric("imagewarm_proxy_evictions_total") >= 2

    remove_image(kube, proxy.node, name)
    eventually(lambda: not any(pins(proxy.cache_dir, b.digest) for b in warmed.blobs), "unpinned")


def test_an_agent_killed_mid_pull_resumes_and_fetches_no_verified_blob_again(
    cluster: Cluster, upstream: Registry, slow: SlowLink, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    # Small layers and one 24 MiB layer (6 s behind the slow link): the kill comes after the small
    # ones are verified, in the middle of the big one, which the restarted proxy then resumes.
    image = images.synthetic(layers=3, layer_size=200_000, seed=138)
    big = images.synthetic(layers=1, layer_size=24 << 20, seed=139)
    push(upstream, "agent/killed", "small", image)
    push(upstream, "agent/killed-big", "1", big)
    proxy = nodes.add_agent_node("iw-agent-killed")
    small_name, big_name = f"{slow.host}/agent/killed", f"{slow.host}/agent/killed-big"
    before = len(upstream.requests())
    put_task(kube, proxy.node, small_name, [{"tag": "small"}])
    put_task(kube, proxy.node, big_name, [{"tag": "1"}])
    assert wait_phase(kube, proxy.node, small_name, "small", ("Succeeded",))["imageID"] == image.digest
    pulling = wait_phase(kube, proxy.node, big_name, "1", ("Pulling",))
    eventually(lambda: cached(proxy.cache_dir, big.config.digest), "the big image's config verified")
    partial = Layout(proxy.cache_dir).partial(Digest.parse(big.layers[0].digest))
    eventually(lambda: partial.exists() and partial.stat().st_size >= 8 << 20, "a third of the big layer")
    assert not cached(proxy.cache_dir, big.layers[0].digest)

    proxy.kill()
    proxy.start()
    done = wait_phase(kube, proxy.node, big_name, "1", ("Succeeded", "Failed"))
    assert done["phase"] == "Succeeded" and done["imageID"] == big.digest, done
    assert done["startTime"] == pulling["startTime"], "resumed, not started again"
    assert "already cached" in done["message"]
    fetched = upstream.blob_gets(since=before)
    verified_before_kill = [b.digest for b in image.blobs] + [big.config.digest]
    assert all(fetched.count(digest) == 1 for digest in verified_before_kill), fetched
    # The layer cut off by the kill was never fetched whole again: after the restart only its rest (a
    # 206). (The registry logs a request when it ends: the killed one may not be logged yet.)
    assert fetched.count(big.layers[0].digest) <= 1, fetched
    rests = [
        path
        for method, path, status in upstream.requests()[before:]
        if method == "GET" and status == 206 and path.endswith(f"/blobs/{big.layers[0].digest}")
    ]
    assert len(rests) == 1, upstream.requests()[before:]
    assert proxy.metric("imagewarm_proxy_resumed_fills_total") == 1
    assert wait_phase(kube, proxy.node, small_name, "small", ("Succeeded",))["imageID"] == image.digest
    for name in (small_name, big_name):
        remove_image(kube, proxy.node, name)


def test_a_direct_task_with_a_ttl_is_removed_from_the_spec_once_finished(
    cluster: Cluster, upstream: Registry, nodes: NodeProxies, kube: Kube, images: ImageBuilder
) -> None:
    # OpenKruise's low-level use: a tag written without ownerReferences, with ttlSecondsAfterFinished.
    image = images.synthetic(layers=1, layer_size=100_000, seed=140)
    push(upstream, "agent/ttl", "1", image)
    push(upstream, "agent/ttl", "2", image)
    node = cluster.nodes[1].name
    name = f"{upstream.host}/agent/ttl"
    put_task(kube, node, name, [{"tag": "1", "pullPolicy": {"ttlSecondsAfterFinished": 2}}, {"tag": "2"}])
    assert wait_phase(kube, node, name, "1", ("Succeeded",))["imageID"] == image.digest

    def tags() -> list[str]:
        entry = ((nodeimage(kube, node).get("spec") or {}).get("images") or {}).get(name) or {}
        return [t["tag"] for t in entry.get("tags") or []]

    eventually(lambda: tags() == ["2"], "the finished tag with a TTL removed, the other kept", timeout=30)
    eventually(lambda: tag_status(kube, node, name, "1") is None, "its status dropped")
    remove_image(kube, node, name)


def test_an_image_pull_job_over_real_and_agent_only_nodes_then_a_rewritten_pod_starts_from_the_cache(
    cluster: Cluster,
    upstream: Registry,
    nodes: NodeProxies,
    kube: Kube,
    images: ImageBuilder,
    controller: ControllerProcess,
    namespace: str,
    tmp_path: Path,
) -> None:
    """The controller (a real `imagewarm controller`) and the real agents, end to end."""
    image = images.busybox(data_size=3 << 20)
    push(upstream, "agent/job", "1", image)
    written = f"{upstream.host}/agent/job:1"
    name = f"{upstream.host}/agent/job"
    extra = [nodes.add_agent_node(f"iw-agent-job-{i}").node for i in (1, 2)]
    targets = [node.name for node in cluster.nodes] + extra
    before = len(upstream.requests())

    # What every agent reported, seen as it happened: the controller removes a completed job's
    # tasks from the NodeImages (compaction), and their statuses go with them.
    reported: dict[str, dict[str, Any]] = {}

    def record(_kind: str, obj: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        for tag in ((status.get("imageStatuses") or {}).get(name) or {}).get("tags") or []:
            if tag.get("phase") == "Succeeded":
                reported[obj["metadata"]["name"]] = tag

    watcher = Informer(kube, "/apis/imagewarm.io/v1alpha1/nodeimages", handlers=(record,)).start()
    try:
        create_job(kube, namespace, "warm-all", image=written, parallelism=2, selector={"names": targets})
        job = wait_for(
            "the job complete",
            lambda: (
                (j := job_object(kube, namespace, "warm-all")) is not None and condition(j, "Complete") and j
            ),
            timeout=180,
        )
        eventually(lambda: set(reported) >= set(targets), "every target's agent reported Succeeded", 30)
    finally:
        watcher.stop(timeout=1)
    assert job["status"]["succeeded"] == len(targets) and job["status"]["failed"] == 0, job["status"]
    assert all(reported[node]["imageID"] == image.digest for node in targets), reported
    fetched = upstream.blob_gets("agent/job", since=before)
    # Each node's proxy has its own cache and no peers here: each blob at most once per node (the
    # busybox layer may be cached on a node already), the image's own config and data layer on each.
    counts = {digest: fetched.count(digest) for digest in set(fetched)}
    assert set(counts) <= {b.digest for b in image.blobs} and max(counts.values()) <= len(targets)
    assert counts[image.config.digest] == counts[image.layers[-1].digest] == len(targets)

    # A pod written with the upstream image: the webhook rewrites it to localhost:<port>, and the
    # kubelet pulls it from its node's proxy, which fetches nothing upstream.
    webhook = Stack.webhook_only(cluster, workdir=tmp_path / "webhook", proxy_port=nodes.port)
    try:
        pod = run_pod_in(cluster, namespace, written, cluster.nodes[1].name)
    finally:
        webhook.stop()
    assert (
        pod["spec"]["containers"][0]["image"]
        == f"{nodes.prefix}/{registry_segment(upstream.host)}/agent/job:1"
    )
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
    assert upstream.blob_gets("agent/job", since=before) == fetched, "the pod's pull fetched nothing upstream"


def run_pod_in(cluster: Cluster, namespace: str, image: str, node: str) -> dict[str, Any]:
    pod_name = "from-cache"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": namespace},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": image, "command": ["sh", "-c", "sleep 3600"]}],
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
    waited = cluster.kubectl(
        "-n", namespace, "wait", "--for=condition=Ready", f"pod/{pod_name}", "--timeout=90s", check=False
    )
    stored: dict[str, Any] = json.loads(
        cluster.kubectl("-n", namespace, "get", "pod", pod_name, "-o", "json").stdout
    )
    assert waited.returncode == 0, f"pod not Ready: {json.dumps(stored['status'], indent=1)[-1500:]}"
    return stored
