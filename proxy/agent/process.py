"""The node agent's own process: one per node, started and supervised by the proxy's gunicorn
master, never by a worker.

Why a process and not threads in the master: the master forks workers at start and whenever one
dies, and a fork while another thread of the master is inside OpenSSL (the agent's TLS to the API
server, hashing) can leave the child holding a lock forever; measured here, 4 of 300 forks hung.
A fresh interpreter (fork+exec) shares nothing with the workers but the cache on disk, the metrics
directory and the listening port it pulls through.

The master writes the pickled ProxyConfig to the agent's stdin; the agent exits when its parent
does (it polls its parent pid) and the master restarts it, with backoff, if it dies.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading

from proxy.config import ProxyConfig

log = logging.getLogger("imagewarm.proxy.agent")

RESTART_BASE_SECONDS = 1.0
RESTART_CAP_SECONDS = 60.0


class AgentProcess:
    """Started in the gunicorn master (`when_ready`); `stop()` at its exit."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.popen: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    def start(self) -> AgentProcess:
        threading.Thread(target=self._supervise, name="agent-supervisor", daemon=True).start()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        popen = subprocess.Popen([sys.executable, "-m", "proxy.agent"], stdin=subprocess.PIPE)
        assert popen.stdin is not None
        popen.stdin.write(pickle.dumps(self.config))
        popen.stdin.close()
        return popen

    def _supervise(self) -> None:
        delay = RESTART_BASE_SECONDS
        while not self._stop.is_set():
            try:
                self.popen = self._spawn()
            except OSError as exc:
                log.error("cannot start the node agent; retrying", extra={"error": str(exc)})
            else:
                code = self.popen.wait()  # 0 also when gunicorn's SIGCHLD handler reaped it first
                _mark_dead(self.popen.pid)
                if self._stop.is_set():
                    return
                log.error(
                    "the node agent exited; restarting it",
                    extra={"exit_code": code, "retry_seconds": delay},
                )
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RESTART_CAP_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()


def _mark_dead(pid: int) -> None:
    """Its live gauges leave the aggregated metrics (counters stay, as for workers)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
