"""`imagewarm demo`'s steps on a running local cluster, through the product installed as users
install it: the product image on the nodes, `helm install` of charts/imagewarm (the harness values
of localcluster.chart), the upstream registry behind a throttled link (localcluster.slowlink).

    outcome = steps(cluster, upstream, Demo(), teardown, image_size=256 << 20)

Each step starts a pod from a one-replica Deployment pinned to a node and measures it:

1. cold: node 1 pulls the sample image through its node proxy, from the throttled upstream;
2. an ImagePullJob warms node 2 (its proxy takes the blobs from node 1's: peers);
3. warm: a pod on node 2 starts from its node's cache, no upstream blob fetched;
4. a SidecarSet: the controller pre-pulls its image on the nodes running matching pods (an
   ImagePullJob), then a new pod gets the sidecar injected and pulls it from the cache;
5. peer: node 2's proxy is taken down (its DaemonSet pod removed: the node leaves the DaemonSet's
   nodeSelector) and the image removed from node 2's runtime; a pod there starts through the peer
   proxy containerd's hosts.toml lists after the local one; then the proxy comes back;
6. offline: the upstream stops; a pod on node 1 (image removed from its runtime) starts from cache.

What it creates is removed by `teardown` (an ExitStack the caller closes, also on Ctrl-C).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests

from imagewarm.api import ORIGINAL_IMAGES_ANNOTATION
from imagewarm.errors import ImagewarmError
from imagewarm.reference import parse
from localcluster import scrape
from localcluster.containerd import SNAPSHOTTER

if TYPE_CHECKING:
    from imagewarm.kube import Kube
    from localcluster.chart import Release
    from localcluster.cluster import Cluster, Node
    from localcluster.images import Image
    from localcluster.registry import Registry

NAMESPACE = "imagewarm-demo"
APP_LABEL = "demo.imagewarm.io/app"  # every sample pod; the SidecarSet selects it
PROXY_LABEL = "demo.imagewarm.io/proxy"  # the proxy DaemonSet's nodeSelector: on | off
SIDECARSET = "imagewarm-demo-logger"
GROUP = "/apis/imagewarm.io/v1alpha1"
POD_TIMEOUT = 180.0


class StepError(ImagewarmError, RuntimeError):
    """A step did not do what it claims; the message says what was seen."""


class Demo:
    """Progress lines with the elapsed time, bars, and the step in progress (for failure reports)."""

    def __init__(self, out: Callable[[str], None] | None = None, *, tty: bool | None = None) -> None:
        self.started = time.monotonic()
        self.out = out or (lambda line: print(line, flush=True))
        self.tty = sys.stdout.isatty() if tty is None and out is None else bool(tty)
        self.phases: list[tuple[str, float]] = []
        self.step = ""
        self.waited = 0.0  # seconds spent waiting for another local cluster (not the demo's own time)
        self._bar_shown = -1

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        self._end_bar()
        self.out(f"[{self.elapsed():6.1f}s] {message}")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.say(f"== {name}")
        self.step = name
        began = time.monotonic()
        yield
        self._end_bar()
        self.phases.append((name, time.monotonic() - began))

    def bar(self, label: str, done: float, total: float, detail: str = "") -> None:
        """A progress bar: redrawn in place on a terminal, else a line at every 25%."""
        fraction = min(1.0, done / total) if total > 0 else 1.0
        filled = int(fraction * 30)
        drawn = "#" * filled + "." * (30 - filled)
        text = f"[{self.elapsed():6.1f}s]   {label} [{drawn}] {fraction:4.0%} {detail}"
        if self.tty:
            sys.stdout.write("\r" + text.ljust(110)[:110])
            sys.stdout.flush()
            self._bar_shown = 0
        elif int(fraction * 4) > self._bar_shown:
            self._bar_shown = int(fraction * 4)
            self.out(text)

    def _end_bar(self) -> None:
        if self.tty and self._bar_shown >= 0:
            sys.stdout.write("\n")
        self._bar_shown = -1


@dataclass
class StartedPod:
    """A sample pod that reached Running and Ready, and how its start went."""

    step: str
    name: str
    node: str
    created: datetime.datetime
    images: dict[str, str]  # container -> image as stored (rewritten)
    original: dict[str, str]  # the webhook's annotation
    start_seconds: float  # PodScheduled -> ContainersReady (the API's second resolution)
    pulls: dict[str, str]  # container -> the kubelet's Pulled event ("2.31s" or "already present")
    upstream_blob_gets: int  # upstream blob GETs while it started
    served_from: str


@dataclass
class DemoResult:
    """What the steps showed, for the summary and the tests; `ok` when every claim held."""

    pods: list[StartedPod] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    views: dict[str, str] = field(default_factory=dict)  # `kubectl get` of the imagewarm kinds
    checks: list[tuple[str, bool]] = field(default_factory=list)
    # The sidecar image's NodeImage status entry on each node, read just before the pod was created.
    prepulled: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(held for _, held in self.checks)

    def pod(self, step: str) -> StartedPod:
        return next(p for p in self.pods if p.step == step)


# --- helpers on the cluster -------------------------------------------------------------------


def _apply(cluster: Cluster, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def _deployment(name: str, image: str, node: str) -> dict[str, Any]:
    labels = {"app": name, APP_LABEL: "sample"}
    command = "echo hello from $NODE: $(du -sh /imagewarm | cut -f1) of data; sleep 3600"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "containers": [
                        {
                            "name": "app",
                            "image": image,
                            "command": ["sh", "-c", command],
                            "env": [
                                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
                            ],
                        }
                    ],
                },
            },
        },
    }


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _when(pod: dict[str, Any], condition: str) -> datetime.datetime:
    for c in pod["status"]["conditions"]:
        if c["type"] == condition:
            return _timestamp(c["lastTransitionTime"])
    raise StepError(f"pod {pod['metadata']['name']} has no {condition} condition")


_PULLED = re.compile(r"Successfully pulled image \"[^\"]+\" in ([0-9.hmsµun]+)")
_GO_DURATION_PART = re.compile(r"([0-9.]+)(h|ms|µs|us|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}


def go_duration(text: str) -> float:
    """Seconds in a Go duration as the kubelet prints it (`2m13.641s`, `590ms`)."""
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def pull_times(events: list[dict[str, Any]]) -> dict[str, str]:
    """Container -> the kubelet's own measure of its pull, from a pod's `Pulled` events: "2.31s", or
    "already present" when the node had the image."""
    found = {}
    for event in events:
        path = (event.get("involvedObject") or {}).get("fieldPath", "")
        container = re.sub(r"^spec\.(?:init)?[cC]ontainers\{(.*)\}$", r"\1", path)
        m = _PULLED.search(event.get("message", ""))
        if m:
            found[container] = f"{go_duration(m.group(1)):.2f}s"
        elif "already present" in event.get("message", ""):
            found[container] = "already present"
    return found


def _pulls(kube: Kube, pod: str) -> dict[str, str]:
    selector = f"involvedObject.name={pod},reason=Pulled"
    return pull_times(kube.get(f"/api/v1/namespaces/{NAMESPACE}/events", fieldSelector=selector)["items"])


def _counters(upstream: str) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        "hit": ("imagewarm_proxy_cache_hit_bytes_total", {"kind": "blob"}),
        "miss": ("imagewarm_proxy_cache_miss_bytes_total", {"kind": "blob"}),
        # The metric counts what a fetch received, from the registry or from a peer: this registry's.
        "upstream": ("imagewarm_proxy_upstream_bytes_total", {"registry": upstream}),
        "peer_blobs": ("imagewarm_proxy_peer_fetches_total", {"result": "hit"}),
    }


class ProxyCounters:
    """The proxies' byte counters summed over the demo, across a proxy's restart (which starts its
    counters from zero): `retire(node)` banks a proxy's values before it goes down."""

    def __init__(self, urls: dict[str, str], upstream: str = "") -> None:
        self.urls = urls
        self.counters = _counters(upstream)
        self.banked = dict.fromkeys(self.counters, 0.0)

    def read(self, node: str) -> dict[str, float]:
        samples = scrape.samples(self.urls[node])
        return {
            key: sum(
                v
                for n, found, v in samples
                if n == name and all(found.get(k) == x for k, x in labels.items())
            )
            for key, (name, labels) in self.counters.items()
        }

    def retire(self, node: str) -> None:
        for key, value in self.read(node).items():
            self.banked[key] += value

    def total(self) -> dict[str, float]:
        result = dict(self.banked)
        for node in self.urls:
            for key, value in self.read(node).items():
                result[key] += value
        return result


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def forget_image(cluster: Cluster, image: Image, nodes: list[str] | None = None) -> None:
    """Remove every name of `image` from the nodes' runtimes (all by default) and wait until its
    largest layer has left their content stores, so the next pod there pulls it. The CRI keeps an
    image under its tag, its digest and its ID: removing only the tag would leave the blobs; and a
    container of a pod just deleted keeps them until the kubelet has removed it."""
    layer = max(image.blobs, key=lambda b: b.size).digest
    top = chain_ids(image)[-1]
    for node in cluster.nodes:
        if nodes is not None and node.name not in nodes:
            continue

        def gone(node: Node = node) -> bool:
            listing = node.containerd.ctr("images", "ls", namespace="k8s.io").stdout.splitlines()[1:]
            names = [line.split()[0] for line in listing if image.digest in line.split()[1:3]]
            if names:
                node.containerd.ctr("images", "rm", "--sync", *names, namespace="k8s.io")
            content = node.containerd.ctr("content", "ls", "-q", namespace="k8s.io").stdout.split()
            # The unpacked layers too: containerd fetches no layer whose snapshot it still has (a
            # deleted pod's container holds them until the kubelet removes it; then they can go).
            snapshots = node.containerd.ctr(
                "snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace="k8s.io"
            )
            if top in snapshots.stdout:
                node.containerd.ctr(
                    "snapshots", "--snapshotter", SNAPSHOTTER, "rm", top, namespace="k8s.io", check=False
                )
                return False
            return layer not in content

        _eventually(f"{image.digest}'s blobs gone from {node.name}'s runtime", gone, 60, interval=1)


