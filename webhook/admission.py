"""AdmissionReview (`admission.k8s.io/v1`) parsed at the edge into a typed request, and the answer.

Everything after `parse_review` works on `AdmissionRequest`; a body that is not a usable review raises
`BadReview`, which the HTTP layer turns into a 400 with its message. For the requests the webhook
decides on (a pod's CREATE, an UPDATE of its ephemeral containers) the pod is checked here too:
every value the decision reads has the shape a Kubernetes pod gives it, or `InvalidPod` says which
one does not (the pod is then allowed unchanged, with that warning). The decision can thus trust
what it reads, and an exception while deciding is a bug, never junk input.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from typing import Any

from imagewarm.errors import ImagewarmError
from webhook.patch import Op

API_VERSION = "admission.k8s.io/v1"
MAX_WARNING = 120  # the API server's advice for warning length


class BadReview(ImagewarmError, ValueError):
    """The body is not an AdmissionReview this webhook can answer; the message says what is wrong."""


class InvalidPod(ImagewarmError, ValueError):
    """A review of a pod not shaped like one; the message names the field. Answered allowed, unchanged."""

    def __init__(self, request: AdmissionRequest, message: str) -> None:
        super().__init__(message)
        self.request = request


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str


@dataclass(frozen=True)
class AdmissionRequest:
    uid: str
    kind: Kind
    resource: str
    sub_resource: str
    operation: str
    namespace: str
    name: str
    dry_run: bool
    # The checked pod (and the old one, for an update) when the webhook decides on this request.
    pod: dict[str, Any] | None = None
    old_pod: dict[str, Any] | None = None

    @property
    def is_pod(self) -> bool:
        return self.kind.group == "" and self.kind.kind == "Pod" and self.resource in ("pods", "")

    @property
    def is_pod_create(self) -> bool:
        return self.is_pod and self.operation == "CREATE" and self.sub_resource == ""

    @property
    def is_ephemeral_update(self) -> bool:
        return self.is_pod and self.operation == "UPDATE" and self.sub_resource == "ephemeralcontainers"


def _text(request: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = request.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise BadReview(f"request.{key} must be a {'non-empty ' if required else ''}string")
    return value


def parse_review(body: bytes) -> AdmissionRequest:
    """Parse a request body; raises BadReview naming the first problem found."""
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadReview(f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(review, dict):
        raise BadReview("body must be a JSON object (an AdmissionReview)")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReview(
            f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
            f"{str(review.get('apiVersion'))[:60]!r} {str(review.get('kind'))[:60]!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request object")
    kind: dict[str, Any] = request["kind"] if isinstance(request.get("kind"), dict) else {}
    resource: dict[str, Any] = request["resource"] if isinstance(request.get("resource"), dict) else {}
    dry_run = request.get("dryRun", False)
    if dry_run is not None and not isinstance(dry_run, bool):
        raise BadReview("request.dryRun must be a boolean")
    parsed = AdmissionRequest(
        uid=_text(request, "uid", required=True),
        kind=Kind(str(kind.get("group") or ""), str(kind.get("version") or ""), str(kind.get("kind") or "")),
        resource=str(resource.get("resource") or ""),
        sub_resource=_text(request, "subResource"),
        operation=_text(request, "operation", required=True),
        namespace=_text(request, "namespace"),
        name=_text(request, "name"),
        dry_run=bool(dry_run),
    )
    if not (parsed.is_pod_create or parsed.is_ephemeral_update):
        return parsed
    try:
        pod = check_pod(request.get("object"))
        old = request.get("oldObject")
        old_pod = check_pod(old) if old is not None and parsed.is_ephemeral_update else None
    except ValueError as exc:
        raise InvalidPod(parsed, str(exc)) from None
    if parsed.is_pod_create and not (pod.get("spec") or {}).get("containers"):
        raise InvalidPod(parsed, "the pod has no containers")
    return replace(parsed, pod=pod, old_pod=old_pod)


# --- the shapes the decision reads ----------------------------------------------------------------
# Null counts as absent, as Kubernetes' own decoding has it (and as the decision reads it).

CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


def _type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object, not {_type(value)}")
    return value


def _absent_empty(value: object) -> object:
    return {} if value is None else value


def _string_map(parent: dict[str, Any], key: str, where: str) -> None:
    value = parent.get(key)
    if value is None:
        return
    for name, item in _object(value, f"{where}.{key}").items():
        if not isinstance(item, str):
            raise ValueError(f"{where}.{key}[{name[:60]!r}] must be a string, not {_type(item)}")


def _named_items(parent: dict[str, Any], key: str, where: str, *strings: str) -> list[dict[str, Any]]:
    """`parent[key]` as a list of objects whose `name` (and `strings`) are strings where present."""
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key} must be a list, not {_type(value)}")
    for index, item in enumerate(value):
        at = f"{where}.{key}[{index}]"
        _object(item, at)
        for field in ("name", *strings):
            if item.get(field) is not None and not isinstance(item[field], str):
                raise ValueError(f"{at}.{field} must be a string, not {_type(item[field])}")
    return value


def check_pod(obj: object) -> dict[str, Any]:
    """`obj` if every value the decision reads has a pod's shape; raises ValueError naming the first
    that does not. Images are not checked here: an image that is not a reference is the decision's
    to warn about, container by container."""
    pod = _object(obj, "the object")
    metadata = _object(_absent_empty(pod.get("metadata")), "metadata")
    _string_map(metadata, "labels", "metadata")
    _string_map(metadata, "annotations", "metadata")
    if metadata.get("namespace") is not None and not isinstance(metadata["namespace"], str):
        raise ValueError(f"metadata.namespace must be a string, not {_type(metadata['namespace'])}")
    spec = _object(_absent_empty(pod.get("spec")), "spec")
    for field in CONTAINER_FIELDS:
        for index, container in enumerate(_named_items(spec, field, "spec")):
            where = f"spec.{field}[{index}]"
            _named_items(container, "env", where)
            _named_items(container, "volumeMounts", where, "mountPath", "subPathExpr")
    _named_items(spec, "volumes", "spec")
    _named_items(spec, "imagePullSecrets", "spec")
    return pod


def _clean(warning: str) -> str:
    """Printable ASCII within the advised length (warnings travel as HTTP headers)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in warning)
    return text if len(text) <= MAX_WARNING else text[: MAX_WARNING - 3] + "..."


def response(uid: str, patch: list[Op] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """An allowing AdmissionReview answer, with a JSON patch when there is one."""
    answer: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        answer["patchType"] = "JSONPatch"
        answer["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if warnings:
        answer["warnings"] = [_clean(w) for w in warnings[:10]]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": answer}
