"""NodeImage task entries: the pure merge logic behind docs/DESIGN.md "Control plane".

One tag entry per (canonical image name, tag or digest) on a node, shared by every job that
wants it through `ownerReferences`. A job adds or removes only itself; the entry's `pullPolicy`
is the strictest of its owners' current specs (smallest timeout and deadline, largest
backoffLimit) and the image's `pullSecrets` the union of its owners' secret copies, both
recomputed on every change so a spec edit reaches existing tasks (kruise#2221, #1386).
`version` is bumped when a task must run again. Nothing here talks to the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from imagewarm import api, reference

DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class ImageTarget:
    """Where a job's task lives in a NodeImage: `spec.images[name].tags[tag]`."""

    name: str  # canonical repository, e.g. docker.io/library/nginx
    tag: str  # the tag, or the digest (sha256:...) of a digest-pinned image

    @classmethod
    def of(cls, image: str) -> ImageTarget:
        """Raises imagewarm.reference.InvalidReference naming what is wrong."""
        ref = reference.parse(image)
        return cls(ref.name, ref.digest or ref.tag or DEFAULT_TAG)


@dataclass(frozen=True)
class OwnerWants:
    """What one owner (a job) asks of the tasks it owns."""

    policy: api.ImageTagPullPolicy
    secrets: tuple[tuple[str, str], ...] = ()  # (namespace, name) of the secret copies


Lookup = Callable[[api.ObjectReference], OwnerWants | None]


def owner_ref(job: dict[str, Any]) -> api.ObjectReference:
    metadata = job["metadata"]
    return {
        "apiVersion": job.get("apiVersion") or api.api_version(),
        "kind": job.get("kind") or "ImagePullJob",
        "namespace": metadata.get("namespace", ""),
        "name": metadata["name"],
        "uid": metadata["uid"],
    }


def job_policy(spec: dict[str, Any]) -> api.ImageTagPullPolicy:
    """The task pull policy one ImagePullJob spec asks for."""
    pull = spec.get("pullPolicy") or {}
    policy: api.ImageTagPullPolicy = {
        "backoffLimit": int(pull.get("backoffLimit", api.DEFAULT_BACKOFF_LIMIT)),
        "timeoutSeconds": int(pull.get("timeoutSeconds", api.DEFAULT_TIMEOUT_SECONDS)),
    }
    deadline = (spec.get("completionPolicy") or {}).get("activeDeadlineSeconds")
    if deadline:
        policy["activeDeadlineSeconds"] = int(deadline)
    return policy


def strictest(policies: Iterable[api.ImageTagPullPolicy]) -> api.ImageTagPullPolicy:
    """Smallest timeout and deadline, largest backoffLimit of `policies` (at least one)."""
    merged: dict[str, int] = {}
    for policy in policies:
        for key, value in policy.items():
            if not isinstance(value, int):
                continue
            if key not in merged:
                merged[key] = value
            elif key == "backoffLimit":
                merged[key] = max(merged[key], value)
            else:
                merged[key] = min(merged[key], value)
    return merged  # type: ignore[return-value]


def find_tag(entry: api.ImageSpec | None, tag: str) -> api.ImageTagSpec | None:
    for item in entry["tags"] if entry else []:
        if item.get("tag") == tag:
            return item
    return None


def owns(item: api.ImageTagSpec | None, uid: str) -> bool:
    return item is not None and any(r.get("uid") == uid for r in item.get("ownerReferences") or [])


def update_entry(
    entry: api.ImageSpec | None,
    tag: str,
    lookup: Lookup,
    *,
    add: api.ObjectReference | None = None,
    remove_uids: frozenset[str] = frozenset(),
    bump: bool = False,
    created_at: str = "",
) -> api.ImageSpec | None:
    """The image entry after adding owner `add` to `tag` (creating the task), removing the owners
    whose uid is in `remove_uids` from it, and bumping its version (`bump`, only if the task
    exists afterwards); every tag's pullPolicy and the image's pullSecrets recomputed from the
    owners `lookup` knows. None when no tag is left (the entry goes)."""
    # A copy of each tag dict is enough: below, only a tag's own keys are set (ownerReferences and
    # pullPolicy to new values), never a nested list or dict changed in place. (A deep copy of
    # every entry was a tenth of a task write's CPU.)
    tags: list[api.ImageTagSpec] = (
        [cast(api.ImageTagSpec, dict(t)) for t in entry.get("tags") or []] if entry else []
    )
    item = next((t for t in tags if t.get("tag") == tag), None)
    if item is None and add is not None:
        item = {"tag": tag, "ownerReferences": [], "version": 0}
        if created_at:
            item["createdAt"] = created_at
        tags.append(item)
    if item is not None:
        drop = set(remove_uids) | ({add["uid"]} if add is not None else set())
        refs = [r for r in item.get("ownerReferences") or [] if r.get("uid") not in drop]
        if add is not None:
            refs.append(add)
        if refs:
            item["ownerReferences"] = refs
            if bump:
                item["version"] = int(item.get("version") or 0) + 1
        else:
            tags.remove(item)
    secrets: set[tuple[str, str]] = set()
    unknown = False
    for t in tags:
        wants = [lookup(r) for r in t.get("ownerReferences") or []]
        known = [w for w in wants if w is not None]
        unknown = unknown or len(known) < len(wants)
        if known:
            t["pullPolicy"] = strictest(w.policy for w in known)
        for w in known:
            secrets.update(w.secrets)
    if not tags:
        return None
    if unknown:  # an owner not in the cache (yet): keep the secrets it may need
        kept = entry.get("pullSecrets") or [] if entry else []
        secrets.update((s.get("namespace", ""), s["name"]) for s in kept)
    result: api.ImageSpec = {"tags": tags}
    if secrets:
        result["pullSecrets"] = [{"namespace": ns, "name": name} for ns, name in sorted(secrets)]
    return result


def entry_of(node_image: dict[str, Any] | None, name: str) -> api.ImageSpec | None:
    if node_image is None:
        return None
    images = (node_image.get("spec") or {}).get("images") or {}
    entry = images.get(name)
    return cast(api.ImageSpec, entry) if isinstance(entry, dict) else None


def status_of(node_image: dict[str, Any] | None, name: str, tag: str) -> api.ImageTagStatus | None:
    if node_image is None:
        return None
    statuses = (node_image.get("status") or {}).get("imageStatuses") or {}
    for item in (statuses.get(name) or {}).get("tags") or []:
        if item.get("tag") == tag:
            return item  # type: ignore[no-any-return]
    return None


def owner_keys(node_image: dict[str, Any]) -> set[str]:
    """`namespace/name` of every ImagePullJob owning a task on this NodeImage."""
    keys = set()
    for entry in ((node_image.get("spec") or {}).get("images") or {}).values():
        for item in (entry or {}).get("tags") or []:
            for ref in item.get("ownerReferences") or []:
                if ref.get("kind") == "ImagePullJob":
                    keys.add(f"{ref.get('namespace')}/{ref.get('name')}")
    return keys
