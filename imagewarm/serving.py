"""gunicorn serving, as the proxy and the webhook both do it: worker processes with a thread per
connection (`imagewarm.worker`), metrics shared between them through files, and the settings they
have in common."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("imagewarm.serving")

WORKER_CLASS = "imagewarm.worker.ConnectionThreadWorker"


def bind_address(host: str, port: int) -> str:
    """gunicorn's bind string: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prepare_metrics_dir(prefix: str) -> None:
    """Make `PROMETHEUS_MULTIPROC_DIR` an empty directory (a new temporary one unless given), where
    every worker writes its metrics. Must run before prometheus_client is imported: it picks its
    multiprocess mode then. A given directory is emptied, since a previous run's files would be
    summed into this one's values."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if "prometheus_client" in sys.modules and not given:
        log.warning("metrics imported before setup: /metrics shows one worker's values")
        return
    if given:
        shutil.rmtree(given, ignore_errors=True)
        Path(given).mkdir(parents=True, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=prefix)


def worker_exited(_server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook: a dead worker's live gauges leave the sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def base_settings(
    listen: tuple[str, int], *, workers: int, connections: int, log_level: str
) -> dict[str, Any]:
    """The gunicorn settings every imagewarm server has; each adds its own timeouts and hooks."""
    return {
        "bind": [bind_address(*listen)],
        "workers": workers,
        "worker_connections": connections,
        "worker_class": WORKER_CLASS,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": log_level,
        "child_exit": worker_exited,
    }
