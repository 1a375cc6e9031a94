"""Benchmark: `imagewarm webhook` under gunicorn over TLS, as the API server calls it.

    python bench/webhook_bench.py            # 5 s per closed-loop cell, 3000 requests per open-loop cell
    python bench/webhook_bench.py --quick    # 2 s and 500, to try it

Cells: a realistic pod (3 containers + 1 init container) without and with a matching SidecarSet,
at 1 and 8 concurrent keep-alive TLS connections (the API server keeps its connections to webhooks
open). Closed loops (the next request as soon as the answer is in) are driven by wrk, a native
client like the API server itself, so the clients take little of the two cores the server needs;
a Lua hook compares every answer with the one checked beforehand. Open loops at fixed request rates
use Python clients in separate processes that time each request from when it was due. Anchor, run
side by side on the same server: `GET /healthz` (TLS + gunicorn + Flask, no decision), so the ratio
shows what the decision itself costs. The server's own CPU time per request (its workers' user +
system time over the requests answered) is the number that bounds everything else: a closed loop of
N on C cores has mean latency N / throughput >= N * (CPU per request) / C (Little's law). Goal:
p99 <= 5 ms at 8 clients.

The SidecarSets reach the webhook as in production, through its list+watch cache; here the
list/watch endpoints are served by a small local stand-in for the API server, because no API call
is on the measured path (the webhook reads its cache, never the API server, per request).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import itertools
import json
import multiprocessing
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imagewarm import certs  # noqa: E402
from localcluster.processes import free_ports  # noqa: E402

SIDECARSET = {
    "apiVersion": "imagewarm.io/v1alpha1",
    "kind": "SidecarSet",
    "metadata": {"name": "log-agent", "resourceVersion": "2"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "containers": [
            {
                "name": "log-agent",
                "image": "registry.example.com/log-agent:2.3",
                "podInjectPolicy": "BeforeAppContainer",
                "shareVolumePolicy": {"type": "enabled"},
                "transferEnv": [{"sourceContainerName": "app", "envName": "APP_NAME"}],
                "volumeMounts": [{"name": "logs", "mountPath": "/var/log/app"}],
            }
        ],
        "volumes": [{"name": "logs", "emptyDir": {}}],
        "imagePullSecrets": [{"name": "registry-cred"}],
    },
}


def container(name: str, image: str) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
        "env": [
            {"name": "APP_NAME", "value": "shop"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {
                "name": "kube-api-access-abcde",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            },
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def review(labels: dict[str, str]) -> bytes:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-7d9c-",
            "namespace": "default",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "shop-7d9c",
                    "uid": "1b7c",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "initContainers": [container("migrate", "registry.corp:5000/shop/migrate:1.4")],
            "containers": [
                container("app", "registry.corp:5000/shop/app:1.4"),
                container("cache", "redis:7.2"),
                container("exporter", f"quay.io/prometheus/statsd-exporter@sha256:{'ab' * 32}"),
            ],
            "volumes": [
                {"name": "data", "emptyDir": {}},
                {
                    "name": "kube-api-access-abcde",
                    "projected": {
                        "sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]
                    },
                },
            ],
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
        },
    }
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": "default",
                "object": pod,
                "dryRun": False,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            },
        }
    ).encode()


class StandInAPI(BaseHTTPRequestHandler):
    """List and watch of SidecarSets and namespaces (watches stay open, quietly)."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if "watch=true" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            time.sleep(300)
            return
        items = (
            [SIDECARSET]
            if "sidecarsets" in self.path
            else [{"metadata": {"name": "default", "resourceVersion": "1", "labels": {}}}]
        )
        body = json.dumps({"metadata": {"resourceVersion": "3"}, "items": items}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def start_webhook(workdir: Path, api_url: str) -> tuple[subprocess.Popen[bytes], int, bytes]:
    ca = certs.new_ca("bench-ca")
    leaf = certs.issue(ca, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (workdir / "tls").mkdir()
    (workdir / "tls" / "tls.crt").write_bytes(leaf.cert_pem)
    (workdir / "tls" / "tls.key").write_bytes(leaf.key_pem)
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": api_url}}],
                "users": [{"name": "u", "user": {"token": "bench"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    port = free_ports(1)[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "webhook",
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-dir",
            str(workdir / "tls"),
            "--kubeconfig",
            str(kubeconfig),
            "--exclude-registry",
            "quay.io",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "webhook.log").open("wb"),
    )
    context = ssl.create_default_context(cafile=None)
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, body = request(connect(port, context), "GET", "/healthz", b"")
            if status == 200 and json.loads(body).get("sidecarsetsSynced"):
                return process, port, ca.cert_pem
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"webhook did not become ready: {(workdir / 'webhook.log').read_text()[-2000:]}")


def connect(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)


def request(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request(
        method, path, body=body or None, headers={"Content-Type": "application/json"} if body else {}
    )
    response = conn.getresponse()
    return response.status, response.read()


def _client(
    port: int,
    ca_pem: bytes,
    method: str,
    path: str,
    body: bytes,
    count: int,
    check: Any,
    start_at: float,
    interval: float,
    out: Any,
) -> None:
    """One client process: a keep-alive TLS connection, `count` timed requests from `start_at`.

    `interval` 0: closed loop (the next request as soon as the answer is in). Otherwise open loop:
    request i is due at `start_at + i * interval`, and its latency counts from when it was due, so a
    server that falls behind is charged for the queue it causes (no coordinated omission)."""
    context = ssl.create_default_context(cafile=None)
    context.load_verify_locations(cadata=ca_pem.decode())
    conn = connect(port, context)
    request(conn, method, path, body)  # handshake and warm-up outside the measurement
    time.sleep(max(0.0, start_at - time.time()))
    origin = time.perf_counter()
    latencies, failures = [], []
    for i in range(count):
        due = origin + i * interval
        if interval:
            time.sleep(max(0.0, due - time.perf_counter()))
        started = due if interval else time.perf_counter()
        status, answer = request(conn, method, path, body)
        latencies.append(time.perf_counter() - started)
        if status != 200 or not check(answer):
            failures.append(f"{status} {answer[:200]!r}")
    out.send((latencies, failures, time.time()))
    conn.close()


def measure(
    port: int,
    ca_pem: bytes,
    method: str,
    path: str,
    body: bytes,
    clients: int,
    total: int,
    check: Any,
    rate: float = 0.0,
) -> dict[str, float]:
    """Clients are separate processes so their own Python overhead does not queue behind one GIL.
    `rate` (requests per second over all clients, each client taking its share with a phase offset)
    makes it an open loop; 0 is a closed loop."""
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 0.5 + 0.1 * clients
    pipes, processes = [], []
    interval = clients / rate if rate else 0.0
    for index in range(clients):
        receive, send = context.Pipe(duplex=False)
        offset = index * interval / clients  # clients evenly interleaved: arrivals at `rate`
        share = total // clients
        process = context.Process(
            target=_client,
            args=(port, ca_pem, method, path, body, share, check, start_at + offset, interval, send),
        )
        process.start()
        pipes.append(receive)
        processes.append(process)
    results = [pipe.recv() for pipe in pipes]
    for process in processes:
        process.join()
    failures = [f for _, fs, _ in results for f in fs]
    if failures:
        raise SystemExit(f"{len(failures)} bad answers, e.g. {failures[0]}")
    flat = sorted(x for latencies, _, _ in results for x in latencies)
    elapsed = max(end for _, _, end in results) - start_at
    return {
        "rps": len(flat) / elapsed,
        "p50": statistics.median(flat) * 1000,
        "p99": flat[int(len(flat) * 0.99) - 1] * 1000,
        "max": flat[-1] * 1000,
        "requests": len(flat),
    }


WRK_SCRIPT = r"""
-- Sends BENCH_METHOD with the body in BENCH_BODY (if any); every answer must be a 200 whose body is
-- byte for byte the one in BENCH_EXPECTED. done() prints one JSON line for the bench to read.
local function slurp(path)
  local f = assert(io.open(path, "rb")); local data = f:read("*a"); f:close(); return data
end
wrk.method = os.getenv("BENCH_METHOD")
if os.getenv("BENCH_BODY") ~= "" then
  wrk.body = slurp(os.getenv("BENCH_BODY")); wrk.headers["Content-Type"] = "application/json"
end
local expected = slurp(os.getenv("BENCH_EXPECTED"))
wrong = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status ~= 200 or body ~= expected then wrong = wrong + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("wrong") end
  local e = summary.errors
  local line = '{"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"wrong": %d, "errors": %d}\n'
  io.write(string.format(line,
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    latency.max, bad, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def measure_native(
    port: int,
    workdir: Path,
    method: str,
    path: str,
    body: bytes,
    expected: bytes,
    clients: int,
    seconds: float,
) -> dict[str, float]:
    """A closed loop of `clients` keep-alive TLS connections driven by wrk for `seconds`, after an
    untimed second that opens the connections. Every answer is checked against `expected`."""
    script = workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    (workdir / "body").write_bytes(body)
    (workdir / "expected").write_bytes(expected)
    env = {
        **os.environ,
        "BENCH_METHOD": method,
        "BENCH_BODY": str(workdir / "body") if body else "",
        "BENCH_EXPECTED": str(workdir / "expected"),
    }
    url = f"https://127.0.0.1:{port}{path}"
    threads = str(min(clients, 2))
    results = []
    for duration in (1, seconds):
        out = subprocess.run(
            ["wrk", "-t", threads, "-c", str(clients), "-d", f"{duration}s", "-s", str(script), url],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=duration + 30,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    result = results[-1]
    if result["wrong"] or result["errors"]:
        raise SystemExit(f"wrk on {path}: {result['wrong']} wrong answers, {result['errors']} errors")
    return {
        "rps": result["requests"] / result["seconds"],
        "p50": result["p50_us"] / 1000,
        "p99": result["p99_us"] / 1000,
        "max": result["max_us"] / 1000,
        "requests": result["requests"],
        "sent": sum(r["requests"] for r in results),  # with the untimed second, for CPU per request
    }


def dropped_syns() -> int:
    """Connection attempts the kernel dropped or had to retry so far (machine-wide TcpExt counters:
    a full accept queue's ListenDrops, and SYNs retransmitted, each costing its client one second).
    A max latency near 1,000 ms in a cell where this moved is a dropped SYN, not the webhook."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    counters: dict[str, int] = {}
    for header, values in itertools.pairwise(lines):
        if header.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(header.split()[1:], map(int, values.split()[1:]), strict=True))
    return counters.get("ListenDrops", 0) + counters.get("TCPSynRetrans", 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the gunicorn workers (the children of `pid`) so far."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ticks = 0
    for child in children:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


# (label, concurrent keep-alive clients, requests per second over all of them; 0: closed loop).
# The closed loop at 8 keeps 8 requests in flight at all times: it saturates both cores, so its latency
# is mostly queueing. The open loops send at fixed rates, like an API server admitting pods: 200/s is
# already more pod creations than a large cluster sees, 500/s a burst well beyond.
SATURATED = "8 clients, closed loop"
LOADS = [
    ("1 client, closed loop", 1, 0.0),
    (SATURATED, 8, 0.0),
    ("8 clients, 200 req/s", 8, 200.0),
    ("8 clients, 500 req/s", 8, 500.0),
]
OPEN_LOOP_SECONDS = 8


def patched_with(containers: int) -> Any:
    """A check that the answer allows and patches, inserting a sidecar when `containers` is 4."""

    def check(answer: bytes) -> bool:
        response = json.loads(answer)["response"]
        ops = json.loads(base64.b64decode(response["patch"]))
        inserted = any(op["op"] == "add" and op["path"] == "/spec/containers/0" for op in ops)
        return bool(response["allowed"]) and inserted == (containers == 4)

    return check


def healthy(answer: bytes) -> bool:
    return bool(json.loads(answer)["ok"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=0, help="requests per open-loop cell")
    parser.add_argument("--seconds", type=float, default=0, help="seconds per closed-loop cell")
    args = parser.parse_args()
    total = args.requests or (500 if args.quick else 3000)
    seconds = args.seconds or (2 if args.quick else 5)
    api = ThreadingHTTPServer(("127.0.0.1", 0), StandInAPI)
    api.daemon_threads = True
    threading.Thread(target=api.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="iw-webhook-bench-") as tmp:
        workdir = Path(tmp)
        process, port, ca_pem = start_webhook(workdir, f"http://127.0.0.1:{api.server_address[1]}")
        try:
            cells = [
                ("healthz (anchor)", "GET", "/healthz", b"", healthy),
                ("pod, no SidecarSet", "POST", "/mutate", review({"app": "shop"}), patched_with(3)),
                ("pod + SidecarSet", "POST", "/mutate", review({"app": "web"}), patched_with(4)),
            ]
            # The answer each cell must get, checked once over verified TLS; wrk compares every
            # answer with it byte for byte.
            context = ssl.create_default_context()
            context.load_verify_locations(cadata=ca_pem.decode())
            expected = {}
            for name, method, path, body, check in cells:
                status, answer = request(connect(port, context), method, path, body)
                if status != 200 or not check(answer):
                    raise SystemExit(f"{name}: unexpected answer {status} {answer[:300]!r}")
                expected[name] = answer
            rows = []
            for label, clients, rate in LOADS:
                results = {}
                for name, method, path, body, check in cells:
                    before, drops = cpu_seconds(process.pid), dropped_syns()
                    if rate:
                        count = min(total, int(rate * OPEN_LOOP_SECONDS))
                        result = measure(port, ca_pem, method, path, body, clients, count, check, rate)
                    else:
                        result = measure_native(
                            port, workdir, method, path, body, expected[name], clients, seconds
                        )
                    sent = result.get("sent", result["requests"])
                    result["cpu"] = (cpu_seconds(process.pid) - before) / sent * 1000
                    result["drops"] = dropped_syns() - drops
                    results[name] = result
                anchor = results["healthz (anchor)"]
                for name, result in results.items():
                    rows.append(
                        (name, label, result, result["p50"] / anchor["p50"], result["p99"] / anchor["p99"])
                    )
        finally:
            process.terminate()
            process.wait(15)
            api.shutdown()
    print(
        f"\nimagewarm webhook, gunicorn, 2 workers, a thread per connection, TLS keep-alive, "
        f"{os.cpu_count()} CPUs shared with the clients, load average {os.getloadavg()[0]:.1f} at the end; "
        f"closed loops: wrk, {seconds:g} s per cell; open loops: Python clients, "
        f"up to {total} requests per cell; "
        f"cpu ms: the server's CPU time per request; SYN drops: the kernel's, machine-wide, during the cell\n"
    )
    print(
        f"{'request':<22}{'load':>24}{'req/s':>8}{'cpu ms':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'p50/anchor':>12}{'p99/anchor':>12}{'SYN drops':>11}"
    )
    for name, label, result, ratio, ratio99 in rows:
        print(
            f"{name:<22}{label:>24}{result['rps']:>8.0f}{result['cpu']:>8.2f}{result['p50']:>9.2f}"
            f"{result['p99']:>9.2f}{result['max']:>9.2f}{ratio:>12.2f}{ratio99:>12.2f}{result['drops']:>11.0f}"
        )
    saturated = [r for name, label, r, _, _ in rows if label == SATURATED]
    mutate = [(label, r) for name, label, r, _, _ in rows if name != "healthz (anchor)"]
    worst = max(r["p99"] for label, r in mutate if label == SATURATED)
    worst_open = max(r["p99"] for label, r in mutate if "req/s" in label)
    cores = os.cpu_count() or 1
    print(
        f"\ngoal p99 <= 5 ms at 8 clients: {'met' if worst <= 5 else 'NOT met'} in the closed loop "
        f"(worst mutate p99 {worst:.2f} ms); open loops: worst p99 {worst_open:.2f} ms"
    )
    print(
        "Little's law floor for the closed loop of 8 (mean latency >= 8 x server CPU per request / "
        f"{cores} cores, with free clients and no variance): "
        + ", ".join(f"{8 * r['cpu'] / cores:.2f} ms" for r in saturated)
        + " for "
        + ", ".join(name for name, label, _, _, _ in rows if label == SATURATED)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
