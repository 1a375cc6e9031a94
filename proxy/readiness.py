"""Startup taint: once the proxy serves (its own `/readyz` answers ready), remove
`imagewarm.io/proxy-not-ready` from its node so pods that need the proxy may land there (node pools
add the taint at creation)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request

from imagewarm.kube import Conflict, Forbidden, Kube
from proxy import metrics

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


# A Forbidden is RBAC missing: it lasts until someone grants it, so retry rarely and say it once.
FORBIDDEN_RETRY = 300.0
MISSING_RBAC = (
    "the proxy may not remove its node's startup taint: its ServiceAccount needs `get` and `patch` on "
    '`nodes` (a ClusterRole with apiGroups [""], resources ["nodes"], verbs ["get", "patch"], bound to '
    "the proxy's ServiceAccount); the proxy serves meanwhile, but pods that tolerate no "
    f"{TAINT_KEY} taint will not land on this node"
)


def keep_removing_taint(
    node_name: str,
    kubeconfig: str = "",
    *,
    stop: threading.Event | None = None,
    forbidden_retry: float = FORBIDDEN_RETRY,
) -> bool:
    """Retry `remove_taint` until the taint is gone (True) or `stop` is set (False). Temporary errors
    back off from 1 s to 30 s; a `Forbidden` retries every `forbidden_retry` seconds. Each failure is
    logged when it differs from the previous one, so a failure that lasts is said once."""
    stop = stop or threading.Event()
    delay = 1.0
    said = ""
    while not stop.is_set():
        try:
            if remove_taint(Kube.load(kubeconfig or None), node_name):
                if said:
                    log.info("the startup taint could be removed after all", extra={"node": node_name})
                return True
            wait = delay  # the node kept changing under us
        except Forbidden as exc:
            metrics.TAINT_REMOVAL_FAILURES.labels(reason="forbidden").inc()
            if said != MISSING_RBAC:
                log.error(
                    MISSING_RBAC,
                    extra={"node": node_name, "error": str(exc), "retry_seconds": forbidden_retry},
                )
                said = MISSING_RBAC
            wait = forbidden_retry
        except Exception as exc:
            metrics.TAINT_REMOVAL_FAILURES.labels(reason="error").inc()
            if said != str(exc):
                log.warning(
                    "could not remove the startup taint yet; retrying",
                    extra={"node": node_name, "error": str(exc), "retry_seconds": delay},
                )
                said = str(exc)
            wait = delay
            delay = min(delay * 2, 30.0)
        stop.wait(wait)
    return False


def start_taint_removal(node_name: str, kubeconfig: str = "", ready_url: str = "") -> threading.Thread:
    """In the background: once `ready_url` (the proxy's `/readyz`) answers ready, remove the taint
    (`keep_removing_taint`)."""

    def run() -> None:
        if ready_url:
            wait_until_ready(ready_url, node_name)
        keep_removing_taint(node_name, kubeconfig)

    thread = threading.Thread(target=run, name="taint-removal", daemon=True)
    thread.start()
    return thread
