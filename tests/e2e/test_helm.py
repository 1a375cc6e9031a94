"""`helm install` of the chart on the real local cluster, with imagewarm's own product image running
on the kubelets: every pod Ready on both nodes, the webhook registered with its caBundle, a
Deployment's pods rewritten and each pulled through its own node's proxy (peers sharing blobs: one
upstream fetch per blob for both nodes), mirror mode pulling an unrewritten image through the proxy,
an ImagePullJob through the chart's controller warming node 2, `helm upgrade` with no pod creation
failing during the rollout, `helm uninstall` leaving no webhook.

The tests run in order on one release (module fixture): install, use, upgrade, uninstall.
"""

from __future__ import annotations

import json
import tempfile
import threading
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from imagewarm.reference import registry_segment
from localcluster import scrape
from localcluster.chart import NAMESPACE, PROXY_PORT, RELEASE, Release, harness_values
from localcluster.cluster import Cluster
from localcluster.images import ImageBuilder, push
from localcluster.registry import Registry, start_registry
from tests.e2e.webhook_harness import eventually

pytestmark = pytest.mark.e2e
PREFIX = f"localhost:{PROXY_PORT}"


@pytest.fixture(scope="module")
def upstream(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The registry pods' images come from (rewrite mode), its log counting the blob fetches."""
    registry = start_registry(tmp_path_factory.mktemp("helm-upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def mirrored(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry pulled through the proxy's mirror (its hosts.toml is the proxy's to write)."""
    registry = start_registry(tmp_path_factory.mktemp("helm-mirrored"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> ImageBuilder:
    return ImageBuilder(tmp_path_factory.mktemp("helm-images"))


@pytest.fixture(scope="module")
def values(cluster: Cluster, upstream: Registry, mirrored: Registry) -> dict[str, Any]:
    """The harness values (the product image imported onto both nodes first)."""
    from localcluster.productimage import build_product_image, import_into

    image = build_product_image(progress=cluster.progress)
    import_into(cluster, image)
    return harness_values(
        image=image.reference,
        certs_root=cluster.certs_root,
        cache_root=cluster.workdir / "imagewarm-cache",
        insecure_upstreams=[upstream.host, mirrored.host],
        image_proxy=False,  # these tests count each proxy's manifest requests: only the kubelets'
    )


@pytest.fixture(scope="module")
def release(cluster: Cluster, values: dict[str, Any]) -> Iterator[Release]:
    installed = Release(cluster, cluster.workdir / "helm-release")
    try:
        installed.install(values)
    except Exception:
        print(diagnose(cluster))
        raise
    yield installed
    # Whatever failed: no webhook configuration or release is left for the other tests.
    cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found", check=False)


def diagnose(cluster: Cluster) -> str:
    pods = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False).stdout
    names = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "name", check=False).stdout.split()
    # Every pod's whole log (all containers, the previous instance too) is kept beside the cluster's.
    kept = Path(tempfile.mkdtemp(prefix="imagewarm-diagnosis-"))
    tails = []
    for name in names:
        text = cluster.kubectl("logs", "-n", NAMESPACE, name, "--all-containers", check=False).stdout
        previous = cluster.kubectl("logs", "-n", NAMESPACE, name, "--previous", check=False).stdout
        (kept / f"{name.replace('/', '_')}.log").write_text(f"{previous}\n--- current\n{text}")
        lines = text.splitlines()
        # The agent's and the informers' lines, and every warning, would drown in the tail.
        notable = [
            line
            for line in lines
            if '"imagewarm.proxy.agent' in line
            or '"imagewarm.informer' in line
            or '"level": "warning"' in line
            or '"level": "error"' in line
        ]
        shown = [*notable[-30:], "... last lines:", *lines[-15:]]
        tails.append(f"--- {name}\n" + "\n".join(line[:400] for line in shown))
    logs = "\n".join(tails)
    return f"pods:\n{pods}\nevents:\n{events[-2000:]}\nlogs (whole logs in {kept}):\n{logs}"


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a proxy's samples of `name` whose labels include `labels`."""
    return scrape.metric(url, name, **labels)


def fetched_by(cluster: Cluster, release: Release, node: str, repository: str) -> list[str]:
    """The digests of `repository`'s blobs that `node`'s proxy fetched (from the upstream or a
    peer), as its log says ("blob fetched", one line per blob)."""
    [pod] = [p for p in release.pods("proxy") if p["spec"]["nodeName"] == node]
    text = cluster.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"]).stdout
    digests = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") == "blob fetched" and str(entry.get("image", "")).endswith(f"/{repository}"):
            digests.append(str(entry["digest"]))
    return digests


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return result


def apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def deployment(name: str, namespace: str, image: str, replicas: int, node: str = "") -> dict[str, Any]:
    """`replicas` pods of `image`, at most one per node (on `node` if given)."""
    labels = {"app": name}
    placement = {"nodeSelector": {"kubernetes.io/hostname": node}} if node else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    **placement,
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {"matchLabels": labels},
                                }
                            ]
                        }
                    },
                    "containers": [{"name": "app", "image": image, "command": ["sh", "-c", "sleep 3600"]}],
                },
            },
        },
    }


