"""Registry credentials from Docker configuration: `config.json` (`{"auths": {...}}`), the legacy
`.dockercfg` (the `auths` map alone), and Kubernetes pull secrets of type
`kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg`.

A warm-up client (the node agent) finds the entry for an image with `authorization_for(...)` and sends
the `Authorization` header it returns to the proxy, which checks it against the upstream like any
pulling client's. Keys are matched the way the kubelet matches pull secrets: Docker Hub under any of
its names (`docker.io`, `index.docker.io`, `https://index.docker.io/v1/`, `registry-1.docker.io`),
scheme and `/v1/`, `/v2/` suffixes ignored, an optional repository path prefix
(`registry.corp/team`), and `*` globs in host name labels (`*.corp.example`); the most specific key
wins. Entries that carry only an `identitytoken` or `registrytoken` are skipped: the proxy forwards
Basic credentials only.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagewarm import reference
from imagewarm.errors import ImagewarmError

DOCKERCONFIGJSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKERCFG_TYPE = "kubernetes.io/dockercfg"
_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class DockerConfigError(ImagewarmError, ValueError):
    """The configuration is not valid Docker configuration; the message says which part."""


@dataclass(frozen=True)
class RegistryCredentials:
    """A username and password for the registries `key` names (`host[:port][/path]`, normalised)."""

    key: str
    username: str
    password: str = field(repr=False)

    def authorization(self) -> str:
        """The `Authorization` header value (Basic) to send to the proxy or a registry."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def normalise_key(key: str) -> str:
    """A config key as `host[:port][/path]`: scheme and API version suffix dropped, host lower-cased,
    Docker Hub as `docker.io`. Raises DockerConfigError for a key that names no registry."""
    text = key.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    host, _, path = text.partition("/")
    path = path.strip("/")
    if path in ("v1", "v2") or path.startswith(("v1/", "v2/")):
        path = ""
    host = host.lower()
    if not host:
        raise DockerConfigError(f"registry key {key!r} names no registry host")
    if host in _HUB_NAMES:
        host = reference.DEFAULT_REGISTRY
    elif "*" not in host:
        try:
            host = reference.parse_registry_segment(host)
        except reference.InvalidReference as exc:
            raise DockerConfigError(f"registry key {key!r}: {exc}") from None
    return f"{host}/{path}" if path else host


def _entry(key: str, value: Any) -> RegistryCredentials | None:
    if not isinstance(value, Mapping):
        raise DockerConfigError(f"the entry for {key!r} must be an object")
    username, password = value.get("username"), value.get("password")
    if value.get("auth"):
        try:
            decoded = base64.b64decode(str(value["auth"]), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise DockerConfigError(f"the 'auth' of {key!r} is not base64 of 'user:password'") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise DockerConfigError(f"the 'auth' of {key!r} decodes to no 'user:password' pair")
    if not username and not password:
        return None  # identity/registry tokens only, or empty: nothing the proxy can forward
    return RegistryCredentials(normalise_key(key), str(username or ""), str(password or ""))


def _entries(auths: Any, where: str) -> dict[str, RegistryCredentials]:
    if not isinstance(auths, Mapping):
        raise DockerConfigError(f"{where} must be an object mapping registries to credentials")
    found: dict[str, RegistryCredentials] = {}
    for key, value in auths.items():
        entry = _entry(str(key), value)
        if entry is not None:
            found.setdefault(entry.key, entry)  # the first spelling of a registry wins, as in Docker
    return found


def _load(data: bytes | str | Mapping[str, Any], what: str) -> Any:
    if isinstance(data, Mapping):
        return data
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DockerConfigError(f"{what} is not JSON: {exc}") from None


def parse_config(data: bytes | str | Mapping[str, Any]) -> dict[str, RegistryCredentials]:
    """Credentials by normalised key from a `config.json` (with `auths`) or a `.dockercfg` (without)."""
    document = _load(data, "the docker config")
    if not isinstance(document, Mapping):
        raise DockerConfigError("the docker config must be a JSON object")
    if "auths" in document:
        return _entries(document["auths"], "'auths'")
    if set(document) & {"credsStore", "credHelpers", "HttpHeaders", "psFormat", "experimental"}:
        return {}  # a config.json without stored credentials
    return _entries(document, "the .dockercfg")


def _secret_value(data: Mapping[str, Any], name: str, string_data: Mapping[str, Any]) -> bytes:
    if name in string_data:
        return str(string_data[name]).encode()
    try:
        return base64.b64decode(str(data[name]), validate=True)
    except binascii.Error:
        raise DockerConfigError(f"the secret's data[{name!r}] is not base64") from None


def from_secret(secret: Mapping[str, Any]) -> dict[str, RegistryCredentials]:
    """Credentials from a pull secret: the Secret object as the API server returns it (`type`, `data`
    base64-encoded, or `stringData`). Raises DockerConfigError naming what is missing."""
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    present = set(data) | set(string_data)
    kind = secret.get("type", "")
    if ".dockerconfigjson" in present and kind in ("", DOCKERCONFIGJSON_TYPE):
        return parse_config(_secret_value(data, ".dockerconfigjson", string_data))
    if ".dockercfg" in present and kind in ("", DOCKERCFG_TYPE):
        return parse_config(_secret_value(data, ".dockercfg", string_data))
    name = secret.get("metadata", {}).get("name", "the secret")
    raise DockerConfigError(
        f"{name} is not a pull secret: expected type {DOCKERCONFIGJSON_TYPE} with data "
        f"'.dockerconfigjson' (or {DOCKERCFG_TYPE} with '.dockercfg'); "
        "create it with `kubectl create secret docker-registry`"
    )


def merge(*configs: Mapping[str, RegistryCredentials]) -> dict[str, RegistryCredentials]:
    """One lookup table from several configs (e.g. a pod's pull secrets in order): the first wins."""
    merged: dict[str, RegistryCredentials] = {}
    for config in configs:
        for key, entry in config.items():
            merged.setdefault(key, entry)
    return merged


def _host_matches(pattern: str, host: str) -> bool:
    if "*" not in pattern:
        return pattern == host
    # The kubelet's rule: as many labels on both sides, each matched as a glob; the port must be equal.
    pattern_name, _, pattern_port = pattern.partition(":")
    name, _, port = host.partition(":")
    labels, pattern_labels = name.split("."), pattern_name.split(".")
    return (
        pattern_port == port
        and len(labels) == len(pattern_labels)
        and all(fnmatch.fnmatchcase(label, glob) for label, glob in zip(labels, pattern_labels, strict=True))
    )


def _matches(key: str, image: reference.Reference) -> bool:
    host, _, path = key.partition("/")
    if not _host_matches(host, image.registry):
        return False
    return not path or image.repository == path or image.repository.startswith(path + "/")


def find(
    credentials: Mapping[str, RegistryCredentials], image: str | reference.Reference
) -> RegistryCredentials | None:
    """The entry for `image` (a reference or its text): the longest matching key, exact hosts before
    globs. Raises InvalidReference for an invalid image reference."""
    ref = reference.parse(image) if isinstance(image, str) else image
    matching: Iterable[RegistryCredentials] = (
        entry for key, entry in credentials.items() if _matches(key, ref)
    )
    return max(matching, key=lambda entry: ("*" not in entry.key, len(entry.key)), default=None)


def authorization_for(
    credentials: Mapping[str, RegistryCredentials], image: str | reference.Reference
) -> str | None:
    """The `Authorization` header a warm-up client sends for `image`, or None (pull anonymously)."""
    entry = find(credentials, image)
    return entry.authorization() if entry else None
