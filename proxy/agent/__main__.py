"""`python -m proxy.agent`: the node agent's process (see proxy.agent.process), given the proxy's
pickled ProxyConfig on stdin by the gunicorn master. Exits when the master does."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading

from imagewarm import logs
from imagewarm.kube import ConfigurationError, Kube
from proxy.config import ProxyConfig


def main() -> int:
    config: ProxyConfig = pickle.load(sys.stdin.buffer)
    logs.setup(config.log_level, config.log_format)
    log = logging.getLogger("imagewarm.proxy.agent")
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Imported after the logs: prometheus_client reads PROMETHEUS_MULTIPROC_DIR (the master's) at import.
    from proxy.agent.agent import Agent, Settings
    from proxy.cache.store import BlobStore

    try:
        kube = Kube.load(config.kubeconfig or None)
    except ConfigurationError as exc:
        log.error("the node agent cannot start: %s", exc, extra={"node": config.node_name})
        return 2
    settings = Settings(
        node=config.node_name,
        proxy_url=config.own_url,
        parallel_pulls=config.agent_parallel_pulls,
        progress_interval=config.agent_progress_interval,
        status_delay=config.agent_status_delay,
    )
    agent = Agent(kube, BlobStore(config.cache_dir), config.cache_dir, settings).start()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # the master is gone: so is this node's proxy
            break
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
