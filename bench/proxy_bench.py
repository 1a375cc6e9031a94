"""Throughput of `imagewarm proxy` against the alternatives, on the same synthetic layers, in one run.

    python bench/proxy_bench.py            # 256 MiB and 1 GiB layers
    python bench/proxy_bench.py --quick    # 32 MiB and 64 MiB, to try it out

Rows (MiB/s, the median of --runs runs, every column measured by the same client: curl discarding
the body; each run uses a fresh layer, read from the upstream directly just before the proxy's cold
fetch of the same file, and starts from one state, see `start_clean`): the upstream docker-registry
directly; the same GET written to a new file (`curl -o`) and that file hashed (`openssl dgst
-sha256`), the two halves of the work any verifying cache must do; the proxy cold (first fetch, teed
into its cache) and warm (from its cache, sendfile); docker-registry as a pull-through cache cold
and warm; nginx (Debian's nginx, its own config on loopback, sendfile on) serving the same blob
files. Ratios: proxy warm / nginx (goal >= 0.9), proxy cold / upstream direct (goal >= 0.9), proxy
cold / to-file. A second table puts a network link (tc on loopback, 1 and 4 Gbit/s) between the
upstream and its clients: what the cold columns become when the network bounds the upstream. Then
the SHA-256 ceiling of any verifying cache; a restart with 50,000 blobs cached; 16 concurrent cold
fetches of one blob through a fresh proxy: how many times the upstream served it (goal 1); and the
proxy's peak RSS per process while 16 clients read warm.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from localcluster.images import Blob, ImageBuilder, push
from localcluster.processes import free_ports
from localcluster.registry import Registry, start_registry

MiB = 1 << 20


def curl_speed(url: str, output: str = "/dev/null") -> float:
    """MiB/s of one GET, the body discarded or written to `output` (curl reports bytes per second)."""
    out = subprocess.run(
        ["curl", "-sf", "-o", output, "-w", "%{speed_download}", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    return float(out) / MiB


def start_clean(*warm_urls: str) -> None:
    """Every run starts from one state: no dirty pages, the page cache emptied, the blobs every
    reading column serves read once (untimed) so they come from memory.

    Without the flush, writers are throttled to the disk's speed while the kernel writes back what
    earlier steps (pushes, earlier runs) left dirty. Without emptying the cache, on a freshly booted
    VM the columns that write grow the page cache into guest memory never touched since boot, which
    costs several times a write into recycled memory (measured here: ~600 vs ~3,500 MiB/s), until
    the machine has used all of its memory once; a node that has been up for a while recycles.
    Emptying the cache needs root; without it the runs go on as they are."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1")
    for url in warm_urls:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True, timeout=600)


def hash_speed(path: Path, digest: str) -> float:
    """MiB/s of `openssl dgst -sha256` (SHA-NI where the CPU has it) over a file in the page cache:
    the other half of a verifying cache's work, on one core (a digest cannot be split). `path` is
    removed afterwards."""
    started = time.perf_counter()
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r", str(path)], check=True, capture_output=True, text=True
    ).stdout
    elapsed = time.perf_counter() - started
    if f"sha256:{out.split()[0]}" != digest:
        raise RuntimeError(f"{path} hashed to {out.split()[0]}, expected {digest}")
    size = path.stat().st_size
    path.unlink()
    return size / MiB / elapsed


def write_speed(path: Path, size: int) -> float:
    """MiB/s of writing `size` MiB of new data to a file and fsyncing it: the ceiling of any cache that
    keeps what it relays (on some VMs, growing the page cache into fresh memory is the slow part)."""
    block = os.urandom(MiB)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(size):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - started)


