"""Benchmark: `imagewarm controller` on a real API server with thousands of Node objects.

    python bench/controller_bench.py                 # 1,000 Node objects, parallelism 10%
    python bench/controller_bench.py --nodes 5000

A local cluster (etcd, kube-apiserver, one real node) gets N Node objects without a kubelet; the
controller runs as its own process (`python -m imagewarm controller`); one process simulates every
node's agent (localcluster/agentsim.py: two status writes per node per job, through the API).
Measured: the time until every NodeImage exists; an ImagePullJob over all nodes at parallelism
10% until Complete; the controller's API requests per node by verb (its own
`imagewarm_controller_api_requests_total`), HTTP 429s; the controller's peak RSS and CPU seconds
next to the API server's, etcd's and the simulated agents'; the largest NodeImage. Goals: <= 2
controller writes per node per job (plus coalesced status writes), 0 throttling, RSS <= 300 MiB,
controller CPU <= 3 ms per node for the job. Not a timed test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import podmix  # noqa: E402
from imagewarm import api  # noqa: E402
from imagewarm.command import table  # noqa: E402
from imagewarm.informer import Informer  # noqa: E402
from imagewarm.kube import Kube, KubeError  # noqa: E402
from imagewarm.reference import parse  # noqa: E402
from localcluster import scrape  # noqa: E402
from localcluster.agentsim import AgentSim  # noqa: E402
from localcluster.cluster import Cluster  # noqa: E402
from localcluster.processes import Daemon, free_ports  # noqa: E402

CRD_DIR = REPO / "charts" / "imagewarm" / "crds"
RELEASE_NAMESPACE = "imagewarm-system"
TICKS = os.sysconf("SC_CLK_TCK")
WRITE_VERBS = ("patch", "create", "update", "delete")
SCALE_IMAGE = "registry.example.com/bench/scale:1"
IDLE_SECONDS = 10.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def snapshot(controller: int | None, apiserver: int, etcd: int) -> dict[str, float]:
    return {
        "controller": cpu_seconds(controller) if controller else 0.0,
        "apiserver": cpu_seconds(apiserver),
        "etcd": cpu_seconds(etcd),
    }


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def api_requests(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for match in re.finditer(
        r'imagewarm_controller_api_requests_total\{code="(\d+)",verb="(\w+)"\} ([0-9.e+]+)', text
    ):
        out[(match.group(2), match.group(1))] = float(match.group(3))  # (verb, code)
    return out


def create_nodes(kube: Kube, count: int) -> list[str]:
    names = [f"bench-{i:05d}" for i in range(count)]

    def make(name: str) -> None:
        kube.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"imagewarm.io/simulated": "true", "zone": f"z{hash(name) % 3}"},
                },
                "spec": {
                    "unschedulable": True,
                    "taints": [{"key": "imagewarm.io/simulated", "value": "true", "effect": "NoSchedule"}],
                },
            },
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(make, names))
    return names


def wait(what: str, probe: Any, timeout: float) -> float:
    started = time.monotonic()
    while not _try(probe):
        if time.monotonic() - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--parallelism", default="10%")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--pods", type=int, default=50000, help="pods for the CachedImage side (0: without it)"
    )
    parser.add_argument("--images", type=int, default=500, help="distinct images among the pods")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the controller under bench/threadprofile.py, every thread profiled into FILE "
        "(pstats); slows the controller: its CPU numbers are then not comparable",
    )
    parser.add_argument(
        "--controller-log",
        metavar="FILE",
        help="where the controller logs (default: in the cluster's directory)",
    )
    parser.add_argument("--controller-log-level", default="warning", help="the controller's --log-level")
    args = parser.parse_args()

    cluster = Cluster.start(nodes=1)
    controller = None
    sim = None
    try:
        cluster.kubectl("apply", "-f", str(CRD_DIR))
        cluster.kubectl(
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "60s",
            *(f"crd/{r.crd_name}" for r in api.RESOURCES),
        )
        cluster.kubectl("create", "namespace", RELEASE_NAMESPACE)
        kube = Kube.from_kubeconfig(cluster.kubeconfig)
        apiserver = next(d for d in cluster.daemons if d.name == "kube-apiserver")
        etcd = next(d for d in cluster.daemons if d.name == "etcd")
        started = time.monotonic()
        nodes = create_nodes(kube, args.nodes)
        print(
            f"[bench] {len(nodes)} Node objects created in {time.monotonic() - started:.1f}s", file=sys.stderr
        )
        total_nodes = len(kube.get("/api/v1/nodes")["items"])

        port = free_ports(1)[0]
        profiler = [str(REPO / "bench" / "threadprofile.py"), args.profile] if args.profile else []
        argv = [
            sys.executable,
            *profiler,
            "-m",
            "imagewarm",
            "controller",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--namespace",
            RELEASE_NAMESPACE,
            "--log-level",
            args.controller_log_level,
        ]
        controller = Daemon(
            "controller",
            argv,
            Path(args.controller_log or cluster.workdir / "logs" / "bench-controller.log"),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        ).start()
        assert controller.pid is not None and apiserver.pid is not None and etcd.pid is not None
        pids = (apiserver.pid, etcd.pid)
        cpu0 = snapshot(None, pids[0], pids[1])
        t0 = time.monotonic()
        to_node_images = wait(
            "every NodeImage",
            lambda: len(kube.get(api.NODE_IMAGE.path())["items"]) >= total_nodes,
            args.timeout,
        )
        wait("the controller's metrics", lambda: _up(port), 60)
        cpu1 = snapshot(controller.pid, *pids)
        requests0 = api_requests(port)

        sim = AgentSim(kube, pull_seconds=0.0, threads=8).start()
        sim.cache.wait_synced(60)
        # Node updates the controller decodes during the job too (the node lifecycle controller
        # marks Node objects that never heard from a kubelet), counted to be seen.
        node_updates = [0]
        node_watch = Informer(
            kube,
            "/api/v1/nodes",
            name="bench-nodes",
            transform=lambda o: {"metadata": {"name": o["metadata"]["name"]}},
            handlers=(lambda kind, o: node_updates.__setitem__(0, node_updates[0] + 1),),
        ).start()
        node_watch.wait_synced(60)
        idle0 = cpu_seconds(controller.pid)
        time.sleep(IDLE_SECONDS)  # what the controller costs with nothing to do
        idle = (cpu_seconds(controller.pid) - idle0) / IDLE_SECONDS
        job0, updates0 = snapshot(controller.pid, *pids), node_updates[0]
        agents_cpu0 = own_cpu()
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", namespace)
        job = api.image_pull_job(
            "warm",
            "registry.example.com/bench/app:1",
            namespace=namespace,
            template={"parallelism": args.parallelism},
        )
        t1 = time.monotonic()
        if args.profile:  # OUT.1: start-up and the NodeImages; OUT.2: the job until Complete
            os.kill(controller.pid, signal.SIGUSR1)
        kube.create(api.IMAGE_PULL_JOB.path(namespace=namespace), dict(job))
        largest = [0]

        def complete() -> bool:
            obj = kube.get(api.IMAGE_PULL_JOB.path("warm", namespace))
            status = obj.get("status") or {}
            return any(c.get("type") == "Complete" for c in status.get("conditions") or [])

        job_seconds = wait("the job to complete", complete, args.timeout)
        largest[0] = max(len(json.dumps(o)) for o in kube.get(api.NODE_IMAGE.path())["items"])
        cpu2 = snapshot(controller.pid, *pids)
        if args.profile:
            os.kill(controller.pid, signal.SIGUSR1)
        requests1 = api_requests(port)
        # Compaction: the finished job's tasks leave the NodeImages.
        wait(
            "tasks compacted",
            lambda: all(
                not (o.get("spec") or {}).get("images") for o in kube.get(api.NODE_IMAGE.path())["items"]
            ),
            300,
        )
        cpu3, agents_whole = snapshot(controller.pid, *pids), own_cpu() - agents_cpu0
        node_watch.stop(timeout=0.1)
        job_node_updates = node_updates[0] - updates0
        if args.profile:  # OUT.3: the compaction
            os.kill(controller.pid, signal.SIGUSR1)
        compacted = max(len(json.dumps(o)) for o in kube.get(api.NODE_IMAGE.path())["items"])
        requests2 = api_requests(port)
        status = kube.get(api.IMAGE_PULL_JOB.path("warm", namespace))["status"]
        del t0, t1

        n = total_nodes
        summary = f"desired {status['desired']}, succeeded {status['succeeded']}, failed {status['failed']}"
        writes = sum(c - requests0.get(k, 0) for k, c in requests2.items() if k[0] in WRITE_VERBS)
        server_setup = cpu1["apiserver"] - cpu0["apiserver"]
        whole = {k: cpu3[k] - job0[k] for k in cpu3}
        verbs = sorted({v for v, _ in requests2})
        rows = []
        for verb in verbs:
            job_count = sum(c - requests0.get(k, 0) for k, c in requests2.items() if k[0] == verb)
            setup = sum(c for k, c in requests0.items() if k[0] == verb)
            rows.append([verb, f"{setup:.0f}", f"{job_count:.0f}", f"{job_count / n:.2f}"])
        throttled_setup = sum(c for (_, code), c in requests0.items() if code == "429")
        throttled = sum(c for (_, code), c in requests2.items() if code == "429") - throttled_setup
        print(
            table(
                f"controller API requests ({n} nodes)",
                ["verb", "NodeImage setup", "job (incl. compaction)", "job per node"],
                rows,
            )
        )
        print()
        print(
            table(
                "controller benchmark",
                ["what", "value"],
                [
                    ["nodes (Node objects, 1 with a kubelet)", str(n)],
                    ["time until every NodeImage exists", f"{to_node_images:.1f}s"],
                    [
                        f"ImagePullJob over all nodes, parallelism {args.parallelism}: time to Complete",
                        f"{job_seconds:.1f}s",
                    ],
                    ["job status", summary],
                    [
                        "controller writes per node for the job (patch+create+update+delete)",
                        f"{writes / n:.2f}",
                    ],
                    ["simulated agents' status writes per node", f"{sim.writes / n:.2f}"],
                    ["Node object updates during the job (not the controller's)", str(job_node_updates)],
                    [
                        "HTTP 429 answers to the controller: setup (a new CRD's storage initialising) / job",
                        f"{throttled_setup:.0f} / {throttled:.0f}",
                    ],
                    ["controller peak RSS", f"{peak_rss_mib(controller.pid):.0f} MiB"],
                    [
                        "controller CPU: NodeImage setup",
                        f"{cpu1['controller']:.1f}s ({1000 * cpu1['controller'] / n:.2f} ms/node)",
                    ],
                    ["controller CPU while idle (every NodeImage there, no job)", f"{1000 * idle:.0f} ms/s"],
                    [
                        "controller CPU: the job until Complete",
                        f"{cpu2['controller'] - job0['controller']:.1f}s "
                        f"({1000 * (cpu2['controller'] - job0['controller']) / n:.2f} ms/node)",
                    ],
                    [
                        "controller CPU: the whole job (until its tasks left every NodeImage)",
                        f"{whole['controller']:.1f}s ({1000 * whole['controller'] / n:.2f} ms/node)",
                    ],
                    [
                        "CPU for the whole job: controller / kube-apiserver / etcd / simulated agents",
                        f"{whole['controller']:.1f}s / {whole['apiserver']:.1f}s / {whole['etcd']:.1f}s / "
                        f"{agents_whole:.1f}s",
                    ],
                    [
                        "kube-apiserver / etcd CPU for the NodeImage setup",
                        f"{server_setup:.1f}s / {cpu1['etcd'] - cpu0['etcd']:.1f}s",
                    ],
                    [
                        "largest NodeImage at completion / after compaction",
                        f"{largest[0]} / {compacted} bytes",
                    ],
                ],
            )
        )
        del requests1
        if args.pods:
            print()
            print(cached_image_side(args, kube, cluster, controller, port, nodes, pids))
    finally:
        if sim is not None:
            sim.stop()
        if controller is not None:
            controller.stop()
        cluster.stop()
    return 0


def cachedimage_writes(port: int) -> dict[str, float]:
    """The controller's CachedImage writes so far, by what they did (create, status, ...)."""
    return {
        labels["what"]: value
        for name, labels, value in scrape.samples(f"http://127.0.0.1:{port}")
        if name == "imagewarm_controller_cachedimage_writes_total"
    }


