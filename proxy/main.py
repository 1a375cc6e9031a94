"""`imagewarm proxy`: the node-local caching registry proxy (DESIGN.md, "Interfaces")."""

from __future__ import annotations

import sys

from imagewarm import logs, serving
from imagewarm.command import Command
from imagewarm.config import ConfigError
from proxy.config import ProxyConfig


def run(config: ProxyConfig) -> int:
    logs.setup(config.log_level, config.log_format)
    serving.prepare_metrics_dir("imagewarm-proxy-metrics-")
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
