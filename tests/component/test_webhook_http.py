"""The webhook served by gunicorn over TLS, as the API server reaches it: real processes, real TLS."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagewarm import certs
from localcluster.processes import free_ports

pytestmark = pytest.mark.component

REPO = Path(__file__).resolve().parents[2]


def write_pair(directory: Path, ca: certs.CertKey) -> None:
    leaf = certs.issue(ca, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (directory / "tls.key.new").write_bytes(leaf.key_pem)
    (directory / "tls.crt.new").write_bytes(leaf.cert_pem)
    os.replace(directory / "tls.key.new", directory / "tls.key")
    os.replace(directory / "tls.crt.new", directory / "tls.crt")


class Served:
    def __init__(self, url: str, ca_file: Path, tls_dir: Path, process: subprocess.Popen[bytes]) -> None:
        self.url, self.ca_file, self.tls_dir, self.process = url, ca_file, tls_dir, process
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA
        self.session.verify = str(ca_file)

    def post(self, body: bytes | dict[str, Any], **kwargs: Any) -> requests.Response:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.session.post(
            self.url + "/mutate",
            data=data,
            timeout=10,
            headers={"Content-Type": "application/json"},
            **kwargs,
        )


def serve(tmp: Path, *extra: str) -> Served:
    tls_dir = tmp / "tls"
    tls_dir.mkdir()
    ca = certs.new_ca("test-ca")
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    write_pair(tls_dir, ca)
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
            str(tls_dir),
            "--sidecarsets",
            "false",
            "--workers",
            "2",
            "--connections",
            "64",
            "--exclude-registry",
            "quay.io",
            "--log-format",
            "text",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    served = Served(f"https://127.0.0.1:{port}", tmp / "ca.crt", tls_dir, process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"webhook exited: {process.stdout.read().decode() if process.stdout else ''}"
            )
        try:
            if served.session.get(served.url + "/healthz", timeout=1).ok:
                return served
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("webhook did not answer /healthz within 30 s")


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(tmp_path_factory.mktemp("webhook"))
    yield served
    served.process.terminate()
    try:
        served.process.wait(10)
    except subprocess.TimeoutExpired:
        served.process.kill()


def review(pod: Any, **request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": pod,
            **request,
        },
    }


POD = {
    "metadata": {"name": "p", "namespace": "default"},
    "spec": {
        "initContainers": [{"name": "init", "image": "busybox:1.36"}],
        "containers": [
            {"name": "app", "image": "registry.corp:5000/team/app:1"},
            {"name": "exporter", "image": "quay.io/prometheus/node-exporter:v1"},
        ],
    },
}


def test_create_over_tls_returns_the_patch(webhook: Served) -> None:
    reply = webhook.post(review(POD))
    assert reply.status_code == 200
    answer = reply.json()["response"]
    assert answer["uid"] == "u-1" and answer["allowed"] and answer["patchType"] == "JSONPatch"
    pod = jsonpatch.apply_patch(POD, json.loads(base64.b64decode(answer["patch"])))
    assert pod["spec"]["initContainers"][0]["image"] == "localhost:7439/docker.io/library/busybox:1.36"
    assert [c["image"] for c in pod["spec"]["containers"]] == [
        "localhost:7439/registry.corp_5000/team/app:1",
        "quay.io/prometheus/node-exporter:v1",
    ]
    assert json.loads(pod["metadata"]["annotations"]["imagewarm.io/original-images"]) == {
        "app": "registry.corp:5000/team/app:1",
        "init": "busybox:1.36",
    }


def test_keep_alive_connection_serves_many_requests(webhook: Served) -> None:
    for _ in range(20):
        assert webhook.post(review(POD)).status_code == 200


@pytest.mark.parametrize(("body", "status"), [(b"{", 400), (b'{"apiVersion": "v1"}', 400), (b"null", 400)])
def test_bad_bodies_are_4xx_with_a_message(webhook: Served, body: bytes, status: int) -> None:
    reply = webhook.post(body)
    assert reply.status_code == status and reply.json()["error"]


def test_a_body_over_the_limit_is_413_not_a_hang(webhook: Served) -> None:
    started = time.monotonic()
    reply = webhook.post(b"{" + b" " * (4 * 1024 * 1024) + b"}")
    assert reply.status_code == 413 and "Too Large" in reply.json()["error"]
    assert time.monotonic() - started < 10


def test_plain_http_is_refused(webhook: Served) -> None:
    with pytest.raises(requests.RequestException):
        requests.post(webhook.url.replace("https", "http") + "/mutate", data=b"{}", timeout=5)


def test_metrics_count_requests_from_every_worker(webhook: Served) -> None:
    for _ in range(10):
        webhook.post(review(POD))
    text = webhook.session.get(webhook.url + "/metrics", timeout=5).text
    total = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("imagewarm_webhook_request_duration_seconds_count")
    )
    assert total >= 10
    assert 'imagewarm_webhook_decisions_total{decision="patched"}' in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        ).map(lambda v: json.dumps(review(v)).encode()),
    )
)
def test_fuzz_over_tls_never_5xx(webhook: Served, body: bytes) -> None:
    assert webhook.post(body).status_code in (200, 400)


def test_certificate_files_replaced_are_served_without_restart(tmp_path: Path) -> None:
    served = serve(tmp_path)
    try:
        assert served.post(review(POD)).status_code == 200
        new_ca = certs.new_ca("rotated-ca")
        write_pair(served.tls_dir, new_ca)
        (tmp_path / "new-ca.crt").write_bytes(new_ca.cert_pem)
        context = ssl.create_default_context(cafile=str(tmp_path / "new-ca.crt"))
        host, port = served.url.removeprefix("https://").split(":")
        deadline = time.monotonic() + 10
        while True:
            try:
                with (
                    socket.create_connection((host, int(port)), timeout=5) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
                break
            except ssl.SSLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # Each worker re-reads the files at most once a second, on a new connection: past that interval
        # every worker serves the new certificate.
        time.sleep(1.2)
        fresh = requests.Session()
        fresh.trust_env = False
        fresh.verify = str(tmp_path / "new-ca.crt")
        assert fresh.post(served.url + "/mutate", json=review(POD), timeout=5).status_code == 200
    finally:
        served.process.terminate()
        served.process.wait(10)


def _keep_alive_request(served: Served, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection that has made one request and stays open (HTTP/1.1 keep-alive)."""
    host, port = served.url.removeprefix("https://").split(":")
    tls = context.wrap_socket(
        socket.create_connection((host, int(port)), timeout=5), server_hostname="localhost"
    )
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert tls.recv(65536).startswith(b"HTTP/1.1 200")
    return tls