def chain_ids(image: Image) -> list[str]:
    """The ChainIDs of the image's layers (OCI image spec): what containerd names their snapshots."""
    chain: list[str] = []
    for diff_id in image.config_json()["rootfs"]["diff_ids"]:
        if chain:
            diff_id = "sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest()
        chain.append(diff_id)
    return chain


def _eventually(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StepError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- the steps --------------------------------------------------------------------------------


class _Run:
    """State shared by the steps."""

    def __init__(
        self, cluster: Cluster, upstream: Registry, demo: Demo, teardown: ExitStack, link_rate: int
    ) -> None:
        from imagewarm.kube import Kube
        from localcluster.slowlink import SlowLink

        self.cluster, self.upstream, self.demo, self.teardown = cluster, upstream, demo, teardown
        self.kube = Kube.from_kubeconfig(cluster.kubeconfig)
        host, port = upstream.host.rsplit(":", 1)
        self.link = SlowLink(host, int(port), link_rate).start()
        teardown.callback(self.link.stop)
        self.nodes = [node.name for node in cluster.nodes]
        self.outcome = DemoResult()
        self.release: Release | None = None
        self.counters = ProxyCounters({})

    def check(self, claim: str, held: bool) -> None:
        self.outcome.checks.append((claim, held))
        self.demo.say(f"{'ok' if held else 'FAILED'}: {claim}")

    def written(self, repository: str) -> str:
        """An image as users write it: the upstream, reached through the throttled link."""
        return f"{self.link.host}/{repository}:1"

    def pods_of(self, app: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kube.get(
            f"/api/v1/namespaces/{NAMESPACE}/pods", labelSelector=f"app={app}"
        )["items"]
        return items

    def start_pod(
        self,
        step: str,
        app: str,
        image: str,
        node: str,
        served_from: str,
        bar: Callable[[], None] | None = None,
    ) -> StartedPod:
        """A one-replica Deployment `app` on `node`; returns its pod once Ready."""
        since = len(self.upstream.requests()) if self.upstream.running else 0
        _apply(self.cluster, _deployment(app, image, node))

        def ready() -> dict[str, Any] | None:
            if bar is not None:
                bar()
            pods = [p for p in self.pods_of(app) if not p["metadata"].get("deletionTimestamp")]
            return pods[0] if pods and _ready(pods[0]) else None

        try:
            pod: dict[str, Any] = _eventually(f"pod of {app} Ready on {node}", ready, POD_TIMEOUT)
        except StepError:
            described = self.cluster.kubectl(
                "describe", "pods", "-n", NAMESPACE, "-l", f"app={app}", check=False
            )
            raise StepError(
                f"the pod of {app} did not become Ready on {node}:\n{described.stdout[-3000:]}"
            ) from None
        name = pod["metadata"]["name"]
        gets = len(self.upstream.blob_gets(since=since)) if self.upstream.running else 0
        started = StartedPod(
            step=step,
            name=name,
            node=pod["spec"]["nodeName"],
            created=_timestamp(pod["metadata"]["creationTimestamp"]),
            images={c["name"]: c["image"] for c in pod["spec"]["containers"]},
            original=json.loads(
                (pod["metadata"].get("annotations") or {}).get(ORIGINAL_IMAGES_ANNOTATION, "{}")
            ),
            start_seconds=(_when(pod, "ContainersReady") - _when(pod, "PodScheduled")).total_seconds(),
            pulls=_eventually(f"the Pulled events of {name}", lambda: _pulls(self.kube, name), 15),
            upstream_blob_gets=gets,
            served_from=served_from,
        )
        self.outcome.pods.append(started)
        log = self.cluster.kubectl("logs", "-n", NAMESPACE, name, "-c", "app", check=False).stdout.strip()
        self.demo.say(
            f"pod {name} Ready on {started.node} in {started.start_seconds:.0f}s "
            f"(pull {started.pulls.get('app', '?')}; image {started.images['app']}): {log}"
        )
        return started

    def node_image_tag(self, node: str, image: str) -> dict[str, Any]:
        ref = parse(image)
        status = self.kube.get(f"{GROUP}/nodeimages/{node}").get("status") or {}
        entry = (status.get("imageStatuses") or {}).get(f"{ref.registry}/{ref.repository}") or {}
        return next((t for t in entry.get("tags") or [] if t.get("tag") == ref.tag), {})

    def follow_node_images(self, nodes: list[str], image: str, size: int, label: str) -> None:
        """Bars from the nodes' NodeImage status until `image` Succeeded on each; raises on Failed."""
        done: set[str] = set()

        def check() -> bool:
            for node in nodes:
                tag = self.node_image_tag(node, image)
                phase = tag.get("phase", "Waiting")
                if phase == "Failed":
                    raise StepError(f"{node} failed to pull {image}: {tag.get('message')}")
                if node not in done:
                    percent = 100 if phase == "Succeeded" else int(tag.get("progress") or 0)
                    self.demo.bar(f"{label} {node}", percent, 100, f"{phase} of {_mib(size)}")
                    if phase == "Succeeded":
                        done.add(node)
            return done == set(nodes)

        _eventually(f"{image} Succeeded on {', '.join(nodes)} (NodeImage status)", check, POD_TIMEOUT)


def steps(
    cluster: Cluster,
    upstream: Registry,
    demo: Demo,
    teardown: ExitStack,
    *,
    image_size: int,
    sidecar_size: int = 16 << 20,
    link_rate: int = 25_000_000,
) -> DemoResult:
    """The demo's steps on a running 2-node `cluster` with a running `upstream` (which the last step
    stops), the upstream behind a `link_rate` bytes/s link (25 MB/s = 200 Mbit/s). Installs the
    release (removed by `teardown`, with every object made here). Raises StepError (or a helm,
    kubectl or image error) when a step fails; `DemoResult.checks` records each claim it verified."""
    from localcluster.images import ImageBuilder, push
    from localcluster.productimage import build_product_image, import_into

    if len(cluster.nodes) < 2:
        raise StepError("the demo needs 2 nodes (one to warm from the other)")
    run = _Run(cluster, upstream, demo, teardown, link_rate)

    with demo.phase("sample images pushed to the upstream"):
        from localcluster import binaries

        builder = ImageBuilder(binaries.cache_root() / "images")
        sample = builder.busybox(data_size=image_size)
        sidecar = builder.busybox(data_size=sidecar_size)
        for repository, image in (("demo/app", sample), ("demo/logger", sidecar)):
            push(upstream, repository, "1", image)
            forget_image(cluster, image)  # a cold start is cold, whatever ran here before
            teardown.callback(forget_image, cluster, image)  # and the next user's too
        demo.say(
            f"{run.written('demo/app')}: {_mib(sample.size)}; {run.written('demo/logger')}: "
            f"{_mib(sidecar.size)}; upstream {upstream.host} behind a {link_rate * 8 / 1e6:.0f} Mbit/s link"
        )

    with demo.phase("product image built and imported into the nodes"):
        product = build_product_image(progress=lambda m: demo.say(f"image: {m}"))
        import_into(cluster, product)
        demo.say(f"{product.reference} ({_mib(product.compressed_size)}) on {', '.join(run.nodes)}")

    with demo.phase("helm install charts/imagewarm"):
        _install(run, product.reference)

    _cold_warm_and_sidecar(run, sample, sidecar)
    _peer_and_offline(run, sample)
    _summarise(run, sample)
    return run.outcome


def _install(run: _Run, image: str) -> None:
    from localcluster.chart import NAMESPACE as RELEASE_NAMESPACE
    from localcluster.chart import Release, harness_values

    cluster = run.cluster
    cache_root = cluster.workdir / "demo-cache"
    values = harness_values(
        image=image, certs_root=cluster.certs_root, cache_root=cache_root, insecure_upstreams=[run.link.host]
    )
    values["proxy"]["nodeSelector"] = {PROXY_LABEL: "on"}
    for node in run.nodes:
        cluster.kubectl("label", "node", node, f"{PROXY_LABEL}=on", "--overwrite")
    release = Release(cluster, cluster.workdir / "demo-release")
    run.release = release

    def uninstall() -> None:
        cluster.helm("uninstall", "imagewarm", "--namespace", RELEASE_NAMESPACE, "--wait", check=False)
        cluster.kubectl(
            "delete", "namespace", RELEASE_NAMESPACE, "--wait=false", "--ignore-not-found", check=False
        )
        for kind in ("nodeimages", "cachedimages"):
            cluster.kubectl("delete", kind, "--all", "--wait=false", check=False)
        for node in run.nodes:
            cluster.kubectl("label", "node", node, f"{PROXY_LABEL}-", check=False)
        shutil.rmtree(cache_root, ignore_errors=True)

    run.teardown.callback(uninstall)
    began = time.monotonic()
    release.install(values, timeout="150s")
    pods = [p for c in ("proxy", "webhook", "controller") for p in release.pods(c)]
    run.demo.say(f"release imagewarm installed in {time.monotonic() - began:.0f}s: {len(pods)} pods Ready")
    for pod in pods:
        run.demo.say(f"  {pod['metadata']['name']:<40} {pod['spec']['nodeName']}")
    run.counters = ProxyCounters({n.name: release.proxy_url(n.ip) for n in cluster.nodes}, run.link.host)
    cluster.kubectl("create", "namespace", NAMESPACE)

    def remove_demo_objects() -> None:
        # Before the release goes: the controller's finalizers must see the jobs deleted.
        cluster.kubectl("delete", "sidecarset", SIDECARSET, "--ignore-not-found", check=False)
        for namespace in (NAMESPACE, RELEASE_NAMESPACE):  # the SidecarSet's pre-pull jobs are there
            cluster.kubectl("delete", "imagepulljobs", "--all", "-n", namespace, "--timeout=30s", check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--timeout=60s", check=False)

    run.teardown.callback(remove_demo_objects)


def _cold_warm_and_sidecar(run: _Run, sample: Image, sidecar: Image) -> None:
    cluster, demo, kube = run.cluster, run.demo, run.kube
    first, second = run.nodes[0], run.nodes[1]
    image = run.written("demo/app")

    with demo.phase(f"cold: a Deployment's pod on {first}, pulled through its node proxy from the upstream"):
        start = run.counters.read(first)["upstream"]
        bar = lambda: demo.bar(  # noqa: E731
            "upstream -> proxy", run.counters.read(first)["upstream"] - start, sample.size, _mib(sample.size)
        )
        cold = run.start_pod("cold", "sample-cold", image, first, "upstream (throttled)", bar)
        rewritten = cold.images["app"]
        run.check(
            f"the webhook rewrote {image} to {rewritten}",
            rewritten.startswith("localhost:") and cold.original == {"app": image},
        )
        fetched = run.upstream.blob_gets("demo/app")
        run.check(
            f"{first}'s proxy fetched each blob from the upstream once ({len(fetched)} blobs)",
            len(fetched) == len(set(fetched)) and max(sample.blobs, key=lambda b: b.size).digest in fetched,
        )

    with demo.phase(f"an ImagePullJob warms {second} (progress from its NodeImage)"):
        since = len(run.upstream.requests())
        job = {
            "apiVersion": "imagewarm.io/v1alpha1",
            "kind": "ImagePullJob",
            "metadata": {"name": "sample-warm", "namespace": NAMESPACE},
            "spec": {"image": image, "selector": {"names": [second]}, "completionPolicy": {"type": "Always"}},
        }
        _apply(cluster, job)
        run.follow_node_images([second], image, sample.size, "warming")
        status = _eventually(
            "the ImagePullJob's status: succeeded",
            lambda: (
                (
                    kube.get(f"{GROUP}/namespaces/{NAMESPACE}/imagepulljobs/sample-warm").get("status") or {}
                ).get("succeeded")
                == 1
            ),
            30,
        )
        gets = run.upstream.blob_gets(since=since)
        data = max(sample.blobs, key=lambda b: b.size)
        run.check(
            f"{second} took the {_mib(data.size)} data layer from {first}'s proxy (a peer), not the upstream "
            f"({len(gets)} upstream blob GETs: blobs {first}'s runtime already had, so its proxy never did)",
            bool(status) and data.digest not in gets,
        )

    with demo.phase(f"warm: a pod on {second} starts from its node's cache"):
        before = run.counters.read(second)
        warm = run.start_pod("warm", "sample-warm", image, second, "node cache")
        after = run.counters.read(second)
        run.check(
            f"the warm pod's pull: {warm.upstream_blob_gets} upstream blob GETs, "
            f"{_mib(after['hit'] - before['hit'])} from {second}'s cache",
            warm.upstream_blob_gets == 0
            and after["hit"] - before["hit"] >= image_data(sample)
            and after["miss"] == before["miss"],
        )

    with demo.phase("a SidecarSet: its image pre-pulled on the nodes, then injected into a new pod"):
        logger = run.written("demo/logger")
        sidecarset = {
            "apiVersion": "imagewarm.io/v1alpha1",
            "kind": "SidecarSet",
            "metadata": {"name": SIDECARSET},
            "spec": {
                "selector": {"matchLabels": {APP_LABEL: "sample"}},
                "namespace": NAMESPACE,
                "containers": [{"name": "logger", "image": logger, "command": ["sh", "-c", "sleep 3600"]}],
            },
        }
        _apply(cluster, sidecarset)

        def prepull_job() -> dict[str, Any] | None:
            from localcluster.chart import NAMESPACE as RELEASE_NAMESPACE

            jobs = kube.get(f"{GROUP}/namespaces/{RELEASE_NAMESPACE}/imagepulljobs")["items"]
            return next((j for j in jobs if j["spec"]["image"] == logger), None)

        found = _eventually("the controller's pre-pull ImagePullJob for the SidecarSet", prepull_job, 30)
        demo.say(f"the controller created ImagePullJob {found['metadata']['name']} for {logger}")
        run.follow_node_images([first, second], logger, sidecar.size, "pre-pull")
        run.outcome.prepulled = {n: run.node_image_tag(n, logger) for n in (first, second)}
        prepulled = all(t.get("phase") == "Succeeded" for t in run.outcome.prepulled.values())
        injected = run.start_pod("sidecar", "sample-sidecar", image, first, "node cache (sidecar pre-pulled)")
        run.check(f"the sidecar image was pre-pulled on {first} and {second} before the pod", prepulled)
        run.check(
            f"the new pod got the sidecar injected ({injected.images.get('logger', 'none')}), "
            f"its pull {injected.pulls.get('logger', '?')} with "
            f"{injected.upstream_blob_gets} upstream blob GETs",
            "logger" in injected.images and injected.upstream_blob_gets == 0,
        )


def image_data(image: Image) -> int:
    """The size of an image's largest layer (the sample's data): what a pull must move."""
    return max(b.size for b in image.layers)


def _peer_and_offline(run: _Run, sample: Image) -> None:
    cluster, demo = run.cluster, run.demo
    first, second = run.nodes[0], run.nodes[1]
    image = run.written("demo/app")
    assert run.release is not None
    release = run.release
    urls = run.counters.urls

    with demo.phase(f"node proxy down: a pod on {second} starts through the peer proxy"):
        run.counters.retire(second)
        cluster.kubectl("label", "node", second, f"{PROXY_LABEL}=off", "--overwrite")

        def proxy_gone() -> bool:
            if any(p["spec"]["nodeName"] == second for p in release.pods("proxy")):
                return False
            try:
                requests.get(f"{urls[second]}/readyz", timeout=1)
            except requests.ConnectionError:
                return True
            return False

        _eventually(f"{second}'s proxy pod gone", proxy_gone, 60)
        demo.say(
            f"{second}'s proxy pod removed (the node left the DaemonSet's nodeSelector): "
            f"{urls[second]} refuses connections"
        )
        for app in ("sample-warm", "sample-sidecar"):
            cluster.kubectl("delete", "deployment", app, "-n", NAMESPACE, check=False)
        _eventually(
            f"the sample pods on {second} gone",
            lambda: (
                not any(
                    p["spec"].get("nodeName") == second
                    for app in ("sample-warm", "sample-sidecar")
                    for p in run.pods_of(app)
                )
            ),
            60,
        )
        forget_image(cluster, sample, [second])
        before = run.counters.read(first)
        peer = run.start_pod("peer", "sample-peer", image, second, f"peer proxy ({first}), node proxy down")
        after = run.counters.read(first)
        served = after["hit"] - before["hit"]
        run.check(
            f"the pod on {second} was served by {first}'s proxy ({_mib(served)} from its cache) "
            f"with {peer.upstream_blob_gets} upstream blob GETs",
            served >= image_data(sample) and peer.upstream_blob_gets == 0,
        )
        cluster.kubectl("label", "node", second, f"{PROXY_LABEL}=on", "--overwrite")

    with demo.phase(f"upstream offline: a pod on {first} starts from its node's cache"):
        run.link.stop()
        run.upstream.stop()
        demo.say(f"upstream registry {run.upstream.host} and its link stopped")
        cluster.kubectl("delete", "deployment", "sample-cold", "-n", NAMESPACE)
        _eventually(f"the sample pod on {first} gone", lambda: not run.pods_of("sample-cold"), 60)
        forget_image(cluster, sample, [first])
        before = run.counters.read(first)
        offline = run.start_pod("offline", "sample-offline", image, first, "node cache, upstream offline")
        served = run.counters.read(first)["hit"] - before["hit"]
        run.check(
            f"the pod on {first} is Running with the upstream stopped: {_mib(served)} from its proxy's "
            f"cache, pulled in {offline.pulls.get('app')}",
            served >= image_data(sample),
        )
        _eventually(
            f"{second}'s proxy back and Ready",
            lambda: any(p["spec"]["nodeName"] == second and _ready(p) for p in release.pods("proxy")),
            90,
        )
        demo.say(f"{second}'s proxy is back")


def _summarise(run: _Run, sample: Image) -> None:
    totals = run.counters.total()
    served = totals["hit"] + totals["miss"]
    ratio = totals["hit"] / served if served else 0.0
    upstream_gets = len(run.upstream.blob_gets("demo/app")) + len(run.upstream.blob_gets("demo/logger"))
    run.outcome.facts = [
        ("sample image", f"{run.written('demo/app')} ({_mib(sample.size)})"),
        ("as the webhook rewrote it", run.outcome.pod("cold").images["app"]),
        ("upstream link", f"{run.link.bytes_per_second * 8 / 1e6:.0f} Mbit/s"),
        ("blob GETs at the upstream (all steps)", str(upstream_gets)),
        ("bytes from the upstream", _mib(totals["upstream"])),
        ("bytes from peer proxies", _mib(max(0.0, totals["miss"] - totals["upstream"]))),
        ("bytes served from the proxies' caches", _mib(totals["hit"])),
        ("bytes served while fetching (misses)", _mib(totals["miss"])),
        ("hit ratio (bytes)", f"{ratio:.0%}"),
        ("blobs a proxy took from a peer", f"{totals['peer_blobs']:.0f}"),
    ]
    for kind, args in (("cachedimages", ()), ("imagepulljobs", ("-A",)), ("nodeimages", ())):
        run.outcome.views[kind] = run.cluster.kubectl("get", kind, *args, check=False).stdout.rstrip()
