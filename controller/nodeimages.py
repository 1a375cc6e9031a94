"""Node -> NodeImage: one per Node, same name, the Node's labels, owned by the Node.

The ownerReference lets the API server's garbage collector delete a NodeImage with its Node; the
reconciler also deletes it itself when the Node is gone (no wait for the collector, and correct
when a Node is recreated under the same name: the owner's uid is rewritten to the new Node's).
Only metadata is written here; the tasks in spec belong to the job reconciler, status to the
node's agent.
"""

from __future__ import annotations

import logging
from typing import Any

from controller.context import Context
from imagewarm import api
from imagewarm.kube import AlreadyExists, NotFound

log = logging.getLogger("imagewarm.controller.nodeimages")

NAME = "nodeimages"


def node_owner(node: dict[str, Any]) -> dict[str, Any]:
    metadata = node["metadata"]
    return {"apiVersion": "v1", "kind": "Node", "name": metadata["name"], "uid": metadata["uid"],
            "blockOwnerDeletion": False}  # fmt: skip


def wanted_metadata(node: dict[str, Any]) -> dict[str, Any]:
    labels = dict((node.get("metadata") or {}).get("labels") or {})
    return {"labels": labels, "ownerReferences": [node_owner(node)]}


def metadata_patch(node: dict[str, Any], node_image: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch of the NodeImage's metadata that syncs it with `node`, None if in sync."""
    want = wanted_metadata(node)
    have = node_image.get("metadata") or {}
    have_labels = have.get("labels") or {}
    patch: dict[str, Any] = {}
    if have_labels != want["labels"]:
        labels: dict[str, Any] = {k: v for k, v in want["labels"].items() if have_labels.get(k) != v}
        labels.update({k: None for k in have_labels if k not in want["labels"]})
        patch["labels"] = labels
    owners = [o for o in have.get("ownerReferences") or [] if o.get("kind") != "Node"]
    node_owners = [o for o in have.get("ownerReferences") or [] if o.get("kind") == "Node"]
    if [o.get("uid") for o in node_owners] != [want["ownerReferences"][0]["uid"]]:
        patch["ownerReferences"] = [*owners, *want["ownerReferences"]]
    if not patch:
        return None
    patch["resourceVersion"] = have.get("resourceVersion")
    return {"metadata": patch}


class NodeImageReconciler:
    name = NAME

    def __init__(self, ctx: Context) -> None:
        self.kube = ctx.kube
        self.nodes = ctx.caches["nodes"]
        self.node_images = ctx.caches["nodeimages"]

    def reconcile(self, key: str) -> float | None:
        node = self.nodes.get(key)
        node_image = self.node_images.get(key)
        if node is None or (node.get("metadata") or {}).get("deletionTimestamp"):
            if node_image is not None:
                try:
                    self.kube.delete(api.NODE_IMAGE.path(key))
                    log.info("NodeImage of a deleted Node removed", extra={"node": key})
                except NotFound:
                    pass
            return None
        if node_image is None:
            body = {
                "apiVersion": api.api_version(),
                "kind": "NodeImage",
                "metadata": {"name": key, **wanted_metadata(node)},
                "spec": {},
            }
            try:
                self.kube.create(api.NODE_IMAGE.path(), body)
                log.info("NodeImage created", extra={"node": key})
            except AlreadyExists:
                pass  # the cache is behind; the watch event brings it and a metadata check
            return None
        patch = metadata_patch(node, node_image)
        if patch is not None:
            self.kube.patch(api.NODE_IMAGE.path(key), patch)
        return None


def create(ctx: Context) -> NodeImageReconciler:
    reconciler = NodeImageReconciler(ctx)
    nodes, node_images, runner = ctx.caches["nodes"], ctx.caches["nodeimages"], ctx.runner

    # Only a change that leaves a NodeImage out of step with its Node is work here. A NodeImage
    # changes about four times per node per job (tasks and their statuses), a Node whenever its
    # status does (the kubelet, the node lifecycle controller): neither is, most of the time.
    def out_of_step(kind: str, node: dict[str, Any] | None, node_image: dict[str, Any] | None) -> bool:
        if kind == "DELETED" or node is None or node_image is None:
            return True
        return bool((node.get("metadata") or {}).get("deletionTimestamp")) or (
            metadata_patch(node, node_image) is not None
        )

    def on_node(kind: str, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        if out_of_step(kind, node, node_images.get(name)):
            runner.enqueue(NAME, name)

    def on_node_image(kind: str, node_image: dict[str, Any]) -> None:
        name = node_image["metadata"]["name"]
        if out_of_step(kind, nodes.get(name), node_image):
            runner.enqueue(NAME, name)

    nodes.add_handler(on_node)
    node_images.add_handler(on_node_image)
    ctx.resync_all(NAME, "nodes")
    return reconciler
