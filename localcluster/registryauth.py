"""Client credentials for a registry whichever scheme it asks for: Basic, or Bearer tokens.

``RegistryAuth(username, password)`` plugs into ``requests`` (``session.auth = ...``). It sends
Basic credentials up front, as plain ``auth=(user, password)`` does; when a registry answers 401
with a ``Bearer`` challenge it fetches a token from the challenge's realm for the challenged
scope (with the same credentials, or anonymously without any), sends it on the retried request
and on every later one, and fetches a wider token only when challenged again (e.g. pull -> push).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import requests
from requests.auth import AuthBase, HTTPBasicAuth

# key="quoted value" or key=token, as in `Bearer realm="...",service="...",scope="..."`.
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a ``WWW-Authenticate: Bearer ...`` header, or None for another scheme."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    found = {}
    for match in _PARAM.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        found[match.group(1).lower()] = quoted.replace('\\"', '"') if quoted is not None else bare
    return found


class RegistryAuth(AuthBase):
    """Basic or bearer-token authentication, chosen by the registry's challenge; thread-safe."""

    def __init__(self, username: str | None = None, password: str | None = None, timeout: float = 30) -> None:
        self.basic = (
            HTTPBasicAuth(username, password) if username is not None and password is not None else None
        )
        self.timeout = timeout
        self._token: str | None = None
        self._lock = threading.Lock()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        with self._lock:
            token = self._token
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self.basic is not None:
            request = self.basic(request)
        # A file body is read by the first send: remember where it started, to rewind for a retry.
        body = request.body
        body_start = body.tell() if body is not None and hasattr(body, "tell") else None

        def retry(response: requests.Response, **kwargs: Any) -> requests.Response:
            return self._retry(response, body_start, **kwargs)

        request.register_hook("response", retry)  # type: ignore[no-untyped-call]
        return request

    def fetch_token(self, challenge: dict[str, str]) -> str:
        """A token from the challenge's realm for its service and scope; raises HTTPError if refused."""
        params = {key: challenge[key] for key in ("service", "scope") if challenge.get(key)}
        response = requests.get(challenge["realm"], params=params, auth=self.basic, timeout=self.timeout)
        response.raise_for_status()
        body = response.json()
        return str(body.get("token") or body["access_token"])

    def _retry(self, response: requests.Response, body_start: int | None, **kwargs: Any) -> requests.Response:
        """On a Bearer 401: fetch a token and send the request once more with it."""
        if response.status_code != 401:
            return response
        challenge = bearer_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None or "realm" not in challenge:
            return response
        try:
            token = self.fetch_token(challenge)
        except requests.RequestException:
            return response  # the caller sees the registry's 401
        with self._lock:
            self._token = token
        response.content  # noqa: B018 -- read the body so the connection can be reused
        response.close()
        retry = response.request.copy()
        retry.hooks = {"response": []}  # once only: a second 401 stands
        retry.headers["Authorization"] = f"Bearer {token}"
        if body_start is not None:
            retry.body.seek(body_start)  # type: ignore[union-attr]
        sent = response.connection.send(retry, **kwargs)
        sent.history.append(response)
        sent.request = retry
        return sent
