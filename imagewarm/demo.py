"""`imagewarm demo`: the main job, end to end on a real local cluster (stage 1: the cluster itself).

Builds what is missing, starts a local registry and a Kubernetes cluster on this machine, builds a
busybox image, pushes it to the local registry, runs a pod from it and reads its log back, then
prints a table of how long each phase took and tears everything down (also on Ctrl-C).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagewarm.cli import Command
from imagewarm.config import parse_bool, parse_positive_int, setting


@dataclass(frozen=True)
class DemoConfig:
    nodes: int = setting(2, help="nodes of the local cluster", parse=parse_positive_int, metavar="N")
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

    def table(self, facts: list[tuple[str, str]]) -> str:
        width = max(len(n) for n, _ in [*self.phases, *facts, ("total", "")])
        lines = [f"{'phase'.ljust(width)}  seconds", f"{'-' * width}  -------"]
        lines += [f"{name.ljust(width)}  {seconds:7.2f}" for name, seconds in self.phases]
        lines.append(f"{'total'.ljust(width)}  {sum(s for _, s in self.phases):7.2f}")
        lines += [""] + [f"{name.ljust(width)}  {value}" for name, value in facts]
        return "\n".join(lines)


def _pod(name: str, image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "hello",
                    "image": image,
                    "command": ["sh", "-c", "echo hello from $(hostname) on $NODE; sleep 3600"],
                    "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                }
            ],
        },
    }


def run(config: DemoConfig) -> int:
    # Imported here: `imagewarm --help` must not pay for the cluster modules.
    from imagewarm.localcluster import binaries
    from imagewarm.localcluster.cluster import Cluster, ClusterError
    from imagewarm.localcluster.images import ImageBuilder, push

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    demo = Demo()
    cluster: Cluster | None = None
    try:
        with demo.phase("binaries (Go builds, cached)"):
            missing = [t.name for t in binaries.ALL_TOOLS if not t.is_built()]
            demo.say(f"building {', '.join(missing)} (cold: ~10 min)" if missing else "all binaries cached")
            binaries.ensure()
        with demo.phase(f"cluster start ({config.nodes} node{'s' if config.nodes > 1 else ''})"):
            workdir = Path(config.work_dir).expanduser() / "cluster" if config.work_dir else None
            cluster = Cluster.start(workdir, nodes=config.nodes, progress=lambda m: demo.say(f"cluster: {m}"))
        with demo.phase("build + push busybox image"):
            image = f"{cluster.registry.host}/demo/busybox:1"
            push(
                cluster.registry,
                "demo/busybox",
                "1",
                ImageBuilder(binaries.cache_root() / "images").busybox(),
            )
            demo.say(f"pushed {image}")
        name = f"hello-{int(time.time()) % 100000}"
        with demo.phase("pod scheduled, pulled, running"):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(_pod(name, image)))
            cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
            pod = json.loads(cluster.kubectl("get", "pod", name, "-o", "json").stdout)
            demo.say(f"pod {name} running on {pod['spec']['nodeName']}")
        with demo.phase("log read back"):
            log = ""
            deadline = time.monotonic() + 30
            while not log and time.monotonic() < deadline:
                log = cluster.kubectl("logs", name, check=False).stdout.strip()
                time.sleep(0.2 if not log else 0)
        print()
        print(demo.table([("pod", name), ("node", pod["spec"]["nodeName"]), ("image", image), ("log", log)]))
        print(flush=True)
        if config.keep:
            print(f"The cluster keeps running. export KUBECONFIG={cluster.kubeconfig}")
            print("Press Ctrl-C to tear it down.", flush=True)
            while True:
                time.sleep(3600)
        return 0 if log else 1
    except KeyboardInterrupt:
        demo.say("interrupted")
        return 130
    except (ClusterError, binaries.BuildError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"imagewarm demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            demo.say("tearing down the cluster")
            cluster.stop()


command = Command(
    help="the main job on a local cluster: registry, 2 nodes, an image pushed and run (stage 1)",
    config=DemoConfig,
    run=run,
)