def sha256_speed(total_mib: int = 1024) -> float:
    """MiB/s of hashlib's SHA-256 (OpenSSL, SHA-NI where the CPU has it) over bytes already in memory,
    on one core: the ceiling of any cache that verifies a blob before it ends the client's transfer,
    since a digest is one sequential computation that cannot end before its last byte."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(total_mib):
        digest.update(block)
    return total_mib / (time.perf_counter() - started)


class LinkShaper:
    """What a local TCP port sends is limited to `gbits` Gbit/s (an htb class on loopback, matched by
    source port), as if that server sat across a network link; all other loopback traffic stays
    unshaped. Needs root and the kernel's htb scheduler; `available()` says whether both are here."""

    def __init__(self, port: int, gbits: float) -> None:
        self.port = port
        self.gbits = gbits

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0 or shutil.which("tc") is None:
            return False
        shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        return "htb" not in shown and "noqueue" in shown  # nobody else shapes loopback

    def __enter__(self) -> LinkShaper:
        rate = f"{self.gbits:g}gbit"
        for command in (
            "qdisc add dev lo root handle 1: htb default 10",
            "class add dev lo parent 1: classid 1:10 htb rate 100gbit",
            f"class add dev lo parent 1: classid 1:20 htb rate {rate} ceil {rate} burst 1mb",
            f"filter add dev lo parent 1: protocol ip u32 match ip sport {self.port} 0xffff flowid 1:20",
        ):
            subprocess.run(["tc", *command.split()], check=True, capture_output=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


def recovery_seconds(root: Path, blobs: int) -> float:
    """Seconds for a proxy's store to open after a restart with `blobs` blobs cached (the store
    recounts bytes with one stat per blob and hashes nothing; the files here are small stand-ins)."""
    from imagewarm.digest import Digest
    from proxy.cache.store import BlobStore

    store = BlobStore(root)
    for i in range(blobs):
        target = store.layout.blob(Digest.of(str(i).encode()))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    store.close()
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")  # a restart after a reboot: cold metadata
    started = time.perf_counter()
    store = BlobStore(root)
    elapsed = time.perf_counter() - started
    if store.total_bytes() != blobs:
        raise RuntimeError(f"recovery counted {store.total_bytes()} bytes, expected {blobs}")
    store.close()
    return elapsed


class Proxy:
    def __init__(self, workdir: Path, upstream: Registry, workers: int = 4) -> None:
        self.port = free_ports(1)[0]
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEWARM_")}
        env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagewarm",
                "proxy",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--cache-dir",
                str(workdir / "cache"),
                "--insecure-upstream",
                upstream.host,
                "--workers",
                str(workers),
            ],
            stdout=(workdir / "proxy.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_for(f"http://127.0.0.1:{self.port}/readyz")

    def settle(self, timeout: float = 60) -> None:
        """Wait until no fetch is in flight (a cold fetch commits, fsync and rename, after its client
        has the last byte; a read before that follows the partial file instead of the cache)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
            values = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("imagewarm_proxy_inflight_fetches")
            ]
            if sum(values) == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("the proxy's fetches did not finish")

    def url(self, upstream: Registry, repository: str, digest: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/{upstream.host}/{repository}/blobs/{digest}"

    def rss_mib(self) -> list[float]:
        """RSS of the master and each worker."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        sizes = []
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]) / 1024)
            except FileNotFoundError:
                continue
        return sizes

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(20)


