"""Startup taint: once the proxy serves (its own `/readyz` answers ready), remove
`imagewarm.io/proxy-not-ready` from its node so pods that need the proxy may land there (node pools
add the taint at creation)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request

from imagewarm.kube import Conflict, Kube

log = logging.getLogger("imagewarm.proxy.readiness")

TAINT_KEY = "imagewarm.io/proxy-not-ready"


def remove_taint(kube: Kube, node_name: str) -> bool:
    """Remove the startup taint from `node_name`; True when it is gone (or was never there). The patch
    carries the resourceVersion read, so a concurrent taint change makes it retry instead of losing it.
    Raises KubeError when the API server refuses (e.g. RBAC: the proxy needs `patch` on its node)."""
    path = f"/api/v1/nodes/{node_name}"
    for _ in range(5):
        node = kube.get(path)
        taints = node.get("spec", {}).get("taints") or []
        kept = [taint for taint in taints if taint.get("key") != TAINT_KEY]
        if len(kept) == len(taints):
            return True
        body = {
            "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
            "spec": {"taints": kept or None},
        }
        try:
            kube.patch(path, body, kind="merge")
        except Conflict:
            continue
        log.info("removed the startup taint", extra={"node": node_name, "taint": TAINT_KEY})
        return True
    return False


def readiness(url: str) -> str | None:
    """None when `url` (the proxy's own `/readyz`) answers 200, else why not (its body or the error)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return None if response.status == 200 else f"{response.status}"
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace").strip() or f"{exc.code}"
    except OSError as exc:
        return f"{url}: {exc}"


def wait_until_ready(url: str, node_name: str, poll: float = 0.5) -> None:
    """Block until `url` answers ready; says once (and again when the reason changes) why it waits."""
    said = None
    while (problem := readiness(url)) is not None:
        if problem != said:
            log.warning(
                "the startup taint stays until /readyz answers ready",
                extra={"node": node_name, "taint": TAINT_KEY, "readyz": url, "reason": problem},
            )
            said = problem
        time.sleep(poll)


def start_taint_removal(node_name: str, kubeconfig: str = "", ready_url: str = "") -> threading.Thread:
    """In the background: once `ready_url` (the proxy's `/readyz`) answers ready, keep trying (with
    backoff) until the taint is gone."""

    def run() -> None:
        if ready_url:
            wait_until_ready(ready_url, node_name)
        delay = 1.0
        while True:
            try:
                if remove_taint(Kube.load(kubeconfig or None), node_name):
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