def used_by(kube: Kube) -> dict[str, int | None]:
    """usedBy.count of every CachedImage, by name (None: no status yet)."""
    return {
        o["metadata"]["name"]: ((o.get("status") or {}).get("usedBy") or {}).get("count")
        for o in kube.get(api.CACHED_IMAGE.path())["items"]
    }


def quiet(port: int, seconds: float, timeout: float) -> None:
    """Wait until the controller made no CachedImage write for `seconds` (a coalesced status write
    may still be due after the counts are right)."""
    last, since, started = cachedimage_writes(port), time.monotonic(), time.monotonic()
    while time.monotonic() - since < seconds and time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = cachedimage_writes(port)
        if now != last:
            last, since = now, time.monotonic()


def cached_image_side(
    args: argparse.Namespace,
    kube: Kube,
    cluster: Cluster,
    controller: Daemon,
    port: int,
    nodes: list[str],
    pids: tuple[int, int],
) -> str:
    """Pods over the Node objects -> CachedImages: convergence, coalescing, memory, a restart."""
    assert controller.pid is not None
    workload = podmix.mix(args.pods, args.images, nodes)
    expected = {api.cached_image_name(r): c for r, c in workload.expected.items()}
    for namespace in workload.namespaces:
        cluster.kubectl("create", "namespace", namespace)
    for namespace in workload.namespaces:  # the ServiceAccount admission wants `default` first
        wait(
            f"the default ServiceAccount of {namespace}",
            lambda ns=namespace: kube.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"),
            60,
        )
    writes0, requests0 = cachedimage_writes(port), api_requests(port)
    cpu0, bench0 = snapshot(controller.pid, *pids), own_cpu()
    started = time.monotonic()
    created = podmix.create_pods(kube, workload.bodies())
    create_seconds = time.monotonic() - started
    cpu_created, bench_cpu = snapshot(controller.pid, *pids), own_cpu() - bench0
    print(f"[bench] {created} pods created in {create_seconds:.1f}s", file=sys.stderr)

    def all_counted() -> bool:
        counts = used_by(kube)
        return all(counts.get(name) == count for name, count in expected.items())

    converged = create_seconds + wait("every CachedImage with its usedBy count", all_counted, args.timeout)
    quiet(port, 8.0, 120)
    cpu1 = snapshot(controller.pid, *pids)
    writes1, requests1 = cachedimage_writes(port), api_requests(port)
    rss_cached = current_rss_mib(controller.pid)
    writes = {k: v - writes0.get(k, 0) for k, v in writes1.items()}

    # Coalescing: one image's Deployment scaled 0 -> 1,000 pods as fast as the API server creates
    # them, then back to 0; each write of its CachedImage is one watch event here.
    scale = podmix.Deployment("scale", workload.namespaces[0], 1000, (("app", SCALE_IMAGE),))
    scale_name = api.cached_image_name(str(parse(SCALE_IMAGE)))
    events: list[tuple[str, int | None]] = []
    watcher = Informer(
        kube,
        api.CACHED_IMAGE.path(),
        name="bench-scale",
        field_selector=f"metadata.name={scale_name}",
        handlers=(lambda kind, o: events.append((kind, _count(o))),),
    ).start()
    watcher.wait_synced(30)
    up_started = time.monotonic()
    podmix.create_pods(kube, (podmix.pod_body(scale, i, nodes[i % len(nodes)]) for i in range(1000)))
    up_create = time.monotonic() - up_started
    wait("the scaled image's count", lambda: used_by(kube).get(scale_name) == 1000, 300)
    up_seconds = time.monotonic() - up_started
    quiet(port, 8.0, 120)
    up_events = list(events)
    events.clear()
    down_started = time.monotonic()
    kube.request(
        "DELETE",
        f"/api/v1/namespaces/{scale.namespace}/pods",
        params={"labelSelector": "app=scale", "gracePeriodSeconds": "0"},
    )
    wait("the scaled image's count back to 0", lambda: used_by(kube).get(scale_name) == 0, 300)
    down_seconds = time.monotonic() - down_started
    quiet(port, 8.0, 120)
    down_events = list(events)
    watcher.stop(timeout=0.1)
    peak_running = peak_rss_mib(controller.pid)

    # A restart with every pod there: one paged list per cache, then nothing to write.
    controller.stop()
    server_before_restart = cpu_seconds(pids[0])
    controller.start()
    assert controller.pid is not None
    ready = wait("the restarted controller's readiness", lambda: _ready(port), 300)
    wait("the restarted controller's metrics", lambda: _up(port), 60)
    quiet(port, 10.0, 300)
    restart_cpu = cpu_seconds(controller.pid)
    restart_requests = api_requests(port)
    restart_writes = sum(c for (verb, _), c in restart_requests.items() if verb in WRITE_VERBS)
    restart_what = (
        ", ".join(f"{k} {v:.0f}" for k, v in sorted(cachedimage_writes(port).items()) if v) or "none"
    )
    restart_lists = sum(c for (verb, _), c in restart_requests.items() if verb == "list")
    restart_server = cpu_seconds(pids[0]) - server_before_restart

    n = created
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    api_writes = sum(c - requests0.get(k, 0) for k, c in requests1.items() if k[0] in WRITE_VERBS)
    throttled = sum(c - requests0.get(k, 0) for k, c in requests1.items() if k[1] == "429")
    images = len(expected)
    up_writes = sum(1 for kind, _ in up_events if kind in ("ADDED", "MODIFIED"))
    down_writes = sum(1 for kind, _ in down_events if kind == "MODIFIED")
    other = sum(v for k, v in writes.items() if k not in ("create", "status"))
    rows = [
        (f"creating {n} pods (24 client threads)", f"{create_seconds:.1f}s ({n / create_seconds:.0f}/s)"),
        (
            "time until every CachedImage exists with its usedBy count (from the first create)",
            f"{converged:.1f}s",
        ),
        (
            "controller CachedImage writes (create / status / other)",
            f"{writes.get('create', 0):.0f} / {writes.get('status', 0):.0f} / {other:.0f} "
            f"({sum(writes.values()) / images:.2f} per image)",
        ),
        ("controller API writes for the pods (all kinds) / HTTP 429", f"{api_writes:.0f} / {throttled:.0f}"),
        (
            "one image scaled 0 -> 1,000 pods: its CachedImage writes (create + status)",
            f"{up_writes} in {up_seconds:.1f}s (pods created in {up_create:.1f}s)",
        ),
        (
            "... then 1,000 -> 0 (one deletecollection): its writes (status, expiresAt)",
            f"{down_writes} in {down_seconds:.1f}s",
        ),
        (
            "controller CPU for the pods (creation to settled)",
            f"{cpu['controller']:.1f}s ({1000 * cpu['controller'] / n:.2f} ms/pod; "
            f"{cpu_created['controller'] - cpu0['controller']:.1f}s while creating)",
        ),
        ("kube-apiserver / etcd CPU for the same", f"{cpu['apiserver']:.1f}s / {cpu['etcd']:.1f}s"),
        ("the bench creating the pods: its CPU", f"{bench_cpu:.1f}s"),
        ("controller RSS with every pod cached / peak", f"{rss_cached:.0f} MiB / {peak_running:.0f} MiB"),
        ("restart with every pod: ready (caches listed) in", f"{ready:.1f}s ({restart_lists:.0f} lists)"),
        (
            "restart: peak RSS / CPU until quiet / API writes (of them CachedImage writes)",
            f"{peak_rss_mib(controller.pid):.0f} MiB / {restart_cpu:.1f}s / "
            f"{restart_writes:.0f} ({restart_what})",
        ),
        ("restart: kube-apiserver CPU", f"{restart_server:.1f}s"),
    ]
    title = (
        f"CachedImage side ({n} pods, {images} images, {len(workload.deployments)} Deployments, "
        f"{len(nodes)} Node objects; no kubelet: the pods stay Pending)"
    )
    return table(title, ["what", "value"], [list(r) for r in rows])


def _count(obj: dict[str, Any]) -> int | None:
    count = ((obj.get("status") or {}).get("usedBy") or {}).get("count")
    return int(count) if count is not None else None


def current_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _try(probe: Any) -> bool:
    try:
        return bool(probe())
    except KubeError as exc:  # the API server still initialising a CRD's storage (429), busy...
        if not exc.temporary:
            raise
        return False


def _up(port: int) -> bool:
    try:
        api_requests(port)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
