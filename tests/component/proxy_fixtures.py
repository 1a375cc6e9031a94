"""A real `imagewarm proxy` (gunicorn, several workers) as a subprocess on a free port (loopback unless
`ip` says otherwise: the API server refuses loopback endpoint addresses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from localcluster import scrape
from localcluster.processes import free_ports


@dataclass
class ProxyProcess:
    port: int
    cache_dir: Path
    log_path: Path
    args: list[str]
    env: dict[str, str]
    ip: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 30, ready: bool = True) -> ProxyProcess:
        """Start and wait until `/readyz` answers 200 (`ready=False`: until `/healthz` does)."""
        probe = "/readyz" if ready else "/healthz"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"imagewarm proxy exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}{probe}", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"imagewarm proxy not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        return scrape.metric(self.url, name, **labels)


def start_proxy(
    workdir: Path,
    *,
    upstreams: tuple[str, ...] = (),
    insecure: tuple[str, ...] = (),
    cache_dir: Path | None = None,
    extra: tuple[str, ...] = (),
    workers: int = 3,
    ip: str = "127.0.0.1",
    port: int | None = None,
    ready: bool = True,
) -> ProxyProcess:
    port = port or free_ports(1, host=ip)[0]
    cache_dir = cache_dir or workdir / "cache"
    args = [
        sys.executable,
        "-m",
        "imagewarm",
        "proxy",
        "--listen",
        f"{ip}:{port}",
        "--cache-dir",
        str(cache_dir),
        "--workers",
        str(workers),
        "--log-format",
        "text",
        "--connect-timeout",
        "2s",
    ]
    for host in upstreams:
        args += ["--upstream", host]
    for host in insecure:
        args += ["--insecure-upstream", host]
    args += list(extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEWARM_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / f"metrics-{port}")
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = ProxyProcess(port, cache_dir, workdir / f"proxy-{port}.log", args, env, ip)
    return proxy.start(ready=ready)


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def factory(**kwargs: object) -> ProxyProcess:
        proxy = start_proxy(tmp_path / f"proxy{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()
