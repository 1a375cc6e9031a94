"""gunicorn serving the proxy: worker processes with a thread per client connection
(`imagewarm.worker`), metrics aggregated across them, the cache's upkeep (eviction, and removing
partial files of killed or broken-off fills too old to resume) and the startup-taint removal
running in the master once it listens, and with `--node-name` the node agent's process started by
the master (one per node); peer discovery in each worker."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from imagewarm import serving
from proxy import metrics
from proxy.cache.eviction import Evictor
from proxy.cache.store import BlobStore
from proxy.config import ProxyConfig
from proxy.readiness import start_taint_removal

if TYPE_CHECKING:
    from proxy.agent.process import AgentProcess

log = logging.getLogger("imagewarm.proxy.serve")


def run_upkeep(store: BlobStore, max_bytes: int | None, interval: float, stop: threading.Event) -> None:
    """Every `interval`: remove partial files no fill will resume, then evict if over `max_bytes`."""
    evictor = Evictor(store, max_bytes) if max_bytes else None
    while not stop.wait(interval):
        try:
            sweep = store.remove_stale_partials()
        except Exception:
            log.exception("removing stale partial files failed; will retry")
        else:
            metrics.RESUMABLE_PARTIAL_BYTES.set(sweep.resumable_bytes)
            if sweep.removed:
                log.info(
                    "removed partial files of killed or broken-off fills too old to resume",
                    extra={
                        "count": sweep.removed,
                        "bytes": sweep.freed_bytes,
                        "resumable_left": sweep.resumable,
                        "resumable_bytes": sweep.resumable_bytes,
                    },
                )
        if evictor is None:
            continue
        try:
            report = evictor.run_once()
        except Exception:
            log.exception("eviction pass failed; will retry")
            continue
        if report.evicted_count:
            metrics.EVICTIONS.inc(report.evicted_count)
            metrics.EVICTED_BYTES.inc(report.evicted_bytes)
            log.info(
                "evicted blobs",
                extra={
                    "count": report.evicted_count,
                    "bytes": report.evicted_bytes,
                    "cache_bytes": report.bytes_after,
                },
            )


class ProxyServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, config: ProxyConfig, store: BlobStore) -> None:
        self.app = app
        self.config = config
        self.store = store
        self.stop = threading.Event()
        self.agent: AgentProcess | None = None
        super().__init__()

    def load_config(self) -> None:
        config = self.config
        settings = serving.base_settings(
            config.listen, workers=config.workers, connections=config.connections, log_level=config.log_level
        )
        settings.update(
            {
                # The worker's heartbeat, and how long a client may take no bytes mid-transfer; long
                # transfers run on their connection's thread and are not cut by it.
                "timeout": 120,
                "graceful_timeout": 10,
                "keepalive": 30,
                "when_ready": self._when_ready,
                "on_exit": self._on_exit,
                "pre_fork": self._pre_fork,
                "post_worker_init": self._post_worker_init,
            }
        )
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.app

    def _post_worker_init(self, _worker: Any) -> None:
        # In each worker, after the fork: the informer's thread would not survive it.
        discovery = self.app.extensions["imagewarm.proxy"].discovery
        if discovery is not None:
            discovery.start()

    def _when_ready(self, _server: Any) -> None:
        log.info(
            "serving",
            extra={"listen": serving.bind_address(*self.config.listen), "workers": self.config.workers},
        )
        threading.Thread(
            target=run_upkeep,
            name="upkeep",
            daemon=True,
            args=(self.store, self.config.max_cache_bytes or None, self.config.eviction_interval, self.stop),
        ).start()
        # The runtime's fallback list, with the --peer list; workers add discovered peers as they come.
        self.app.extensions["imagewarm.proxy"].write_runtime_hosts()
        if self.config.node_name:
            start_taint_removal(self.config.node_name, self.config.kubeconfig, self._readyz_url())
            self._start_agent()

    def _readyz_url(self) -> str:
        """This proxy's own `/readyz`, reached over loopback when it listens on every address."""
        host, port = self.config.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"http://{serving.bind_address(host, port)}/readyz"

    def _start_agent(self) -> None:
        # One agent per node: its own process, started by the master (never by a worker).
        from proxy.agent.process import AgentProcess

        self.agent = AgentProcess(self.config).start()

    def _pre_fork(self, _server: Any, _worker: Any) -> None:
        if self.agent is not None:
            self.agent.before_fork()

    def _on_exit(self, _server: Any) -> None:
        if self.agent is not None:
            self.agent.stop()
