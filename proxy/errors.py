"""OCI distribution errors: one exception type that renders itself as the spec's error JSON."""

from __future__ import annotations

import json
from typing import Any

from flask import Response

from imagewarm.errors import ImagewarmError

# The spec's error codes and the HTTP status each is sent with.
STATUS = {
    "BLOB_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "MANIFEST_INVALID": 502,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 400,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UPSTREAM_UNAVAILABLE": 502,
}

# Clients retry with credentials when told which scheme to use.
BASIC_CHALLENGE = 'Basic realm="imagewarm proxy"'


class RegistryError(ImagewarmError):
    """An error the proxy answers with: `code` from the OCI spec, a message saying what to do."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, 400)
        self.detail = detail
        self.headers = dict(headers or {})
        if self.status == 401:
            self.headers.setdefault("WWW-Authenticate", BASIC_CHALLENGE)

    def response(self, *, head: bool = False) -> Response:
        body = json.dumps({"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]})
        rv = Response(
            "" if head else body, status=self.status, mimetype="application/json", headers=self.headers
        )
        if head:
            rv.headers["Content-Length"] = str(len(body))
        return rv


class UpstreamUnavailable(RegistryError):
    """The upstream could not be reached or kept failing (5xx, timeouts) after the retries."""

    def __init__(self, message: str) -> None:
        super().__init__("UPSTREAM_UNAVAILABLE", message, status=502)


def name_invalid(message: str) -> RegistryError:
    return RegistryError("NAME_INVALID", message)


def digest_invalid(message: str) -> RegistryError:
    return RegistryError("DIGEST_INVALID", message)


def denied(message: str) -> RegistryError:
    return RegistryError("DENIED", message)


def unauthorized(message: str) -> RegistryError:
    return RegistryError("UNAUTHORIZED", message)