def running_pods(cluster: Cluster, namespace: str, app: str, count: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        pods = get(cluster, "pods", "-n", namespace, "-l", f"app={app}")["items"]
        return pods if len(pods) == count and all(ready(p) for p in pods) else None

    try:
        result: list[dict[str, Any]] = eventually(check, timeout=120, what=f"{count} Ready pods of {app}")
    except AssertionError:
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "yaml", check=False).stdout
        raise AssertionError(
            f"{count} pods of {app} not Ready:\n{pods[-4000:]}\n{diagnose(cluster)}"
        ) from None
    return result


def proxies(cluster: Cluster, release: Release) -> dict[str, str]:
    """Node name -> that node's proxy URL (it listens on the node's address)."""
    return {node.name: release.proxy_url(node.ip) for node in cluster.nodes}


def test_install_runs_every_pod_on_both_nodes_and_registers_the_webhook(
    cluster: Cluster, release: Release, values: dict[str, Any]
):
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    nodes = {node.name for node in cluster.nodes}
    proxy_pods = release.pods("proxy")
    assert {p["spec"]["nodeName"] for p in proxy_pods} == nodes and len(proxy_pods) == 2
    webhook_pods = release.pods("webhook")
    assert {p["spec"]["nodeName"] for p in webhook_pods} == nodes, (
        "the 2 webhook replicas spread over the nodes"
    )
    controller_pods = release.pods("controller")
    assert len(controller_pods) == 2, "a leader and a standby"
    for pod in proxy_pods + webhook_pods + controller_pods:
        assert ready(pod), pod["metadata"]["name"]
        assert pod["spec"]["containers"][0]["image"] == image

    configuration = get(cluster, "mutatingwebhookconfiguration", RELEASE)
    assert configuration["webhooks"][0]["clientConfig"].get("caBundle"), "the webhook patched its caBundle in"
    for node in cluster.nodes:
        url = release.proxy_url(node.ip)
        assert requests.get(f"{url}/readyz", timeout=5).status_code == 200
        # Each proxy found the other through the Service's EndpointSlices, and lists it in its
        # node's hosts.toml (itself first) for pulls of localhost:7439 images.
        eventually(lambda url=url: metric(url, "imagewarm_proxy_runtime_fallback_peers") == 1, 30, "peers")
        hosts = tomllib.loads((cluster.certs_root / node.name / PREFIX / "hosts.toml").read_text())
        assert next(iter(hosts["host"])) == url
        # The startup taint is not there (the proxy removes it once serving).
        taints = get(cluster, "node", node.name)["spec"].get("taints") or []
        assert not [t for t in taints if t["key"] == "imagewarm.io/proxy-not-ready"]


def test_a_deployment_is_rewritten_and_each_pod_pulls_through_its_own_nodes_proxy(
    cluster: Cluster, release: Release, upstream: Registry, builder: ImageBuilder, namespace: str
):
    image = builder.busybox(data_size=4 << 20)
    push(upstream, "team/web", "1", image)
    written = f"{upstream.host}/team/web:1"
    urls = proxies(cluster, release)

    def manifests(node: str) -> float:
        return metric(urls[node], "imagewarm_proxy_requests_total", route="manifest")

    before = {node: manifests(node) for node in urls}
    apply(cluster, deployment("web", namespace, written, replicas=1))
    [first] = running_pods(cluster, namespace, "web", 1)
    x = first["spec"]["nodeName"]
    [y] = [node for node in urls if node != x]
    assert manifests(x) > before[x], "the first pod's node proxy served its manifest"
    assert manifests(y) == before[y], "the other node's proxy was not asked"

    before = {node: manifests(node) for node in urls}
    peer_hits = metric(urls[y], "imagewarm_proxy_peer_fetches_total", result="hit")
    cluster.kubectl("scale", "deployment", "web", "-n", namespace, "--replicas=2")
    pods = running_pods(cluster, namespace, "web", 2)
    second = next(p for p in pods if p["spec"]["nodeName"] == y)
    assert manifests(y) > before[y], f"the pod on {y} was served by {y}'s proxy"
    assert manifests(x) == before[x], f"{x}'s proxy served no manifest for the pod on {y}"
    # Node y's proxy took the blobs from node x's cache, not from the upstream.
    assert metric(urls[y], "imagewarm_proxy_peer_fetches_total", result="hit") > peer_hits

    rewritten = f"{PREFIX}/{registry_segment(upstream.host)}/team/web:1"
    for pod in (first, second):
        assert pod["spec"]["containers"][0]["image"] == rewritten
        assert json.loads(pod["metadata"]["annotations"]["imagewarm.io/original-images"]) == {"app": written}
        assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
    # Both nodes together fetched each blob upstream once at most (a layer the nodes already held,
    # such as the pause image's busybox, is not fetched at all), and the 4 MiB data layer exactly once.
    fetched = upstream.blob_gets("team/web")
    assert len(fetched) == len(set(fetched)) and set(fetched) <= {b.digest for b in image.blobs}, fetched
    assert max(image.blobs, key=lambda b: b.size).digest in fetched