def test_silent_and_idle_connections_neither_block_requests_nor_a_stop(tmp_path: Path) -> None:
    """Each connection has its own thread: a client stuck before its TLS handshake and many idle
    keep-alive connections do not delay other requests, and SIGTERM ends the server promptly."""
    served = serve(tmp_path)
    context = ssl.create_default_context(cafile=str(served.ca_file))
    host, port = served.url.removeprefix("https://").split(":")
    silent = socket.create_connection((host, int(port)), timeout=5)  # never starts TLS
    idle = [_keep_alive_request(served, context) for _ in range(40)]
    try:
        for _ in range(5):
            assert served.post(review(POD)).status_code == 200
        started = time.monotonic()
        served.process.terminate()
        served.process.wait(10)
        # Graceful stop closes idle connections after their 2 s for a last review, instead of
        # waiting out their 120 s keep-alive.
        assert time.monotonic() - started < 6
        assert served.process.returncode == 0
    finally:
        served.process.kill()
        silent.close()
        for tls in idle:
            tls.close()


def test_on_a_stop_an_idle_keep_alive_connection_still_carries_a_review(tmp_path: Path) -> None:
    """The API server sends each review on a connection it holds open; a review sent on one just
    after SIGTERM is answered (with `Connection: close`), not lost with a closed connection (which,
    with failurePolicy Ignore, admits its pod unrewritten)."""
    served = serve(tmp_path)
    context = ssl.create_default_context(cafile=str(served.ca_file))
    idle = [_keep_alive_request(served, context) for _ in range(4)]
    body = json.dumps(review(POD)).encode()
    try:
        served.process.terminate()
        time.sleep(1.4)  # past when the workers used to close idle connections (their next heartbeat)
        for tls in idle:
            tls.sendall(
                b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b"connection: close" in head.lower()
            assert json.loads(payload)["response"]["patch"]
        served.process.wait(10)
        assert served.process.returncode == 0
    finally:
        served.process.kill()
        for tls in idle:
            tls.close()


def _established(port: int) -> list[str]:
    """`ss` lines of the established connections to `port` that a server process holds (accepted)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if "pid=" in line]


def _holders(port: int, clients: list[ssl.SSLSocket]) -> list[int]:
    """How many of the `clients`' connections to `port` each server process holds (from `ss`),
    largest first."""
    ours = {f"127.0.0.1:{tls.getsockname()[1]}" for tls in clients}
    counts: dict[str, int] = {}
    for line in _established(port):
        pid = re.search(r"pid=(\d+)", line)
        if pid and line.split()[3] in ours:
            counts[pid.group(1)] = counts.get(pid.group(1), 0) + 1
    return sorted(counts.values(), reverse=True)


def test_keep_alive_connections_are_shared_between_workers(tmp_path: Path) -> None:
    """The API server keeps a few long-lived connections: if one worker took them all, the other
    would idle while requests queue. Workers holding connections defer their accept."""
    served = serve(tmp_path)  # 2 workers
    context = ssl.create_default_context(cafile=str(served.ca_file))
    # All at once, as a client with a connection pool opens them under load.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        connections = list(pool.map(lambda _: _keep_alive_request(served, context), range(8)))
    try:
        holders = _holders(int(served.url.rsplit(":", 1)[1]), connections)
        assert sum(holders) == 8
        assert len(holders) == 2 and holders[0] <= 5, f"connections per worker: {holders}"
    finally:
        for tls in connections:
            tls.close()
        served.process.terminate()
        served.process.wait(10)


def _workers(served: Served) -> list[int]:
    """The pids of the gunicorn workers (the arbiter's children)."""
    pid = served.process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_worker_memory_does_not_grow_with_what_clients_send(tmp_path: Path) -> None:
    """Anyone allowed to create a pod decides what the webhook reads: distinct 1 MB (invalid) image
    strings, review after review, must not be kept (they were, twice per cached decision: 1.8 MB a
    review, 535 MiB over 300). A memory-safety bound far above noise, not a measurement."""
    served = serve(tmp_path, "--workers", "1")
    try:
        [worker] = _workers(served)

        def junk(i: int) -> dict[str, Any]:
            image = f"Registry.Example/{i:06d}/" + "A" * (1024 * 1024)  # upper case: not a reference
            pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": image}]}}
            return review(pod, uid=f"u-{i}")

        for i in range(20):  # warm-up: imports, TLS, buffers at their working size
            assert served.post(junk(i)).status_code == 200
        before = _rss_mib(worker)
        for i in range(20, 320):
            answer = served.post(junk(i)).json()["response"]
            assert answer["allowed"] is True and "patch" not in answer
            assert len(answer["warnings"][0]) <= 120  # what a warning quotes is cut
        grown = _rss_mib(worker) - before
        assert grown < 50, f"the worker's RSS grew {grown:.0f} MiB over 300 reviews of 1 MB images"
    finally:
        served.process.terminate()
        served.process.wait(10)


def _listen_counters() -> dict[str, int]:
    """The kernel's counts of connections a listener dropped (its accept queue full), machine-wide."""
    out = subprocess.run(
        ["nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpExt")}


def _accept_queue(port: int) -> int:
    """Connections waiting in the listener's accept queue (`ss` Recv-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"( sport = :{port} )"], check=True, capture_output=True, text=True
    ).stdout
    return int(out.split()[1])


def test_a_burst_of_connections_beyond_the_backlog_is_accepted_without_a_drop(tmp_path: Path) -> None:
    """A connection the accept queue has no room for is dropped, and its client retries after one
    second (the webhook's one-second stalls). Workers defer accepts to share connections, but never
    while connections queue: a burst larger than the backlog (2048) is accepted before it fills."""
    served = serve(tmp_path, "--connections", "1300")  # 2 workers: room for the whole burst
    port = int(served.url.rsplit(":", 1)[1])
    burst = 2300
    clients: list[socket.socket] = []
    try:
        before = _listen_counters()
        for _ in range(burst):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            clients.append(client)
        deadline = time.monotonic() + 120
        while _accept_queue(port) > 0 or len(_established(port)) < burst:
            assert time.monotonic() < deadline, "the workers did not accept the burst within 120 s"
            time.sleep(0.2)
        after = _listen_counters()
        assert after == before, f"connections dropped by a full accept queue: {before} -> {after}"
    finally:
        for client in clients:
            client.close()
        served.process.terminate()
        served.process.wait(20)
