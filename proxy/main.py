"""`imagewarm proxy`: the node-local caching registry proxy (DESIGN.md, "Interfaces")."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from imagewarm import logs
from imagewarm.command import Command
from imagewarm.config import ConfigError
from proxy.config import ProxyConfig


def _metrics_dir() -> None:
    """Workers write their metrics to files here; it must exist, empty, before prometheus_client loads."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        shutil.rmtree(given, ignore_errors=True)
        Path(given).mkdir(parents=True, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imagewarm-proxy-metrics-")
    # The CLI imports every command's module to build its parser, and one of them (the controller's
    # metrics) may have imported prometheus_client already, in single-process mode or with files in
    # the directory just emptied: metrics made from now on (the proxy's) use the directory.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def run(config: ProxyConfig) -> int:
    logs.setup(config.log_level, config.log_format)
    _metrics_dir()
    # Imported only now: prometheus_client picks its multiprocess mode when first imported.
    from proxy.app import create_app
    from proxy.serve import ProxyServer

    try:
        app = create_app(config)
    except ConfigError as exc:  # e.g. --peers-from without a usable kubeconfig
        print(f"imagewarm proxy: {exc}", file=sys.stderr)
        return 2
    ProxyServer(app, config, app.extensions["imagewarm.proxy"].store).run()
    return 0


command = Command(
    help="the node proxy: a verified, deduplicating, offline-capable pull-through cache",
    config=ProxyConfig,
    run=run,
)
