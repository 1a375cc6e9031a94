"""`imagewarm demo`: the main job, end to end on a real local cluster.

1. builds what is missing (Go binaries, cached), starts an upstream registry and a 2-node cluster;
2. starts imagewarm on it: the node proxy, a peer proxy (another node's, in a real cluster) and the
   admission webhook;
3. pushes a runnable image (busybox plus a data layer) to the upstream and warms it into the cache;
4. creates a pod on each node with the image as users write it: the webhook rewrites it to the
   proxy, each kubelet pulls it from the cache, the upstream serves each blob once in all;
5. stops the node proxy, removes the image from the last node and starts a pod there again: the
   runtime falls back to the peer proxy listed in hosts.toml (the peer fetches from the upstream,
   still up); then restarts the node proxy;
6. stops the upstream, removes the image from node 1 and starts a pod there again: still served;
7. prints a summary (phases, pulls, bytes) and tears everything down (also on Ctrl-C).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagewarm.command import Command, table
from imagewarm.config import parse_bool, parse_bytes, parse_positive_int, setting

if TYPE_CHECKING:
    from localcluster.cluster import Cluster
    from localcluster.registry import Registry
    from localcluster.stack import Stack

from imagewarm.api import ORIGINAL_IMAGES_ANNOTATION as ORIGINAL_IMAGES

SERVED_BY_PEER = "peer proxy (node proxy down)"


@dataclass(frozen=True)
class DemoConfig:
    nodes: int = setting(2, help="nodes of the local cluster", parse=parse_positive_int, metavar="N")
    image_size: int = setting(
        64 << 20, help="size of the demo image's data layer, e.g. 64Mi", parse=parse_bytes, metavar="BYTES"
    )
    keep: bool = setting(
        False, help="keep the cluster running after the demo, until Ctrl-C", parse=parse_bool
    )
    work_dir: str = setting(
        "", help="directory for the cluster's files (keep it short: sockets live there)", metavar="DIR"
    )

    def __post_init__(self) -> None:
        if self.nodes > 9:
            raise ValueError("--nodes: at most 9 nodes on one machine")


class Demo:
    """Progress lines with elapsed time, and phase timings for the summary."""

    def __init__(self, out: Callable[[str], None] | None = None) -> None:
        self.started = time.monotonic()
        self.out = out or (lambda line: print(line, flush=True))
        self.phases: list[tuple[str, float]] = []

    def say(self, message: str) -> None:
        self.out(f"[{time.monotonic() - self.started:6.1f}s] {message}")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.say(f"== {name}")
        began = time.monotonic()
        yield
        self.phases.append((name, time.monotonic() - began))


def _pod(name: str, image: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "command": [
                        "sh",
                        "-c",
                        "echo hello from $NODE: $(du -sh /imagewarm | cut -f1) of data; sleep 3600",
                    ],
                    "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                }
            ],
        },
    }


_PULLED = re.compile(r"Successfully pulled image \"[^\"]+\" in ([0-9.]+)(ms|s)")


def _pull_seconds(cluster: Any, pod: str) -> str:
    """The kubelet's own measure of the pull, from its `Pulled` event."""
    out = cluster.kubectl(
        "get", "events", "--field-selector", f"involvedObject.name={pod},reason=Pulled", "-o", "json"
    ).stdout
    for event in json.loads(out)["items"]:
        m = _PULLED.search(event.get("message", ""))
        if m:
            return f"{float(m.group(1)) / (1000 if m.group(2) == 'ms' else 1):.2f}s"
        if "already present" in event.get("message", ""):
            return "already on node"
    return "?"


def _run_pod(cluster: Any, demo: Demo, name: str, image: str, node: str) -> dict[str, Any]:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_pod(name, image, node)))
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    pod: dict[str, Any] = json.loads(cluster.kubectl("get", "pod", name, "-o", "json").stdout)
    log = ""
    deadline = time.monotonic() + 30
    while not log and time.monotonic() < deadline:
        log = cluster.kubectl("logs", name, check=False).stdout.strip()
        time.sleep(0 if log else 0.2)
    pod["log"] = log
    demo.say(f"pod {name} on {node}: image {pod['spec']['containers'][0]['image']}")
    demo.say(f"pod {name} says: {log}")
    return pod


@dataclass(frozen=True)
class DemoResult:
    """What the demo's steps showed: the rows of its `pulls` and `summary` tables, and whether every
    step did what it claims."""

    pulls: list[tuple[str, str, str, str]]
    facts: list[tuple[str, str]]
    ok: bool


