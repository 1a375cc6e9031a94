"""The controller program: informer caches, reconcilers, leader election, and /metrics
(`imagewarm controller` runs `run`; its entry point is the light `controller.main`).

Adding a reconciler: write a factory `(Context) -> Reconciler` that also registers the informer
handlers mapping objects to its keys (`ctx.watch(...)`), and list it in `RECONCILERS`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from controller import metrics
from controller.caches import Caches
from controller.config import ControllerConfig
from controller.context import Context, ReconcilerFactory
from controller.events import EventRecorder
from controller.leader import LeaderElector
from controller.runner import Runner
from imagewarm import logs
from imagewarm.kube import Kube, KubeError
from imagewarm.metrics import exposition

log = logging.getLogger("imagewarm.controller")

SYNC_TIMEOUT = 120.0


def _factories() -> list[ReconcilerFactory]:
    from controller import cachedimages, jobs, listjobs, nodeimages, sidecarsets

    return [nodeimages.create, jobs.create, listjobs.create, sidecarsets.create, cachedimages.create]


# Reconcilers the controller runs (another one: add its factory here).
RECONCILERS: Callable[[], list[ReconcilerFactory]] = _factories


class _Health(BaseHTTPRequestHandler):
    ready: Callable[[], bool] = staticmethod(lambda: False)

    def do_GET(self) -> None:
        if self.path == "/metrics":
            body, content_type = exposition()
            status = 200
        elif self.path == "/healthz":
            body, content_type, status = b"ok\n", "text/plain", 200
        elif self.path == "/readyz":
            ok = type(self).ready()
            body, content_type = (b"ok\n" if ok else b"not ready\n"), "text/plain"
            status = 200 if ok else 503
        else:
            body, content_type, status = b"not found\n", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not log lines


def serve_health(config: ControllerConfig, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    handler = type("Health", (_Health,), {"ready": staticmethod(ready)})
    server = ThreadingHTTPServer(config.metrics_listen, handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def build(config: ControllerConfig, kube: Kube) -> Context:
    """Caches, runner and reconcilers wired together, nothing started."""
    ctx = Context(
        config=config,
        kube=kube,
        caches=Caches(kube),
        runner=Runner(workers=config.workers),
        events=EventRecorder(kube),
    )
    for factory in RECONCILERS():
        ctx.runner.add(factory(ctx))
    return ctx


def run(config: ControllerConfig) -> int:
    logs.setup(config.log_level, config.log_format)
    try:
        kube = Kube.load(config.kubeconfig or None)
    except KubeError as exc:
        log.error("cannot reach the API server", extra={"error": str(exc)})
        return 2
    kube.observer = metrics.observe_request
    ctx = build(config, kube)
    elector = None
    if config.leader_elect:
        elector = LeaderElector(
            kube, config.lease_namespace, lease_seconds=config.lease_duration,
            renew_seconds=config.renew_deadline, retry_seconds=config.retry_period,
        )  # fmt: skip
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if elector is not None:
            elector.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    serving = threading.Event()
    # A standby replica is healthy and ready; the leader once its caches synced.
    server = serve_health(config, lambda: serving.is_set() or (elector is not None and not elector.leading))
    log.info("metrics and health", extra={"listen": f"{config.metrics_listen[0]}:{server.server_port}"})
    if elector is not None:
        if not elector.acquire():
            server.shutdown()
            return 0
        # Losing the Lease stops at once: another replica may already reconcile.
        elector.keep(lambda: os._exit(1))
    else:
        metrics.LEADER.set(1)
    ctx.caches.start()
    missing = ctx.caches.wait_synced(SYNC_TIMEOUT)
    if missing:
        log.error("caches did not sync; check RBAC (list/watch)", extra={"caches": missing})
        return 1
    ctx.runner.start()
    serving.set()
    log.info("reconciling", extra={"reconcilers": sorted(ctx.runner.reconcilers)})
    while not stop.wait(config.resync_period):
        for name, keys in ctx.resync.items():
            ctx.runner.enqueue_all(name, keys())
    serving.clear()
    ctx.runner.stop()
    ctx.caches.stop()
    if elector is not None:
        elector.release()
    server.shutdown()
    return 0
