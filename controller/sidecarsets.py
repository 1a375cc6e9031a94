"""SidecarSet -> pre-pull ImagePullJobs, so nodes that will run the sidecar have its images before
the pods need them (OpenKruise does this for CloneSets and Advanced DaemonSets; we do it for
SidecarSets, tuned by the same annotations in our group).

When a SidecarSet is created, or its containers' or initContainers' images change, the controller
creates one ImagePullJob per image it has not pre-pulled yet, in the release namespace (a
SidecarSet is cluster-scoped), owned by the SidecarSet, named `<sidecarset>-<hash of image>`:
- it targets the nodes running pods the SidecarSet selects, in every namespace it covers
  (`namespace`, `namespaceSelector`): the job carries the annotation `imagewarm.io/sidecarset`,
  which the job reconciler's target computation honours (an ImagePullJob's own `podSelector`
  only sees its own namespace; it is set too, for people reading the job);
- `parallelism` from `imagewarm.io/image-predownload-parallelism` (default 1), `timeoutSeconds`
  from `imagewarm.io/image-predownload-timeout-seconds` (default 600);
- completionPolicy Always with `ttlSecondsAfterFinished: 600`: a finished pre-pull goes away.
What was pre-pulled is recorded on the SidecarSet (annotation `imagewarm.io/prepulled-images`, a
JSON list), so a job deleted by its TTL is not made again, and an image that comes back after
leaving the spec is pre-pulled again. Old images' jobs are left to finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from controller.context import Context
from controller.targets import SIDECARSET_ANNOTATION
from imagewarm import api
from imagewarm.kube import AlreadyExists

log = logging.getLogger("imagewarm.controller.sidecarsets")

NAME = "sidecarsets"
PREPULLED_ANNOTATION = "imagewarm.io/prepulled-images"
TTL_SECONDS = 600
NAME_LIMIT = 253


def images_of(sidecarset: dict[str, Any]) -> list[str]:
    spec = sidecarset.get("spec") or {}
    images = [c.get("image") for key in ("initContainers", "containers") for c in spec.get(key) or []]
    return sorted({i for i in images if isinstance(i, str) and i})


def prepulled(sidecarset: dict[str, Any]) -> set[str]:
    text = ((sidecarset.get("metadata") or {}).get("annotations") or {}).get(PREPULLED_ANNOTATION)
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return set()
    return {i for i in value if isinstance(i, str)} if isinstance(value, list) else set()


def job_name(sidecarset: str, image: str) -> str:
    suffix = hashlib.sha256(image.encode()).hexdigest()[:10]
    return f"{sidecarset[: NAME_LIMIT - len(suffix) - 1]}-{suffix}"


def _int(text: str | None, default: int, minimum: int) -> int:
    try:
        return max(minimum, int(str(text))) if text is not None else default
    except ValueError:
        return default


def prepull_template(sidecarset: dict[str, Any]) -> api.ImagePullJobTemplate:
    annotations = (sidecarset.get("metadata") or {}).get("annotations") or {}
    return {
        "parallelism": _int(annotations.get(api.PREDOWNLOAD_PARALLELISM_ANNOTATION), 1, 0),
        "podSelector": dict((sidecarset.get("spec") or {}).get("selector") or {}),  # type: ignore[typeddict-item]
        "completionPolicy": {"type": "Always", "ttlSecondsAfterFinished": TTL_SECONDS},
        "pullPolicy": {
            "backoffLimit": api.DEFAULT_BACKOFF_LIMIT,
            "timeoutSeconds": _int(
                annotations.get(api.PREDOWNLOAD_TIMEOUT_ANNOTATION), api.DEFAULT_TIMEOUT_SECONDS, 1
            ),
        },
    }


class SidecarSetReconciler:
    name = NAME

    def __init__(self, ctx: Context) -> None:
        self.kube = ctx.kube
        self.events = ctx.events
        self.namespace = ctx.config.release_namespace
        self.sidecarsets = ctx.caches["sidecarsets"]

    def reconcile(self, key: str) -> float | None:
        sidecarset = self.sidecarsets.get(key)
        if sidecarset is None or sidecarset["metadata"].get("deletionTimestamp"):
            return None  # its jobs are garbage-collected with it
        images = images_of(sidecarset)
        done = prepulled(sidecarset)
        new = [i for i in images if i not in done]
        for image in new:
            name = job_name(key, image)
            body = api.image_pull_job(
                name, image, namespace=self.namespace, template=prepull_template(sidecarset),
                labels={SIDECARSET_ANNOTATION: key}, annotations={SIDECARSET_ANNOTATION: key},
                owner=api.owner_reference(sidecarset),
            )  # fmt: skip
            try:
                self.kube.create(api.IMAGE_PULL_JOB.path(namespace=self.namespace), dict(body))
                log.info(
                    "sidecar image pre-pull job created",
                    extra={"sidecarset": key, "image": image, "job": name},
                )
                self.events.normal(
                    sidecarset,
                    "PrePullStarted",
                    f"pre-pulling {image} (ImagePullJob {self.namespace}/{name})",
                )
            except AlreadyExists:
                pass
        if set(images) != done:
            metadata = sidecarset["metadata"]
            patch = {"metadata": {"annotations": {PREPULLED_ANNOTATION: json.dumps(images)},
                                  "resourceVersion": metadata["resourceVersion"]}}  # fmt: skip
            self.kube.patch(api.SIDECAR_SET.path(key), patch)
        return None


def create(ctx: Context) -> SidecarSetReconciler:
    ctx.watch("sidecarsets", NAME)
    ctx.resync_all(NAME, "sidecarsets")
    return SidecarSetReconciler(ctx)
