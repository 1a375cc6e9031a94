"""The whole path on the real cluster: a pod written with its upstream image is rewritten by the
webhook, and the real kubelet pulls it through the node proxy, from the cache once warm, even with
the upstream down. The proxy and webhook run as `imagewarm` processes (localcluster.stack).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from imagewarm.warmup import warm
from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry, start_registry
from localcluster.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def upstream(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def stack(cluster: Cluster, upstream: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A 1s tag TTL: every pull re-checks the tag upstream, so the outage test exercises the fallback.
    running = Stack.start(
        cluster, [upstream], workdir=tmp_path_factory.mktemp("stack"), proxy_args=["--tag-ttl", "1s"]
    )
    yield running
    running.stop()


def run_pod(cluster: Cluster, image: str, node: str, **metadata: Any) -> dict[str, Any]:
    name = f"pt-{uuid.uuid4().hex[:8]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", **metadata},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "app", "image": image, "command": ["sh", "-c", "ls /imagewarm; sleep 3600"]}
            ],
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
    waited = cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=90s", check=False)
    stored: dict[str, Any] = json.loads(cluster.kubectl("get", "pod", name, "-o", "json").stdout)
    assert waited.returncode == 0, f"pod {name} not Ready: {json.dumps(stored['status'], indent=1)[-1500:]}"
    return stored


def logs(cluster: Cluster, pod: dict[str, Any]) -> str:
    deadline = time.monotonic() + 20
    while True:
        out = cluster.kubectl("logs", pod["metadata"]["name"], check=False).stdout.strip()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_pods_on_both_nodes_pull_a_warmed_image_from_the_cache(
    cluster: Cluster, upstream: Registry, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = ImageBuilder(tmp_path_factory.mktemp("images")).busybox(data_size=8 << 20)
    push(upstream, "team/app", "1", image)
    written = f"{upstream.host}/team/app:1"

    assert warm(written, stack.proxy_url).bytes == sum(b.size for b in image.blobs)
    fetched = upstream.blob_gets()
    assert sorted(fetched) == sorted({p for p in fetched}), "each blob is fetched from the upstream once"

    pods = [run_pod(cluster, written, node.name) for node in cluster.nodes]

    proxied = f"{stack.proxy_prefix}/{upstream.host.replace(':', '_')}/team/app:1"
    for pod in pods:
        assert pod["spec"]["containers"][0]["image"] == proxied
        assert json.loads(pod["metadata"]["annotations"]["imagewarm.io/original-images"]) == {"app": written}
        assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
        assert logs(cluster, pod).startswith("synthetic-0-0.bin")
    assert upstream.blob_gets() == fetched, "the nodes' pulls were served from the cache, not the upstream"
    hits = stack.proxy_metric("imagewarm_proxy_cache_hit_bytes_total")
    assert hits >= 2 * (8 << 20), f"both nodes pulled the data layer from the cache ({hits} bytes of hits)"


def test_a_cached_image_starts_on_a_new_node_while_the_upstream_is_down(
    cluster: Cluster, upstream: Registry, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # An image no node has: only the proxy's cache can supply its tag, manifest and blobs.
    image = ImageBuilder(tmp_path_factory.mktemp("images")).busybox(data_size=3 << 20)
    push(upstream, "team/offline", "v2", image)
    warm(f"{upstream.host}/team/offline:v2", stack.proxy_url)
    upstream.stop()
    try:
        time.sleep(1.5)  # past the tag TTL: the proxy must find the upstream down and fall back
        pod = run_pod(cluster, f"{upstream.host}/team/offline:v2", cluster.nodes[1].name)
        assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
        assert logs(cluster, pod).startswith("synthetic-0-0.bin")
        assert stack.proxy_metric("imagewarm_proxy_stale_tag_serves_total") >= 1
    finally:
        upstream.start()


def test_a_pod_that_opts_out_is_not_rewritten_and_pulls_from_the_upstream(
    cluster: Cluster, upstream: Registry, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A data size no other test uses: the seeded bytes depend on the size only, and a node that
    # already holds a layer pulls nothing of it.
    image = ImageBuilder(tmp_path_factory.mktemp("images")).busybox(data_size=(1 << 20) + 1117)
    push(upstream, "team/direct", "1", image)
    cluster.trust_registry(upstream)
    written = f"{upstream.host}/team/direct:1"
    pod = run_pod(cluster, written, cluster.nodes[0].name, annotations={"imagewarm.io/skip": "true"})
    assert pod["spec"]["containers"][0]["image"] == written
    assert "imagewarm.io/original-images" not in pod["metadata"].get("annotations", {})
    assert upstream.blob_gets("team/direct")
