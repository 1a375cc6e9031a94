"""SidecarSet injection (OpenKruise semantics, group imagewarm.io), a pure function on a pod dict.

On pod CREATE every SidecarSet whose `namespace`/`namespaceSelector` and non-empty `selector` match
the pod is injected, in name order: its `containers` before (`podInjectPolicy: BeforeAppContainer`,
the default) or after (`AfterAppContainer`) the app containers, its `initContainers` after the pod's,
its `volumes` and `imagePullSecrets` unless the pod already has one of that name. A sidecar with
`shareVolumePolicy.type: enabled` also mounts every volume the app containers mount (unless it
already mounts that name or path); `transferEnv` copies named variables from an app container.
A container whose name the pod already has is not injected again, which makes reinvocation safe.
The pod records what was injected in `imagewarm.io/sidecarset-hash` (name -> {hash, sidecarSetName},
kruise's `kruise.io/sidecarset-hash` layout) and `imagewarm.io/sidecarset-injected-list`.

Injected containers are new dicts, and so are their `env` and `volumeMounts` lists; what they hold
(variables, mounts, volumes, the rest of a template) is shared, read only, with the SidecarSet and
the pod, like `mutation.editable_copy`'s copy: deep copies were half the cost of an injection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagewarm.api import SIDECARSET_HASH_ANNOTATION as HASH_ANNOTATION
from imagewarm.sidecarset import SidecarSet

INJECTED_LIST_ANNOTATION = "imagewarm.io/sidecarset-injected-list"
INJECTED_ENV = "IS_INJECTED"  # kruise marks injected containers so sharing skips them
# Fields of a SidecarContainer that are not Container fields.
_SIDECAR_ONLY = (
    "podInjectPolicy",
    "upgradeStrategy",
    "hotUpgradeEmptyImage",
    "shareVolumePolicy",
    "shareVolumeDevicePolicy",
    "transferEnv",
    "resourcesPolicy",
)
_SUBPATH_VAR = re.compile(r"\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


@dataclass
class Injection:
    injected: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)


def _env_names(container: dict[str, Any]) -> set[Any]:
    return {e.get("name") for e in container.get("env") or [] if isinstance(e, dict)}


def _app_env(app_containers: Sequence[dict[str, Any]], container: str, env: str) -> dict[str, Any] | None:
    for app in app_containers:
        if app.get("name") == container:
            for var in app.get("env") or []:
                if isinstance(var, dict) and var.get("name") == env:
                    return var
    return None


def _transfer_env(
    sidecar: dict[str, Any], app_containers: Sequence[dict[str, Any]], warnings: list[str]
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for item in sidecar.get("transferEnv") or []:
        if not isinstance(item, dict):
            continue
        source = item.get("sourceContainerName")
        names = [item["envName"]] if item.get("envName") else list(item.get("envNames") or [])
        for name in names:
            var = _app_env(app_containers, str(source), str(name))
            if var is None:
                warnings.append(f"sidecar {sidecar.get('name')!r}: transferEnv {source}/{name} not found")
            else:
                found.append(var)
    return found


def _shared_mounts(
    sidecar: dict[str, Any], app_containers: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    policy = sidecar.get("shareVolumePolicy") or {}
    if not isinstance(policy, dict) or str(policy.get("type", "")).lower() != "enabled":
        return [], []
    mounts: list[dict[str, Any]] = []
    envs: list[dict[str, Any]] = []
    for app in app_containers:
        for mount in app.get("volumeMounts") or []:
            if not isinstance(mount, dict):
                continue
            mounts.append(mount)
            # A subPathExpr refers to the app container's variables: the sidecar needs them too.
            for var in _SUBPATH_VAR.findall(str(mount.get("subPathExpr") or "")):
                value = _app_env([app], app.get("name"), var)  # type: ignore[arg-type]
                if value is not None:
                    envs.append(value)
    return mounts, envs


def _container(template: dict[str, Any]) -> dict[str, Any]:
    """A new container dict from a sidecar template (rewriting edits its `image` in place)."""
    return {k: v for k, v in template.items() if k not in _SIDECAR_ONLY}


def _build_sidecar(
    template: dict[str, Any], app_containers: Sequence[dict[str, Any]], warnings: list[str]
) -> dict[str, Any]:
    container = _container(template)
    env = list(container.get("env") or [])
    extra_env = [{"name": INJECTED_ENV, "value": "true"}, *_transfer_env(template, app_containers, warnings)]
    mounts = list(container.get("volumeMounts") or [])
    shared, subpath_env = _shared_mounts(template, app_containers)
    for var in [*extra_env, *subpath_env]:
        if var.get("name") not in _env_names({"env": env}):
            env.append(var)
    names = {m.get("name") for m in mounts if isinstance(m, dict)}
    paths = {m.get("mountPath") for m in mounts if isinstance(m, dict)}
    for mount in shared:
        if mount.get("name") not in names and mount.get("mountPath") not in paths:
            mounts.append(mount)
            names.add(mount.get("name"))
            paths.add(mount.get("mountPath"))
    container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _is_app(container: dict[str, Any]) -> bool:
    return not any(
        isinstance(e, dict) and e.get("name") == INJECTED_ENV and e.get("value") == "true"
        for e in container.get("env") or []
    )


def _merge_named(existing: list[Any], additions: Iterable[dict[str, Any]]) -> list[Any]:
    names = {i.get("name") for i in existing if isinstance(i, dict)}
    merged = list(existing)
    for item in additions:
        if item.get("name") not in names:
            merged.append(item)
            names.add(item.get("name"))
    return merged


def inject(
    pod: dict[str, Any],
    sidecarsets: Sequence[SidecarSet],
    *,
    namespace: str,
    namespace_labels: dict[str, str] | None,
) -> Injection:
    """Inject, in place, every matching SidecarSet into `pod` (see the module docstring)."""
    result = Injection()
    metadata = pod.get("metadata") or {}
    labels: dict[str, str] = metadata["labels"] if isinstance(metadata.get("labels"), dict) else {}
    namespace = namespace or str(metadata.get("namespace") or "")
    spec = pod.setdefault("spec", {})
    app_containers = [c for c in spec.get("containers") or [] if _is_app(c)]
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    taken = {c.get("name") for key in ("containers", "initContainers") for c in spec.get(key) or []}
    injected: dict[str, str] = {}
    volumes: list[dict[str, Any]] = []
    secrets: list[dict[str, Any]] = []
    for sidecar_set in sorted(sidecarsets, key=lambda s: s.name):
        if (
            sidecar_set.namespace_selector is not None
            and namespace_labels is None
            and sidecar_set.selector.matches(labels)
        ):
            result.warnings.append(
                f"SidecarSet {sidecar_set.name} not injected: labels of namespace {namespace!r} not known yet"
            )
        if not sidecar_set.matches(labels, namespace, namespace_labels):
            continue
        added = False
        for template in sidecar_set.containers:
            if template["name"] in taken:
                continue
            policy = template.get("podInjectPolicy") or "BeforeAppContainer"
            (after if policy == "AfterAppContainer" else before).append(
                _build_sidecar(template, app_containers, result.warnings)
            )
            taken.add(template["name"])
            added = True
        for template in sidecar_set.init_containers:
            if template["name"] in taken:
                continue
            init.append(_container(template))
            taken.add(template["name"])
            added = True
        if added:
            injected[sidecar_set.name] = sidecar_set.revision
            volumes.extend(sidecar_set.volumes)
            secrets.extend(sidecar_set.image_pull_secrets)
    if not injected:
        return result
    spec["containers"] = [*before, *(spec.get("containers") or []), *after]
    if init:
        spec["initContainers"] = [*(spec.get("initContainers") or []), *init]
    if volumes:
        spec["volumes"] = _merge_named(spec.get("volumes") or [], volumes)
    if secrets:
        spec["imagePullSecrets"] = _merge_named(spec.get("imagePullSecrets") or [], secrets)
    _record(pod, injected)
    result.injected = tuple(injected)
    return result


def _record(pod: dict[str, Any], injected: dict[str, str]) -> None:
    metadata = pod.get("metadata")
    if not isinstance(metadata, dict):
        metadata = pod["metadata"] = {}
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        annotations = metadata["annotations"] = {}
    try:
        hashes = json.loads(annotations.get(HASH_ANNOTATION) or "{}")
    except ValueError:
        hashes = {}
    hashes = hashes if isinstance(hashes, dict) else {}
    for name, revision in injected.items():
        hashes[name] = {"hash": revision, "sidecarSetName": name}
    annotations[HASH_ANNOTATION] = json.dumps(hashes, sort_keys=True, separators=(",", ":"))
    listed = {n for n in str(annotations.get(INJECTED_LIST_ANNOTATION) or "").split(",") if n}
    annotations[INJECTED_LIST_ANNOTATION] = ",".join(sorted(listed | set(injected)))