class Nginx:
    def __init__(self, workdir: Path, files: Path) -> None:
        self.port = free_ports(1)[0]
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        # As root, nginx workers drop to www-data, which cannot read our private temp directory.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""
{user}
daemon off;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {workdir}/tmp; proxy_temp_path {workdir}/tmp; fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp; scgi_temp_path {workdir}/tmp;
    server {{ listen 127.0.0.1:{self.port}; root {files}; }}
}}
""")
        self.process = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(workdir)],
            start_new_session=True,
            stderr=(workdir / "stderr.log").open("wb"),
        )
        wait_for(f"http://127.0.0.1:{self.port}/", ok=(200, 403, 404))

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(20)


def wait_for(url: str, ok: tuple[int, ...] = (200,), timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def wait_background_fetches(registry: Registry, digest: str, timeout: float = 120) -> None:
    """Wait until the upstream has served no new GET of `digest` for 2 s: distribution's pull-through
    goes on fetching a blob in the background after its client is served, and that work must not
    overlap the next run's columns."""
    deadline = time.monotonic() + timeout
    seen = len(registry.blob_gets(digest=digest))
    while time.monotonic() < deadline:
        time.sleep(2)
        now = len(registry.blob_gets(digest=digest))
        if now == seen:
            return
        seen = now


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="32 MiB and 64 MiB layers instead of 256 MiB and 1 GiB"
    )
    parser.add_argument("--sizes", help="comma-separated layer sizes in MiB (overrides --quick)")
    parser.add_argument("--runs", type=int, default=3, help="runs per size (the table shows medians)")
    parser.add_argument(
        "--link-gbits",
        default="1,4",
        help="comma-separated link speeds (Gbit/s) to put between the upstream and its clients for the "
        "link table ('' skips it)",
    )
    args = parser.parse_args()
    link_speeds = [float(g) for g in args.link_gbits.split(",") if g]
    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else ([32, 64] if args.quick else [256, 1024])
    )
    if shutil.which("nginx") is None or shutil.which("curl") is None:
        print("needs nginx (Debian nginx-light) and curl", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="imagewarm-proxy-bench-"))
    stoppers: list = []
    try:
        builder = ImageBuilder(work / "images")
        upstream = start_registry(work / "upstream")
        stoppers.append(upstream.stop)
        pull_through = start_registry(work / "pull-through", proxy_remote_url=upstream.url)
        stoppers.append(pull_through.stop)
        files = work / "nginx-files"
        files.mkdir()
        # One distinct layer per size and run: every cold column meets a blob it has never seen, and the
        # upstream-direct and proxy-cold columns of a run read the very same file just before each other.
        layers: dict[int, list[tuple[str, Blob]]] = {size: [] for size in sizes}
        for size in sizes:
            for run in range(args.runs):
                image = builder.synthetic(
                    layers=1, layer_size=size * MiB, compressed=False, seed=1000 + 100 * run + size
                )
                repository = f"bench/l{size}-{run}"
                push(upstream, repository, "v1", image)
                layer = image.layers[0]
                _link_or_copy(layer.path, files / layer.digest.split(":")[1])
                layers[size].append((repository, layer))
        proxy = Proxy(work / "proxy", upstream)
        stoppers.append(proxy.stop)
        nginx = Nginx(work / "nginx", files)
        stoppers.append(nginx.stop)

        rows = []
        for size in sizes:
            samples: list[tuple[float, ...]] = []
            for repository, layer in layers[size]:
                d = layer.digest
                nginx_url = f"http://127.0.0.1:{nginx.port}/{d.split(':')[1]}"
                start_clean(f"{upstream.url}/v2/{repository}/blobs/{d}", nginx_url)
                direct = curl_speed(f"{upstream.url}/v2/{repository}/blobs/{d}")
                os.sync()  # a timed writer never waits for an earlier step's writeback
                to_file = curl_speed(f"{upstream.url}/v2/{repository}/blobs/{d}", str(work / "copy"))
                hashing = hash_speed(work / "copy", d)
                os.sync()
                cold = curl_speed(proxy.url(upstream, repository, d))
                proxy.settle()
                os.sync()
                warm = curl_speed(proxy.url(upstream, repository, d))
                os.sync()
                ptc_cold = curl_speed(f"{pull_through.url}/v2/{repository}/blobs/{d}")
                ptc_warm = curl_speed(f"{pull_through.url}/v2/{repository}/blobs/{d}")
                ngx = curl_speed(nginx_url)
                wait_background_fetches(upstream, d)
                samples.append((direct, to_file, hashing, cold, warm, ptc_cold, ptc_warm, ngx))
            medians = tuple(statistics.median(column) for column in zip(*samples, strict=True))
            rows.append((size, *medians))

        # The upstream logs a GET when it ends: give background copies time, then count per blob what is
        # neither the direct read nor the proxy's fetch.
        time.sleep(5)
        every = [layer for runs in layers.values() for _, layer in runs]
        ptc_fetches = [len(upstream.blob_gets(digest=layer.digest)) - 2 for layer in every]

        # The upstream across a link: what the two cold columns become when the network, not the CPU,
        # bounds the upstream (as for a registry that is not on the node). Fresh layers again.
        links = []
        if link_speeds and not LinkShaper.available():
            print("link table skipped: needs root, tc and the htb scheduler", file=sys.stderr)
            link_speeds = []
        for gbits in link_speeds:
            link_samples = []
            for run in range(args.runs):
                image = builder.synthetic(
                    layers=1, layer_size=sizes[0] * MiB, compressed=False, seed=7000 + 100 * run + int(gbits)
                )
                repository = f"bench/link{gbits:g}-{run}"
                push(upstream, repository, "v1", image)
                d = image.layers[0].digest
                start_clean(f"{upstream.url}/v2/{repository}/blobs/{d}")
                with LinkShaper(upstream.port, gbits):
                    direct = curl_speed(f"{upstream.url}/v2/{repository}/blobs/{d}")
                    cold = curl_speed(proxy.url(upstream, repository, d))
                    proxy.settle()
                    ptc_cold = curl_speed(f"{pull_through.url}/v2/{repository}/blobs/{d}")
                    wait_background_fetches(upstream, d)
                link_samples.append((direct, cold, ptc_cold))
            links.append((gbits, *(statistics.median(c) for c in zip(*link_samples, strict=True))))

        # Fan-in: a fresh proxy, 16 concurrent cold fetches of the largest blob.
        size = sizes[-1]
        repository, layer = layers[size][0]
        fresh = Proxy(work / "proxy-fanin", upstream)
        stoppers.append(fresh.stop)
        since = len(upstream.requests())
        url = fresh.url(upstream, repository, layer.digest)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: curl_speed(url), range(16)))
        fetches = len(upstream.blob_gets(digest=layer.digest, since=since))
        # Warm: 16 concurrent readers of the same blob, RSS sampled meanwhile.
        peak: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(max(fresh.rss_mib() or [0.0]))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: curl_speed(url), range(16)))
        done.set()
        sampler.join()

        print(
            f"\nimagewarm proxy benchmark (MiB/s, median of {args.runs} runs; curl, loopback, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})\n"
        )
        header = (
            f"{'layer':>8} {'upstream':>9} {'to file':>8} {'sha256':>7} {'proxy cold':>11} "
            f"{'proxy warm':>11} {'ptc cold':>9} {'ptc warm':>9} {'nginx':>8} {'warm/nginx':>11} "
            f"{'cold/upstr':>11} {'cold/to file':>13} {'ptc cold/upstr':>15}"
        )
        print(header)
        print("-" * len(header))
        for size, direct, to_file, hashing, cold, warm, ptc_cold, ptc_warm, ngx in rows:
            print(
                f"{size:>5}MiB {direct:>9.0f} {to_file:>8.0f} {hashing:>7.0f} {cold:>11.0f} {warm:>11.0f} "
                f"{ptc_cold:>9.0f} {ptc_warm:>9.0f} {ngx:>8.0f} {warm / ngx:>11.2f} {cold / direct:>11.2f} "
                f"{cold / to_file:>13.2f} {ptc_cold / direct:>15.2f}"
            )
        if links:
            print(
                f"\nupstream across a link (tc htb on loopback; {sizes[0]} MiB layers, MiB/s, median of "
                f"{args.runs} runs)\n"
            )
            header = (
                f"{'link':>10} {'upstream':>9} {'proxy cold':>11} {'ptc cold':>9} {'cold/upstr':>11} "
                f"{'ptc cold/upstr':>15}"
            )
            print(header)
            print("-" * len(header))
            for gbits, direct, cold, ptc_cold in links:
                print(
                    f"{gbits:>5g} Gbit/s {direct:>9.0f} {cold:>11.0f} {ptc_cold:>9.0f} "
                    f"{cold / direct:>11.2f} {ptc_cold / direct:>15.2f}"
                )
        hashing_ceiling = sha256_speed()
        fastest = max(direct for _, direct, *_ in rows)
        print(
            f"\nsha256 in memory on one core (hashlib): {hashing_ceiling:.0f} MiB/s. A cache that verifies a "
            f"blob before it ends the client's transfer cannot serve one cold blob faster: on loopback, "
            f"that is {hashing_ceiling / fastest:.2f}x the upstream read directly (goal 0.9x)"
        )
        recovery = recovery_seconds(work / "recovery", 50_000)
        print(
            f"restart with 50,000 blobs cached: the store opens in {recovery:.2f} s "
            "(one stat per blob, no hashing)"
        )
        disk = statistics.median(write_speed(work / f"write-{i}", sizes[-1]) for i in range(args.runs))
        print(f"\nwriting {sizes[-1]} MiB of new data to a file here (+fsync): {disk:.0f} MiB/s")
        print(
            f"docker-registry pull-through: upstream GETs per blob for its cold and warm reads "
            f"{sorted(set(ptc_fetches))} (the proxy: 1); distribution relays the client's copy straight from "
            "the upstream and fills its storage with fetches of its own, so its cold column writes nothing "
            "on the client's path, while the proxy's writes, verifies and caches what it sends"
        )
        print(
            f"fan-in: 16 concurrent cold fetches of the {size} MiB blob -> upstream served it {fetches}x "
            "(goal 1)"
        )
        print(
            f"proxy RSS while 16 clients read it warm: peak {max(peak or [0]):.0f} MiB per process "
            "(goal < 100)"
        )
        return 0
    finally:
        for stop in reversed(stoppers):
            try:
                stop()
            except Exception as exc:
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    if os.stat(source).st_dev == os.stat(target.parent).st_dev:
        os.link(source, target)
    else:
        shutil.copyfile(source, target)


if __name__ == "__main__":
    sys.exit(main())
