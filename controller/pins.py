"""CachedImage pins on the nodes, through NodeImage tasks (DESIGN.md "Control plane"). Pure logic.

The agents pin the blobs of every task in their NodeImage's spec, and unpin them when the task
leaves it. So a CachedImage pins its image on a node by owning that node's task for the image
(an `ownerReferences` entry of kind CachedImage, like a job's), added once a pod pulled it through
that node's proxy and runs; deleting the CachedImage removes its owner from every task, and a
task without owners leaves the spec: the agent unpins. Nothing new for the agent to learn.

The functions here compute one `spec.images[<name>]` entry; `controller.nodeimagewriter` writes it
as a merge patch on the NodeImage's resourceVersion (a conflict re-reads and recomputes), as
every writer of NodeImage tasks does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

from imagewarm import api

KIND = "CachedImage"


def owner_of(cached_image: Mapping[str, Any]) -> dict[str, str]:
    """The task owner reference naming a stored CachedImage (cluster-scoped: no namespace)."""
    metadata = cached_image.get("metadata") or {}
    return {"apiVersion": api.api_version(), "kind": KIND, "name": metadata["name"], "uid": metadata["uid"]}


def pin_entry(
    entry: api.ImageSpec | None, tag: str, owner: Mapping[str, str], created_at: str
) -> api.ImageSpec:
    """The image entry with `owner` among the owners of task `tag` (the task created, `version` 0,
    when no job has one). Equal to `entry` when it already owns it (the writer then writes nothing)."""
    result: dict[str, Any] = copy.deepcopy(dict(entry or {}))
    tags = result.setdefault("tags", [])
    task = next((t for t in tags if t.get("tag") == tag), None)
    if task is None:
        tags.append({"tag": tag, "createdAt": created_at, "ownerReferences": [dict(owner)], "version": 0})
    elif not any(o.get("uid") == owner["uid"] for o in task.get("ownerReferences") or []):
        task["ownerReferences"] = [*(task.get("ownerReferences") or []), dict(owner)]
    return cast(api.ImageSpec, result)


def unpin_entry(entry: api.ImageSpec | None, name: str, keep_uid: str | None) -> api.ImageSpec | None:
    """The image entry without the owners of kind CachedImage named `name` (but the one with uid
    `keep_uid`, the CachedImage that exists now); a task left without owners goes, and the entry
    (None) when no task is left. Equal to `entry` when it holds no such owner."""
    if entry is None:
        return None
    result: dict[str, Any] = copy.deepcopy(dict(entry))
    kept = []
    for task in result.get("tags") or []:
        owners = list(task.get("ownerReferences") or [])
        remaining = [o for o in owners if not _is_stale(o, name, keep_uid)]
        if len(remaining) == len(owners):
            kept.append(task)
        elif remaining:
            kept.append({**task, "ownerReferences": remaining})
    if not kept:
        return None
    result["tags"] = kept
    return cast(api.ImageSpec, result)


def _is_stale(owner: Mapping[str, Any], name: str, keep_uid: str | None) -> bool:
    return owner.get("kind") == KIND and owner.get("name") == name and owner.get("uid") != keep_uid
