"""AdmissionReview (`admission.k8s.io/v1`) parsed at the edge into a typed request, and the answer.

Everything after `parse_review` works on `AdmissionRequest`; a body that is not a usable review raises
`BadReview`, which the HTTP layer turns into a 400 with its message.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from webhook.patch import Op

API_VERSION = "admission.k8s.io/v1"
MAX_WARNING = 120  # the API server's advice for warning length


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer; the message says what is wrong."""


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
    object: Any
    old_object: Any
    dry_run: bool

    @property
    def is_pod(self) -> bool:
        return self.kind.group == "" and self.kind.kind == "Pod" and self.resource in ("pods", "")


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
    return AdmissionRequest(
        uid=_text(request, "uid", required=True),
        kind=Kind(str(kind.get("group") or ""), str(kind.get("version") or ""), str(kind.get("kind") or "")),
        resource=str(resource.get("resource") or ""),
        sub_resource=_text(request, "subResource"),
        operation=_text(request, "operation", required=True),
        namespace=_text(request, "namespace"),
        name=_text(request, "name"),
        object=request.get("object"),
        old_object=request.get("oldObject"),
        dry_run=bool(dry_run),
    )


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
