"""CachedImage pins on the nodes, through NodeImage tasks (DESIGN.md "Control plane"). Pure logic.

The agents pin the blobs of every task in their NodeImage's spec, and unpin them when the task
leaves it. So a CachedImage pins its image on a node by owning that node's task for the image
(an `ownerReferences` entry of kind CachedImage, like a job's), added once a pod pulled it through
that node's proxy and runs; deleting the CachedImage removes its owner from every task, and a
task without owners leaves the spec: the agent unpins. Nothing new for the agent to learn.

Writes are JSON merge patches of one `spec.images[<name>]` entry carrying the NodeImage's
resourceVersion (a conflict re-reads and retries), as every writer of NodeImage tasks does.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping
from typing import Any

from controller.expiry import format_time
from controller.inventory import entry_of
from imagewarm import api
from imagewarm.reference import Reference

KIND = "CachedImage"


def owner_of(cached_image: Mapping[str, Any]) -> dict[str, str]:
    """The task owner reference naming a stored CachedImage (cluster-scoped: no namespace)."""
    metadata = cached_image.get("metadata") or {}
    return {"apiVersion": api.api_version(), "kind": KIND, "name": metadata["name"], "uid": metadata["uid"]}


def _patch(nodeimage: Mapping[str, Any], images: dict[str, Any]) -> dict[str, Any]:
    version = (nodeimage.get("metadata") or {}).get("resourceVersion")
    return {"metadata": {"resourceVersion": version}, "spec": {"images": images}}


def pin_patch(
    nodeimage: Mapping[str, Any], reference: Reference, owner: Mapping[str, str], now: dt.datetime
) -> dict[str, Any] | None:
    """The merge patch adding `owner` to the node's task for `reference` (creating the task when
    no job has one), or None when it already owns it."""
    name, tag = entry_of(reference)
    entry = ((nodeimage.get("spec") or {}).get("images") or {}).get(name) or {}
    tags = copy.deepcopy(list(entry.get("tags") or []))
    for task in tags:
        if task.get("tag") == tag:
            owners = task.setdefault("ownerReferences", [])
            if any(o.get("uid") == owner["uid"] for o in owners):
                return None
            owners.append(dict(owner))
            break
    else:
        tags.append(
            {"tag": tag, "createdAt": format_time(now), "ownerReferences": [dict(owner)], "version": 0}
        )
    return _patch(nodeimage, {name: {"tags": tags}})


def unpin_patch(nodeimage: Mapping[str, Any], name: str, keep_uid: str | None) -> dict[str, Any] | None:
    """The merge patch removing, from every task of the node, the owners of kind CachedImage named
    `name` except the one with uid `keep_uid` (the CachedImage that exists now, if any); a task left
    without owners goes, an image left without tasks goes. None when nothing is to remove."""
    images: dict[str, Any] = {}
    for image, entry in ((nodeimage.get("spec") or {}).get("images") or {}).items():
        tags = list((entry or {}).get("tags") or [])
        kept, changed = [], False
        for task in tags:
            owners = list(task.get("ownerReferences") or [])
            remaining = [
                o
                for o in owners
                if not (o.get("kind") == KIND and o.get("name") == name and o.get("uid") != keep_uid)
            ]
            if len(remaining) == len(owners):
                kept.append(task)
                continue
            changed = True
            if remaining:
                kept.append({**task, "ownerReferences": remaining})
        if changed:
            images[image] = {"tags": kept} if kept else None
    return _patch(nodeimage, images) if images else None
