"""ImageListPullJob -> one owned ImagePullJob per image, and the aggregated status.

Each child is named `<list-job-name>-<first 10 hex of the image's SHA-256>`, owned by the list
job (the garbage collector deletes children with it), labelled `imagewarm.io/image-list-pull-job`,
and its spec is the list job's template plus its image, kept in sync by merge patches of the
differing fields only. A child whose image left the list is deleted (its finalizer removes its
tasks). Status: `desired` images, `active` children not finished, `completed` finished ones,
`succeeded` the Complete ones, `failedImageStatuses` for the Failed ones, `startTime`,
`completionTime` once every child finished (never for completionPolicy Never).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from controller.context import Context
from controller.jobs import finished
from imagewarm import api
from imagewarm.kube import AlreadyExists, NotFound

log = logging.getLogger("imagewarm.controller.listjobs")

NAME = "imagelistpulljobs"
LIST_LABEL = "imagewarm.io/image-list-pull-job"
TEMPLATE_FIELDS = (
    "parallelism", "selector", "podSelector", "completionPolicy", "pullPolicy", "pullSecrets",
    "sandboxConfig", "imagePullPolicy",
)  # fmt: skip
NAME_LIMIT = 253


def child_name(list_name: str, image: str) -> str:
    suffix = hashlib.sha256(image.encode()).hexdigest()[:10]
    return f"{list_name[: NAME_LIMIT - len(suffix) - 1]}-{suffix}"


def child_spec(list_job: dict[str, Any], image: str) -> dict[str, Any]:
    spec = list_job.get("spec") or {}
    return {**{k: spec[k] for k in TEMPLATE_FIELDS if k in spec}, "image": image}


def spec_patch(child: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch bringing the child's spec to `wanted`, None when it is there."""
    have = child.get("spec") or {}
    patch: dict[str, Any] = {k: v for k, v in wanted.items() if have.get(k) != v}
    patch.update({k: None for k in TEMPLATE_FIELDS if k in have and k not in wanted})
    return {"spec": patch} if patch else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def aggregate(list_job: dict[str, Any], children: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The list job's status from its children by image (None: not created yet)."""
    old = dict(list_job.get("status") or {})
    active = completed = succeeded = 0
    failed: list[api.FailedImageStatus] = []
    for image, child in children.items():
        status = (child or {}).get("status") or {}
        if child is None or not finished(status):
            active += 1
            continue
        completed += 1
        if any(
            c.get("type") == "Complete" and c.get("status") == "True" for c in status.get("conditions") or []
        ):
            succeeded += 1
        else:
            failed.append({"imagePullJob": child["metadata"]["name"], "name": image,
                           "message": status.get("message", "")})  # fmt: skip
    new = {
        **old,
        "startTime": old.get("startTime") or _now(),
        "desired": len(children),
        "active": active,
        "completed": completed,
        "succeeded": succeeded,
        "failedImageStatuses": failed,
    }
    never = ((list_job.get("spec") or {}).get("completionPolicy") or {}).get("type") == "Never"
    if not never and completed == len(children) and not old.get("completionTime"):
        new["completionTime"] = _now()
    return new


class ListJobReconciler:
    name = NAME

    def __init__(self, ctx: Context) -> None:
        self.kube = ctx.kube
        self.events = ctx.events
        self.lists = ctx.caches["imagelistpulljobs"]
        self.jobs = ctx.caches["imagepulljobs"]

    def reconcile(self, key: str) -> float | None:
        list_job = self.lists.get(key)
        if list_job is None or list_job["metadata"].get("deletionTimestamp"):
            return None  # the garbage collector deletes the children
        metadata = list_job["metadata"]
        namespace, uid = metadata["namespace"], metadata["uid"]
        images = list(dict.fromkeys((list_job.get("spec") or {}).get("images") or []))
        owned = {
            j["metadata"]["name"]: j
            for j in self.jobs.items()
            if j["metadata"].get("namespace") == namespace
            and any(o.get("uid") == uid for o in j["metadata"].get("ownerReferences") or [])
        }
        wanted_names = {child_name(metadata["name"], image): image for image in images}
        for name, child in owned.items():
            if name not in wanted_names and not child["metadata"].get("deletionTimestamp"):
                try:
                    self.kube.delete(api.IMAGE_PULL_JOB.path(name, namespace))
                    log.info("image left the list; its job deleted", extra={"list": key, "job": name})
                except NotFound:
                    pass
        children: dict[str, dict[str, Any] | None] = {}
        for name, image in wanted_names.items():
            current: dict[str, Any] | None = owned.get(name)
            wanted = child_spec(list_job, image)
            if current is None:
                body = api.image_pull_job(
                    name, image, namespace=namespace, template=wanted,  # type: ignore[arg-type]
                    labels={LIST_LABEL: metadata["name"]}, owner=api.owner_reference(list_job),
                )  # fmt: skip
                try:
                    current = self.kube.create(api.IMAGE_PULL_JOB.path(namespace=namespace), dict(body))
                except AlreadyExists:
                    current = None  # the cache is behind: the next event brings it
            elif not finished(current.get("status") or {}):
                patch = spec_patch(current, wanted)
                if patch is not None:
                    current = self.kube.patch(api.IMAGE_PULL_JOB.path(name, namespace), patch)
            children[image] = current
        status = aggregate(list_job, children)
        if status != (list_job.get("status") or {}):
            self.kube.patch(
                api.IMAGE_LIST_PULL_JOB.path(metadata["name"], namespace, "status"), {"status": status}
            )
        return None


def create(ctx: Context) -> ListJobReconciler:
    def owner_keys(job: dict[str, Any]) -> list[str]:
        namespace = job["metadata"].get("namespace", "")
        return [
            f"{namespace}/{o['name']}"
            for o in job["metadata"].get("ownerReferences") or []
            if o.get("kind") == "ImageListPullJob"
        ]

    ctx.watch("imagelistpulljobs", NAME)
    ctx.watch("imagepulljobs", NAME, owner_keys, after=0.25)
    ctx.resync_all(NAME, "imagelistpulljobs")
    return ListJobReconciler(ctx)
