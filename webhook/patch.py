"""RFC 6902 JSON patch operations from an old and a new pod, limited to what the webhook changes.

The webhook never builds pointers by hand elsewhere: it edits a copy of the pod and asks this module
for the operations that turn the original into the copy. Lists whose items keep their names get
per-field operations (small patches, reviewable in audit logs), items added at a list's start or
end are inserted, and any other change replaces the list whole.
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): `~` becomes `~0` and `/` becomes `~1` in each part."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _names(items: list[Any]) -> list[Any]:
    return [i.get("name") if isinstance(i, dict) else i for i in items]


def _dict_ops(path: tuple[str | int, ...], old: dict[str, Any], new: dict[str, Any]) -> list[Op]:
    ops: list[Op] = []
    for key, value in new.items():
        if key not in old:
            ops.append({"op": "add", "path": pointer(*path, key), "value": value})
        elif old[key] is not value and old[key] != value:  # the copy shares what it did not change
            ops.append({"op": "replace", "path": pointer(*path, key), "value": value})
    ops.extend({"op": "remove", "path": pointer(*path, key)} for key in old if key not in new)
    return ops


def _inserted_around(old: list[Any], new: list[Any]) -> int | None:
    """How many items `new` has before `old`'s (same names, in order, then only appended ones), or
    None when `new` is not `old` with items added at its start and/or end."""
    old_names, new_names = _names(old), _names(new)
    for start in range(len(new_names) - len(old_names) + 1):
        if new_names[start : start + len(old_names)] == old_names:
            return start
    return None


def _list_ops(path: tuple[str | int, ...], old: list[Any], new: list[Any]) -> list[Op]:
    if old == new:
        return []
    start = _inserted_around(old, new) if all(isinstance(i, dict) for i in (*old, *new)) else None
    if start is None:
        return [{"op": "replace", "path": pointer(*path), "value": new}]
    # Edits of the existing items first (at their old indices), then insertions: small patches
    # that say exactly what changed.
    ops: list[Op] = []
    for index, before in enumerate(old):
        after = new[start + index]
        if before != after:
            ops.extend(_dict_ops((*path, index), before, after))
    ops.extend({"op": "add", "path": pointer(*path, index), "value": new[index]} for index in range(start))
    ops.extend({"op": "add", "path": pointer(*path, "-"), "value": item} for item in new[start + len(old) :])
    return ops


def _field_ops(path: tuple[str, ...], old: Any, new: Any) -> list[Op]:
    if old == new:
        return []
    if old is None:
        return [{"op": "add", "path": pointer(*path), "value": new}]
    if isinstance(old, list) and isinstance(new, list):
        return _list_ops(path, old, new)
    return [{"op": "replace", "path": pointer(*path), "value": new}]


# The parts of a pod the webhook may change, in the order their operations are emitted.
SPEC_FIELDS = ("initContainers", "containers", "ephemeralContainers", "volumes", "imagePullSecrets")


def diff_pod(old: dict[str, Any], new: dict[str, Any]) -> list[Op]:
    """Operations turning `old` into `new`, for changes in annotations and `SPEC_FIELDS` only.

    Applies cleanly when `metadata` or `metadata.annotations` is absent from `old` (they are added)."""
    ops: list[Op] = []
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    old_ann, new_ann = old_meta.get("annotations"), new_meta.get("annotations")
    if new_ann and old_ann != new_ann:
        if "metadata" not in old or not isinstance(old["metadata"], dict):
            ops.append({"op": "add", "path": "/metadata", "value": {}})
        if not isinstance(old_ann, dict):
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
            old_ann = {}
        ops.extend(_dict_ops(("metadata", "annotations"), old_ann, new_ann))
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    for field in SPEC_FIELDS:
        ops.extend(_field_ops(("spec", field), old_spec.get(field), new_spec.get(field)))
    return ops
