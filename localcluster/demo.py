"""`imagewarm demo`: the product installed as users install it, on a real local cluster.

1. the Go binaries (built once, cached), a 2-node cluster and an upstream registry behind a
   throttled link (200 Mbit/s: cold pulls cost what they cost from the internet);
2. the product image (built once, cached) imported into the nodes and `helm install` of the chart;
3. the steps of localcluster.demosteps, with progress: a cold pull, an ImagePullJob warming the
   other node, a pod starting from cache, a SidecarSet pre-pulled and injected, a node proxy down
   (a pod starts through a peer), the upstream offline (a pod starts from cache);
4. a summary (pod starts, bytes by source, hit ratio, the imagewarm kinds as `kubectl get` shows
   them) and the total time; everything is torn down, also on Ctrl-C. When a step fails it says
   which, and where the logs are (kept in the work directory).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from imagewarm.command import Command, table
from imagewarm.config import parse_bool, parse_bytes, parse_positive_int, setting
from localcluster.demosteps import Demo, DemoResult, StepError, steps

if TYPE_CHECKING:
    from localcluster.cluster import Cluster
    from localcluster.registry import Registry


@dataclass(frozen=True)
class DemoConfig:
    image_size: int = setting(
        256 << 20,
        help="size of the sample image's data layer, e.g. 256Mi",
        parse=parse_bytes,
        metavar="BYTES",
    )
    link_mbit: int = setting(
        200,
        help="the upstream link's speed in Mbit/s (an internet download)",
        parse=parse_positive_int,
        metavar="MBIT",
    )
    keep: bool = setting(
        False, help="keep the cluster running after the demo, until Ctrl-C", parse=parse_bool
    )
    work_dir: str = setting(
        "",
        help="directory for the cluster's files and logs (default: a new /tmp/iwdemo-*, removed "
        "after a successful run)",
        metavar="DIR",
    )


def run(config: DemoConfig) -> int:
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    demo = Demo()
    own_dir = not config.work_dir
    workdir = Path(config.work_dir or tempfile.mkdtemp(prefix="iwdemo-", dir="/tmp")).expanduser().resolve()
    try:
        code = _run(config, demo, workdir)
    finally:
        waited = f" (and {demo.waited:.0f}s waiting for another local cluster to stop)" if demo.waited else ""
        print(f"total time: {demo.elapsed() - demo.waited:.0f}s{waited}", flush=True)
    if own_dir and code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _run(config: DemoConfig, demo: Demo, workdir: Path) -> int:
    """The demo in `workdir`; its exit code. Everything started is stopped before it returns."""
    # Imported here: `imagewarm --help` must not pay for the cluster modules.
    from localcluster import binaries
    from localcluster.cluster import Cluster
    from localcluster.registry import start_registry

    cluster: Cluster | None = None
    upstream: Registry | None = None
    with ExitStack() as teardown:
        teardown.callback(lambda: demo.say("torn down") if cluster else None)
        try:
            with demo.phase("binaries (Go builds, cached)"):
                missing = [t.name for t in binaries.ALL_TOOLS if not t.is_built()]
                demo.say(
                    f"building {', '.join(missing)} (cold: ~10 min)" if missing else "all binaries cached"
                )
                binaries.ensure()
            with demo.phase("cluster start (2 nodes) and the upstream registry"):
                cluster = Cluster.start(workdir / "cluster", nodes=2, progress=_cluster_progress(demo))
                teardown.callback(cluster.stop)
                upstream = start_registry(cluster.workdir / "upstream")
                teardown.callback(upstream.stop)
                demo.say(f"upstream registry at {upstream.host}")
            outcome = steps(
                cluster,
                upstream,
                demo,
                teardown,
                image_size=config.image_size,
                link_rate=config.link_mbit * 1_000_000 // 8,
            )
        except KeyboardInterrupt:
            demo.say(f"interrupted during: {demo.step}; tearing down")
            return 130
        except Exception as exc:  # reported by kind: a step's error in a line, a bug with its traceback
            _report_failure(demo, exc, workdir, cluster, upstream)
            return 1
        print()
        print(summary(outcome, demo), flush=True)
        if not outcome.ok:
            _report_failure(demo, StepError("a claim did not hold (NO above)"), workdir, cluster, upstream)
        if config.keep:
            print(f"\nThe cluster keeps running. export KUBECONFIG={cluster.kubeconfig}")
            print("Press Ctrl-C to tear it down.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        demo.say("tearing down")
        return 0 if outcome.ok else 1


def _cluster_progress(demo: Demo) -> Callable[[str], None]:
    """The cluster's progress lines; the time spent waiting for another cluster's machine lock
    (another run or test session on this machine) is counted apart, in `demo.waited`."""
    waiting: list[float] = []

    def say(message: str) -> None:
        if waiting:
            demo.waited += time.monotonic() - waiting.pop()
        if message.startswith("another local cluster holds"):
            waiting.append(time.monotonic())
        demo.say(f"cluster: {message}")

    return say


def summary(outcome: DemoResult, demo: Demo) -> str:
    """The tables printed at the end (README.md shows one)."""
    pods = [
        (p.step, p.node, p.served_from, p.pulls.get("app", "?"), f"{p.start_seconds:.0f}s")
        for p in outcome.pods
    ]
    sidecars = [(p.step, p.node, p.pulls["logger"]) for p in outcome.pods if "logger" in p.pulls]
    parts = [
        table("pod starts", ("pod", "node", "image served from", "kubelet pull", "scheduled to ready"), pods),
        table("sidecar", ("pod", "node", "kubelet pull of the pre-pulled sidecar"), sidecars),
        table("bytes", ("what", "value"), outcome.facts),
        *(f"kubectl get {kind}\n{view}" for kind, view in outcome.views.items()),
        table("phases", ("phase", "seconds"), [(n, f"{s:.1f}") for n, s in demo.phases]),
        table("checks", ("claim", "held"), [(c, "yes" if held else "NO") for c, held in outcome.checks]),
    ]
    return "\n\n".join(parts)


def _report_failure(
    demo: Demo, exc: BaseException, workdir: Path, cluster: Cluster | None, upstream: Registry | None
) -> None:
    """Say which step failed and where its logs are; the imagewarm pods' logs are saved now (the
    cluster goes with the teardown), the work directory is kept."""
    err = sys.stderr
    print(f"\nimagewarm demo failed during: {demo.step or 'start'}", file=err)
    failed(exc, err)
    if cluster is None:
        print(f"logs: {workdir}", file=err)
        return
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    saved = []
    listing = cluster.kubectl(
        "get",
        "pods",
        "-A",
        "-l",
        "app.kubernetes.io/part-of=imagewarm",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {end}",
        check=False,
    ).stdout.split()
    for item in listing:
        namespace, name = item.split("/", 1)
        out = cluster.kubectl("logs", "-n", namespace, name, "--all-containers", "--prefix", check=False)
        path = logs / f"{name}.log"
        path.write_text(out.stdout + out.stderr)
        saved.append(path)
    events = cluster.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout
    (logs / "events.txt").write_text(events)
    print("logs (kept):", file=err)
    for daemon in cluster.daemons:
        print(f"  {daemon.name:<28} {daemon.log_path}", file=err)
    for node in cluster.nodes:
        print(f"  containerd {node.name:<17} {node.containerd.log_path}", file=err)
    if upstream is not None:
        print(f"  {'upstream registry':<28} {upstream.log_path}", file=err)
    for path in saved:
        print(f"  {'kubectl logs ' + path.stem:<28} {path}", file=err)
    print(f"  {'events':<28} {logs / 'events.txt'}", file=err)


def step_errors() -> tuple[type[Exception], ...]:
    """What the demo's steps raise when the machine, the cluster or imagewarm fails (the harness's
    own error types): reported in one line. Anything else is a bug, reported with its traceback."""
    # Imported here: `imagewarm --help` must not pay for the cluster modules.
    from imagewarm.warmup import WarmError
    from localcluster.binaries import BuildError
    from localcluster.chart import HelmError
    from localcluster.cluster import ClusterError
    from localcluster.containerd import ContainerdError
    from localcluster.images import PushError
    from localcluster.processes import DaemonError, MissingTool
    from localcluster.productimage import ProductImageError
    from localcluster.pythonruntime import RuntimeFilesError
    from localcluster.stack import StackError
    from localcluster.wheels import WheelError

    return (
        BuildError,
        ClusterError,
        ContainerdError,
        DaemonError,
        HelmError,
        MissingTool,
        ProductImageError,
        PushError,
        RuntimeFilesError,
        StackError,
        StepError,
        WarmError,
        WheelError,
        subprocess.CalledProcessError,  # KubectlError, and the commands the steps run
    )


def failed(exc: BaseException, out: TextIO | None = None) -> int:
    """Report the demo's failure on `out` (stderr): a step's error in one line, any other exception
    with its traceback. Returns the exit status."""
    out = out or sys.stderr
    if isinstance(exc, step_errors()):
        print(f"imagewarm demo failed: {exc}", file=out)
        return 1
    print("imagewarm demo failed unexpectedly (a bug: please report it with this traceback):", file=out)
    traceback.print_exception(exc, file=out)
    return 1


command = Command(
    help="the main job on a local cluster: imagewarm installed with helm, images pulled cold, warmed, "
    "through a peer and offline, with a summary",
    config=DemoConfig,
    run=run,
)
