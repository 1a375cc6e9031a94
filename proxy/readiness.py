"""Startup taint: once the proxy serves, remove `imagewarm.io/proxy-not-ready` from its node so pods
that need the proxy may land there (node pools add the taint at creation)."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("imagewarm.proxy.readiness")

TAINT_KEY = "imagewarm.io/proxy-not-ready"


def _core_api(kubeconfig: str):  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
    return client.CoreV1Api()


def remove_taint(node_name: str, kubeconfig: str = "") -> bool:
    """Remove the startup taint from `node_name`; True when it is gone (or was never there). The patch
    carries the resourceVersion read, so a concurrent taint change makes it retry instead of losing it."""
    from kubernetes.client.exceptions import ApiException

    api = _core_api(kubeconfig)
    for _ in range(5):
        node = api.read_node(node_name)
        taints = node.spec.taints or []
        kept = [t for t in taints if t.key != TAINT_KEY]
        if len(kept) == len(taints):
            return True
        body = {
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": [api.api_client.sanitize_for_serialization(t) for t in kept] or None},
        }
        try:
            api.patch_node(node_name, body)
        except ApiException as exc:
            if exc.status == 409:
                continue
            raise
        log.info("removed the startup taint", extra={"node": node_name, "taint": TAINT_KEY})
        return True
    return False


def start_taint_removal(node_name: str, kubeconfig: str = "") -> threading.Thread:
    """Keep trying (with backoff) in the background until the taint is gone."""

    def run() -> None:
        delay = 1.0
        while True:
            try:
                if remove_taint(node_name, kubeconfig):
                    return
            except Exception as exc:
                log.warning(
                    "could not remove the startup taint yet; retrying",
                    extra={"node": node_name, "error": str(exc), "retry_seconds": delay},
                )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    thread = threading.Thread(target=run, name="taint-removal", daemon=True)
    thread.start()
    return thread