def test_an_image_pull_job_through_the_charts_controller_warms_node_2(
    cluster: Cluster, release: Release, upstream: Registry, builder: ImageBuilder, namespace: str
):
    image = builder.busybox(data_size=3 << 20)
    push(upstream, "team/warm", "1", image)
    written = f"{upstream.host}/team/warm:1"
    node, other = cluster.nodes[1], cluster.nodes[0]
    url = release.proxy_url(node.ip)
    job = {
        "apiVersion": "imagewarm.io/v1alpha1",
        "kind": "ImagePullJob",
        "metadata": {"name": "warm", "namespace": namespace},
        "spec": {"image": written, "selector": {"names": [node.name]}},
    }
    apply(cluster, job)

    def done() -> dict[str, Any] | None:
        status: dict[str, Any] = get(cluster, "imagepulljob", "warm", "-n", namespace).get("status") or {}
        return status if status.get("succeeded") == 1 or status.get("failed") else None

    try:
        status = eventually(done, timeout=120, what="the ImagePullJob to finish")
    except AssertionError:
        found = cluster.kubectl("get", "imagepulljob,nodeimage", "-A", "-o", "yaml", check=False).stdout
        raise AssertionError(f"{found[-3000:]}\n{diagnose(cluster)}") from None
    assert (status["desired"], status["succeeded"], status.get("failed", 0)) == (1, 1, 0), status
    tags = get(cluster, "nodeimage", node.name)["status"]["imageStatuses"][f"{upstream.host}/team/warm"][
        "tags"
    ]
    assert [(t["tag"], t["phase"]) for t in tags] == [("1", "Succeeded")]
    # Node 2's agent pulled it through node 2's proxy; node 1's proxy fetched nothing for it.
    warmed = set(upstream.blob_gets("team/warm"))
    assert max(image.blobs, key=lambda b: b.size).digest in warmed
    assert metric(url, "imagewarm_agent_pulls_total", result="succeeded") >= 1
    # (Per image, from the proxies' own "blob fetched" lines: a global counter also moves when a
    # runtime fetches an earlier test's layer late.)
    assert fetched_by(cluster, release, other.name, "team/warm") == [], diagnose(cluster)
    assert warmed <= set(fetched_by(cluster, release, node.name, "team/warm"))

    # A pod on node 2 then starts from its proxy's cache: the upstream sends no blob again.
    hits = metric(url, "imagewarm_proxy_cache_hit_bytes_total", kind="blob")
    apply(cluster, deployment("warmed", namespace, written, replicas=1, node=node.name))
    [pod] = running_pods(cluster, namespace, "warmed", 1)
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
    assert sorted(upstream.blob_gets("team/warm")) == sorted(warmed)
    assert metric(url, "imagewarm_proxy_cache_hit_bytes_total", kind="blob") > hits


