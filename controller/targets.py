"""Which nodes an ImagePullJob pulls on (pure: from the cached Nodes, Pods and SidecarSets).

- `selector.names`: those nodes (names with no Node are not targets);
- `selector` labels (`matchLabels`/`matchExpressions`) over the Nodes' labels;
- `podSelector`: nodes running a matching pod (scheduled, not finished, not being deleted) in
  the job's namespace;
- a job made for a SidecarSet (annotation `imagewarm.io/sidecarset: <name>`): nodes running pods
  that SidecarSet selects, in any namespace it covers (`namespace`, `namespaceSelector`): a
  SidecarSet is cluster-scoped while its jobs live in the release namespace;
- nothing: every node.
Nodes being deleted are never targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from imagewarm.selectors import InvalidSelector, LabelSelector
from imagewarm.sidecarset import SidecarSet

SIDECARSET_ANNOTATION = "imagewarm.io/sidecarset"
FINISHED_POD_PHASES = ("Succeeded", "Failed")


class InvalidTargets(ValueError):
    """The job's selector cannot be used; the message says what to fix."""


def _live(objs: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    return (o for o in objs if not (o.get("metadata") or {}).get("deletionTimestamp"))


def running_nodes(pods: Iterable[dict[str, Any]], matches: Any) -> set[str]:
    """Nodes of the scheduled, unfinished pods for which `matches(pod)` holds."""
    nodes = set()
    for pod in _live(pods):
        node = (pod.get("spec") or {}).get("nodeName")
        if node and (pod.get("status") or {}).get("phase") not in FINISHED_POD_PHASES and matches(pod):
            nodes.add(node)
    return nodes


def target_nodes(
    job: dict[str, Any],
    nodes: Iterable[dict[str, Any]],
    pods: Iterable[dict[str, Any]] = (),
    *,
    sidecarset: SidecarSet | None = None,
    namespace_labels: Mapping[str, dict[str, str]] | None = None,
) -> list[str]:
    """The sorted names of the job's target nodes. Raises InvalidTargets."""
    spec = job.get("spec") or {}
    metadata = job.get("metadata") or {}
    live = {n["metadata"]["name"]: n for n in _live(nodes)}
    selector = spec.get("selector")
    pod_selector = spec.get("podSelector")
    annotations = metadata.get("annotations") or {}
    if annotations.get(SIDECARSET_ANNOTATION):
        if sidecarset is None:
            return []  # the SidecarSet is gone (its jobs go with it) or not cached yet
        labels = namespace_labels or {}
        chosen = running_nodes(
            pods,
            lambda pod: sidecarset.matches(
                pod["metadata"].get("labels") or {},
                pod["metadata"].get("namespace", ""),
                labels.get(pod["metadata"].get("namespace", "")),
            ),
        )
        return sorted(chosen & live.keys())
    if pod_selector is not None:
        try:
            parsed = LabelSelector.parse(pod_selector)
        except InvalidSelector as exc:
            raise InvalidTargets(f"spec.podSelector: {exc}") from None
        namespace = metadata.get("namespace", "")
        chosen = running_nodes(
            pods,
            lambda pod: (
                pod["metadata"].get("namespace") == namespace
                and parsed.matches(pod["metadata"].get("labels"))
            ),
        )
        return sorted(chosen & live.keys())
    if selector:
        names = selector.get("names")
        if names:
            return sorted(set(names) & live.keys())
        try:
            parsed = LabelSelector.parse(
                {k: v for k, v in selector.items() if k in ("matchLabels", "matchExpressions")}
            )
        except InvalidSelector as exc:
            raise InvalidTargets(f"spec.selector: {exc}") from None
        return sorted(name for name, n in live.items() if parsed.matches(n["metadata"].get("labels")))
    return sorted(live)
