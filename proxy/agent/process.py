"""The node agent's own process: one per node, started and supervised by the proxy's gunicorn
master, never by a worker.

Why a process and not threads in the master: the master forks workers at start and whenever one
dies, and a fork while another thread of the master is inside OpenSSL (the agent's TLS to the API
server, hashing) can leave the child holding a lock forever; measured here, 4 of 300 forks hung.
A fresh interpreter (fork+exec) shares nothing with the workers but the cache on disk, the metrics
directory and the listening port it pulls through.

The master writes the pickled ProxyConfig to the agent's stdin; the agent exits when its parent
does (it polls its parent pid) and the master restarts it, with backoff, if it dies. A worker forked
while the master spawns the agent would inherit the pipe subprocess waits on for the exec, and the
spawn would never return: spawns hold `forking`, which the master takes before forking a worker
(gunicorn's `pre_fork`).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time

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
        self.forking = threading.Lock()

    def start(self) -> AgentProcess:
        """Spawn it now (in the master's main thread, before any worker exists) and supervise it."""
        first = self._spawn_or_log()
        threading.Thread(target=self._supervise, args=(first,), name="agent-supervisor", daemon=True).start()
        return self

    def before_fork(self) -> None:
        """gunicorn's pre_fork: wait until no spawn is in progress."""
        with self.forking:
            pass

    def _spawn_or_log(self) -> subprocess.Popen[bytes] | None:
        try:
            with self.forking:
                popen = subprocess.Popen([sys.executable, "-m", "proxy.agent"], stdin=subprocess.PIPE)
                assert popen.stdin is not None
                popen.stdin.write(pickle.dumps(self.config))
                popen.stdin.close()
        except OSError as exc:
            log.error("cannot start the node agent; retrying", extra={"error": str(exc)})
            return None
        self.popen = popen
        return popen

    def _supervise(self, popen: subprocess.Popen[bytes] | None) -> None:
        delay = RESTART_BASE_SECONDS
        while not self._stop.is_set():
            if popen is not None:
                started = time.monotonic()
                code = popen.wait()  # 0 also when gunicorn's SIGCHLD handler reaped it first
                _mark_dead(popen.pid)
                if self._stop.is_set():
                    return
                if time.monotonic() - started > RESTART_CAP_SECONDS:
                    delay = RESTART_BASE_SECONDS  # it ran a while: a new failure, not a crash loop
                log.error(
                    "the node agent exited; restarting it",
                    extra={"exit_code": code, "retry_seconds": delay},
                )
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RESTART_CAP_SECONDS)
            popen = self._spawn_or_log()

    def stop(self) -> None:
        self._stop.set()
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()


def _mark_dead(pid: int) -> None:
    """Its live gauges leave the aggregated metrics (counters stay, as for workers)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