def run(config: DemoConfig) -> int:
    # Imported here: `imagewarm --help` must not pay for the cluster modules.
    from localcluster import binaries
    from localcluster.cluster import Cluster, ClusterError
    from localcluster.registry import start_registry
    from localcluster.stack import StackError

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    demo = Demo()
    with ExitStack() as teardown:
        try:
            with demo.phase("binaries (Go builds, cached)"):
                missing = [t.name for t in binaries.ALL_TOOLS if not t.is_built()]
                demo.say(
                    f"building {', '.join(missing)} (cold: ~10 min)" if missing else "all binaries cached"
                )
                binaries.ensure()
            with demo.phase(f"cluster start ({config.nodes} nodes) and upstream registry"):
                workdir = Path(config.work_dir).expanduser() / "cluster" if config.work_dir else None
                cluster = Cluster.start(
                    workdir, nodes=config.nodes, progress=lambda m: demo.say(f"cluster: {m}")
                )
                teardown.callback(cluster.stop)
                teardown.callback(demo.say, "tearing down")
                upstream = start_registry(cluster.workdir / "upstream")
                teardown.callback(upstream.stop)
                demo.say(f"upstream registry at {upstream.host}")
            outcome = steps(cluster, upstream, demo, teardown, image_size=config.image_size)
        except KeyboardInterrupt:
            demo.say("interrupted")
            return 130
        except (
            ClusterError,
            StackError,
            binaries.BuildError,
            RuntimeError,
            subprocess.CalledProcessError,
        ) as exc:
            print(f"imagewarm demo failed: {exc}", file=sys.stderr)
            return 1
        print()
        print(table("phases", ("phase", "seconds"), [(n, f"{s:.2f}") for n, s in demo.phases]))
        print()
        print(table("pulls", ("pod", "node", "served from", "kubelet pull time"), outcome.pulls))
        print()
        print(table("summary", ("what", "value"), outcome.facts), flush=True)
        if config.keep:
            print(f"\nThe cluster keeps running. export KUBECONFIG={cluster.kubeconfig}")
            print("Press Ctrl-C to tear it down.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if outcome.ok else 1


def steps(
    cluster: Cluster, upstream: Registry, demo: Demo, teardown: ExitStack, *, image_size: int
) -> DemoResult:
    """The demo's steps on a running `cluster` with an empty `upstream` (imagewarm start to the
    upstream outage, which stops `upstream`). Programs it starts are stopped by `teardown`. Pods go
    to the `default` namespace. Raises StackError, RuntimeError or CalledProcessError when a step
    fails."""
    from imagewarm.warmup import describe, warm
    from localcluster import binaries
    from localcluster.images import ImageBuilder, push
    from localcluster.stack import Stack

    pulls: list[tuple[str, str, str, str]] = []
    with demo.phase("imagewarm start: node proxy, a peer proxy and the webhook"):
        stack = Stack.start(
            cluster,
            [upstream],
            workdir=cluster.workdir / "imagewarm",
            progress=demo.say,
            proxy_args=["--tag-ttl", "1s"],  # so the outage below really tests the fallback
            peer=True,
        )
        teardown.callback(stack.stop)
    with demo.phase("image build and push to the upstream"):
        built = ImageBuilder(binaries.cache_root() / "images").busybox(data_size=image_size)
        push(upstream, "demo/app", "1", built)
        image = f"{upstream.host}/demo/app:1"
        demo.say(f"pushed {image}: {built.size / 2**20:.1f} MiB in {len(built.layers)} layers")
    with demo.phase("warm the image into the node cache"):
        warmed = warm(image, stack.proxy_url, progress=lambda p: demo.say(describe(p)))
        mib = warmed.bytes / 2**20
        demo.say(
            f"warmed {warmed.digest}: {mib:.1f} MiB in {warmed.seconds:.2f}s "
            f"({warmed.mib_per_second:.0f} MiB/s)"
        )
        upstream_gets = _blob_gets(upstream)
    pods: list[dict[str, Any]] = []
    for i, node in enumerate(cluster.nodes):
        with demo.phase(f"pod on {node.name}: rewritten by the webhook, pulled from the cache"):
            pods.append(_run_pod(cluster, demo, f"demo-{i + 1}", image, node.name))
            pulls.append((f"demo-{i + 1}", node.name, "cache", _pull_seconds(cluster, f"demo-{i + 1}")))
    fetched_after_pods = _blob_gets(upstream) - upstream_gets
    proxied = pods[0]["spec"]["containers"][0]["image"]
    last = len(cluster.nodes) - 1
    peer_node = cluster.nodes[last]
    with demo.phase(f"node proxy down: a pod on {peer_node.name} again, through the peer proxy"):
        # Read now: the restart below starts the node proxy's counters from zero.
        hit_bytes, miss_bytes = _proxy_bytes(stack)
        stack.proxy.stop()
        hosts = peer_node.containerd.certs_dir / stack.proxy_prefix / "hosts.toml"
        if stack.peer_url not in hosts.read_text():
            raise RuntimeError(
                f"{hosts} does not list the peer proxy {stack.peer_url}: see {stack.proxy.log_path}"
            )
        demo.say(f"node proxy stopped; {hosts} lists the peer proxy {stack.peer_url} after it")
        _remove_pod_and_image(cluster, f"demo-{last + 1}", warmed.digest, last)
        before = _blob_gets(upstream)
        via_peer = _run_pod(cluster, demo, "demo-peer", image, peer_node.name)
        pulls.append(("demo-peer", peer_node.name, SERVED_BY_PEER, _pull_seconds(cluster, "demo-peer")))
        peer_gets = _blob_gets(upstream) - before
        peer_blobs = stack.peer_metric("imagewarm_proxy_requests_total", route="blob", status="200")
        demo.say(f"the peer proxy served {peer_blobs:.0f} blobs, fetching {peer_gets} from the upstream")
        stack.restart_proxy()
    with demo.phase("upstream down: a pod on node 1 again, its image removed from the node"):
        upstream.stop()
        demo.say("upstream registry stopped")
        _remove_pod_and_image(cluster, "demo-peer" if last == 0 else "demo-1", warmed.digest, 0)
        offline = _run_pod(cluster, demo, "demo-offline", image, cluster.nodes[0].name)
        pulls.append(
            (
                "demo-offline",
                cluster.nodes[0].name,
                "cache, upstream down",
                _pull_seconds(cluster, "demo-offline"),
            )
        )
    hits_after, misses_after = _proxy_bytes(stack)
    hit_bytes, miss_bytes = hit_bytes + hits_after, miss_bytes + misses_after
    facts = [
        ("image as written", image),
        ("image as stored", proxied),
        (ORIGINAL_IMAGES, pods[0]["metadata"].get("annotations", {}).get(ORIGINAL_IMAGES, "")),
        ("image size", f"{built.size / 2**20:.1f} MiB"),
        ("upstream blob GETs during warm-up", str(upstream_gets)),
        (f"upstream blob GETs for {len(pods)} pods", str(fetched_after_pods)),
        ("proxy bytes from cache (hits)", f"{hit_bytes / 2**20:.1f} MiB"),
        ("proxy bytes from upstream (misses)", f"{miss_bytes / 2**20:.1f} MiB"),
        ("pod with the node proxy down", f"{via_peer['status']['phase']}: {via_peer['log']}"),
        (
            "peer proxy (node proxy down)",
            f"{stack.peer_url}: {peer_blobs:.0f} blobs served, {peer_gets} fetched upstream",
        ),
        ("pod with the upstream down", f"{offline['status']['phase']}: {offline['log']}"),
    ]
    ok = (
        all(p["log"] for p in pods)
        and fetched_after_pods == 0
        and via_peer["status"]["phase"] == "Running"
        and peer_blobs > 0
        and offline["status"]["phase"] == "Running"
    )
    return DemoResult(pulls, facts, ok)


def _remove_pod_and_image(cluster: Cluster, pod: str, digest: str, node: int) -> None:
    """Delete `pod` and every name of image `digest` on node `node` (0-based), so the next pod there
    pulls its blobs again. The CRI keeps an image under its tag, its digest and its ID: removing only
    the tag would leave the blobs on the node, and the next pull would fetch a manifest and no blob."""
    cluster.kubectl("delete", "pod", pod, "--wait=true", "--grace-period=1")
    containerd = cluster.nodes[node].containerd
    listing = containerd.ctr("images", "ls", namespace="k8s.io").stdout.splitlines()[1:]
    names = [line.split()[0] for line in listing if digest in line.split()[1:3]]
    if not names:
        raise RuntimeError(f"no image {digest} on {cluster.nodes[node].name} to remove (ctr images ls)")
    containerd.ctr("images", "rm", "--sync", *names, namespace="k8s.io")


def _proxy_bytes(stack: Stack) -> tuple[float, float]:
    """(bytes served from the cache, bytes fetched upstream) by the node proxy since it started."""
    return (
        stack.proxy_metric("imagewarm_proxy_cache_hit_bytes_total"),
        stack.proxy_metric("imagewarm_proxy_cache_miss_bytes_total"),
    )


def _blob_gets(registry: Any) -> int:
    return sum(
        1 for method, path, status in registry.requests() if method == "GET" and "/blobs/sha256:" in path
    )


command = Command(
    help="the main job on a local cluster: an image warmed into the node cache and pulled through it",
    config=DemoConfig,
    run=run,
)
