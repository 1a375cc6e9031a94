"""NodeImage helpers for the node agent's end-to-end tests: write tasks into a node's NodeImage as
a user (or the controller) does, and wait for what its agent reports."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from imagewarm.kube import AlreadyExists, Conflict, Kube, NotFound

NODEIMAGES = "/apis/imagewarm.io/v1alpha1/nodeimages"


def put_task(
    kube: Kube,
    node: str,
    name: str,
    tags: list[dict[str, Any]],
    pull_secrets: list[dict[str, str]] | None = None,
) -> None:
    """Set `spec.images[name]` of `node`'s NodeImage (created when missing) to these tags."""
    entry: dict[str, Any] = {"tags": tags}
    if pull_secrets:
        entry["pullSecrets"] = pull_secrets
    for _ in range(10):
        try:
            kube.get(f"{NODEIMAGES}/{node}")
        except NotFound:
            body = {
                "apiVersion": "imagewarm.io/v1alpha1",
                "kind": "NodeImage",
                "metadata": {"name": node},
                "spec": {"images": {name: entry}},
            }
            try:
                kube.create(NODEIMAGES, body)
                return
            except AlreadyExists:
                continue
        try:
            kube.patch(f"{NODEIMAGES}/{node}", {"spec": {"images": {name: entry}}}, kind="merge")
            return
        except Conflict:
            continue
    raise AssertionError(f"could not write the task {name} into NodeImage {node}")


def remove_image(kube: Kube, node: str, name: str) -> None:
    with contextlib.suppress(NotFound):
        kube.patch(f"{NODEIMAGES}/{node}", {"spec": {"images": {name: None}}}, kind="merge")


def nodeimage(kube: Kube, node: str) -> dict[str, Any]:
    return kube.get(f"{NODEIMAGES}/{node}")


def tag_status(kube: Kube, node: str, name: str, tag: str) -> dict[str, Any] | None:
    statuses = (nodeimage(kube, node).get("status") or {}).get("imageStatuses") or {}
    for entry in (statuses.get(name) or {}).get("tags") or []:
        if entry.get("tag") == tag:
            return dict(entry)
    return None


def eventually(check: Callable[[], Any], what: str, timeout: float = 90, interval: float = 0.25) -> Any:
    """`check()`'s first truthy answer; fails saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


def wait_phase(
    kube: Kube, node: str, name: str, tag: str, phases: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    """The tag's status once its phase is one of `phases` (fails with the NodeImage shown)."""

    def reached() -> dict[str, Any] | None:
        status = tag_status(kube, node, name, tag)
        return status if status and status["phase"] in phases else None

    try:
        return eventually(reached, f"{name}:{tag} on {node} in {phases}", timeout)
    except AssertionError as exc:
        shown = json.dumps(nodeimage(kube, node).get("status"), indent=1)[-3000:]
        raise AssertionError(f"{exc}\nstatus: {shown}") from None
