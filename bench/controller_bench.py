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
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imagewarm import api  # noqa: E402
from imagewarm.command import table  # noqa: E402
from imagewarm.kube import Kube, KubeError  # noqa: E402
from localcluster.agentsim import AgentSim  # noqa: E402
from localcluster.cluster import Cluster  # noqa: E402
from localcluster.processes import Daemon, free_ports  # noqa: E402

CRD_DIR = REPO / "charts" / "imagewarm" / "crds"
RELEASE_NAMESPACE = "imagewarm-system"
TICKS = os.sysconf("SC_CLK_TCK")


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
        kube.session.mount("https://", __import__("requests").adapters.HTTPAdapter(pool_maxsize=32))
        apiserver = next(d for d in cluster.daemons if d.name == "kube-apiserver")
        etcd = next(d for d in cluster.daemons if d.name == "etcd")
        started = time.monotonic()
        nodes = create_nodes(kube, args.nodes)
        print(
            f"[bench] {len(nodes)} Node objects created in {time.monotonic() - started:.1f}s", file=sys.stderr
        )
        total_nodes = len(kube.get("/api/v1/nodes")["items"])

        port = free_ports(1)[0]
        argv = [
            sys.executable,
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
            "warning",
        ]
        controller = Daemon(
            "controller",
            argv,
            cluster.workdir / "logs" / "bench-controller.log",
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
        kube.create(api.IMAGE_PULL_JOB.path(namespace=namespace), dict(job))
        largest = [0]

        def complete() -> bool:
            obj = kube.get(api.IMAGE_PULL_JOB.path("warm", namespace))
            status = obj.get("status") or {}
            return any(c.get("type") == "Complete" for c in status.get("conditions") or [])

        job_seconds = wait("the job to complete", complete, args.timeout)
        largest[0] = max(len(json.dumps(o)) for o in kube.get(api.NODE_IMAGE.path())["items"])
        cpu2 = snapshot(controller.pid, *pids)
        agents_cpu = own_cpu() - agents_cpu0
        requests1 = api_requests(port)
        # Compaction: the finished job's tasks leave the NodeImages.
        wait(
            "tasks compacted",
            lambda: all(
                not (o.get("spec") or {}).get("images") for o in kube.get(api.NODE_IMAGE.path())["items"]
            ),
            300,
        )
        compacted = max(len(json.dumps(o)) for o in kube.get(api.NODE_IMAGE.path())["items"])
        requests2 = api_requests(port)
        status = kube.get(api.IMAGE_PULL_JOB.path("warm", namespace))["status"]
        del t0, t1

        n = total_nodes
        summary = f"desired {status['desired']}, succeeded {status['succeeded']}, failed {status['failed']}"
        write_verbs = ("patch", "create", "update", "delete")
        writes = sum(c - requests0.get(k, 0) for k, c in requests2.items() if k[0] in write_verbs)
        server_setup = cpu1["apiserver"] - cpu0["apiserver"]
        server_job = cpu2["apiserver"] - cpu1["apiserver"]
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
                    [
                        "HTTP 429 answers to the controller: setup (a new CRD's storage initialising) / job",
                        f"{throttled_setup:.0f} / {throttled:.0f}",
                    ],
                    ["controller peak RSS", f"{peak_rss_mib(controller.pid):.0f} MiB"],
                    [
                        "controller CPU: NodeImage setup",
                        f"{cpu1['controller']:.1f}s ({1000 * cpu1['controller'] / n:.2f} ms/node)",
                    ],
                    [
                        "controller CPU: the job",
                        f"{cpu2['controller'] - cpu1['controller']:.1f}s "
                        f"({1000 * (cpu2['controller'] - cpu1['controller']) / n:.2f} ms/node)",
                    ],
                    ["kube-apiserver CPU: setup / job", f"{server_setup:.1f}s / {server_job:.1f}s"],
                    [
                        "etcd CPU: setup / job",
                        f"{cpu1['etcd'] - cpu0['etcd']:.1f}s / {cpu2['etcd'] - cpu1['etcd']:.1f}s",
                    ],
                    ["simulated agents' CPU (this process) for the job", f"{agents_cpu:.1f}s"],
                    [
                        "largest NodeImage at completion / after compaction",
                        f"{largest[0]} / {compacted} bytes",
                    ],
                ],
            )
        )
        del requests1
    finally:
        if sim is not None:
            sim.stop()
        if controller is not None:
            controller.stop()
        cluster.stop()
    return 0


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