def test_upgrade_creates_pods_throughout_the_rollout_and_mirrors_unrewritten_pulls(
    cluster: Cluster,
    release: Release,
    values: dict[str, Any],
    mirrored: Registry,
    builder: ImageBuilder,
    namespaces: Callable[[], str],
):
    plain = namespaces()
    created: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    # An image of a registry the proxy serves (the webhook rewrites only those), in pods no node matches.
    never_run = f"{values['insecureUpstreams'][0]}/team/app:1"

    def create_pods() -> None:
        # Pods no node matches: admitted (and rewritten), never run.
        while not stop.is_set():
            name = f"during-{uuid.uuid4().hex[:6]}"
            pod = {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": plain},
                "spec": {"nodeSelector": {"imagewarm.io/test": "nowhere"},
                         "containers": [{"name": "app", "image": never_run}]},
            }  # fmt: skip
            proc = cluster.kubectl("create", "-f", "-", input=json.dumps(pod), check=False, timeout=30)
            if proc.returncode == 0:
                created.append(name)
            else:
                failures.append(proc.stderr)

    proxy_uids = {p["metadata"]["uid"] for p in release.pods("proxy")}
    webhook_uids = {p["metadata"]["uid"] for p in release.pods("webhook")}
    changed = {
        **values,
        "mode": "both",
        "mirror": {"registries": [mirrored.host]},
        "proxy": {**values["proxy"], "tagTTL": "1m"},
        "webhook": {**values["webhook"], "logLevel": "debug"},
    }
    creator = threading.Thread(target=create_pods, daemon=True)
    creator.start()
    try:
        release.upgrade(changed)
        for workload in (f"daemonset/{RELEASE}-proxy", f"deployment/{RELEASE}-webhook"):
            cluster.kubectl("rollout", "status", "-n", NAMESPACE, workload, "--timeout=120s")
    finally:
        stop.set()
        creator.join(60)
    assert not failures, f"pod creations failed during the rollout: {failures[:3]}"
    assert len(created) >= 5, f"only {len(created)} pods were created during the rollout"
    # (A replaced webhook pod may still be draining: Terminating, no longer an endpoint.)
    serving = lambda component: {  # noqa: E731
        p["metadata"]["uid"] for p in release.pods(component) if not p["metadata"].get("deletionTimestamp")
    }
    assert not proxy_uids & serving("proxy"), "every proxy was replaced"
    assert not webhook_uids & serving("webhook")
    stored = get(cluster, "pods", "-n", plain)["items"]
    rewritten = [p for p in stored if p["spec"]["containers"][0]["image"].startswith(f"{PREFIX}/")]
    print(f"{len(created)} pods created during the rollout, {len(rewritten)} rewritten")
    assert len(rewritten) == len(created), "the webhook answered throughout the rollout"
    configuration = get(cluster, "mutatingwebhookconfiguration", RELEASE)
    assert configuration["webhooks"][0]["clientConfig"].get("caBundle"), "the upgrade kept the caBundle"

    # Mirror mode: a pod the webhook skips (opted-out namespace) keeps its image and still pulls
    # through its node's proxy, because containerd reads the hosts.toml the proxy wrote.
    opted_out = namespaces()
    cluster.kubectl("label", "namespace", opted_out, "imagewarm.io/enabled=false")
    image = builder.busybox(data_size=2 << 20)
    push(mirrored, "team/mirror", "1", image)
    written = f"{mirrored.host}/team/mirror:1"
    node = cluster.nodes[1]
    url = release.proxy_url(node.ip)
    hosts = tomllib.loads((cluster.certs_root / node.name / mirrored.host / "hosts.toml").read_text())
    assert next(iter(hosts["host"])) == url and hosts["server"] == mirrored.url
    misses = metric(url, "imagewarm_proxy_cache_miss_bytes_total", kind="blob")
    apply(cluster, deployment("mirror", opted_out, written, replicas=1, node=node.name))
    [pod] = running_pods(cluster, opted_out, "mirror", 1)
    assert pod["spec"]["containers"][0]["image"] == written
    assert "imagewarm.io/original-images" not in (pod["metadata"].get("annotations") or {})
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(image.digest)
    # Every blob the registry sent went through the node's proxy (a layer the node already held is
    # not fetched at all), the 2 MiB data layer among them.
    pulled = metric(url, "imagewarm_proxy_cache_miss_bytes_total", kind="blob") - misses
    fetched = set(mirrored.blob_gets("team/mirror"))
    sizes = {b.digest: b.size for b in image.blobs}
    assert max(image.blobs, key=lambda b: b.size).digest in fetched
    assert pulled == sum(sizes[d] for d in fetched), "the unrewritten pull went through the node's proxy"


def test_uninstall_leaves_no_webhook_and_pods_still_start(
    cluster: Cluster, release: Release, upstream: Registry, builder: ImageBuilder, namespace: str
):
    release.uninstall()
    gone = cluster.kubectl("get", "mutatingwebhookconfiguration", RELEASE, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    # The workloads are gone; their pods go with them (deleted by the garbage collector).
    for kind in ("daemonset", "deployment", "service", "serviceaccount"):
        listed = cluster.kubectl(
            "get", kind, "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
        )
        assert not listed.stdout.strip(), listed.stdout
    eventually(lambda: not any(release.pods(c) for c in ("proxy", "webhook", "controller")), 90, "pods gone")

    image = builder.busybox(data_size=(1 << 20) + 2273)  # its own data layer (seeded by the size)
    push(upstream, "team/after", "1", image)
    cluster.trust_registry(upstream)
    written = f"{upstream.host}/team/after:1"
    apply(cluster, deployment("after", namespace, written, replicas=1))
    [pod] = running_pods(cluster, namespace, "after", 1)
    assert pod["spec"]["containers"][0]["image"] == written
