"""The request path, parsed once into a typed value; everything after the edge works on that value.

Rewrite mode: `/v2/<registry-segment>/<repository>/(manifests|blobs)/<reference>`, the segment being
`host`, `host_port` or `host:port`. Mirror mode (containerd `hosts.toml`): `/v2/<repository>/...?ns=<host>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from imagewarm import reference as references
from proxy.errors import RegistryError, digest_invalid, name_invalid

# Distribution spec grammar (path components, tags, digests).
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
MAX_NAME = 255


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True)
class Target:
    """What a request asks for. `reference` is a tag or digest for manifests, a digest for blobs."""

    kind: Kind
    registry: str = ""
    repository: str = ""
    reference: str = ""

    @property
    def by_digest(self) -> bool:
        return ":" in self.reference  # tags never contain a colon

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


def check_digest(text: str) -> str:
    if not is_digest(text):
        raise digest_invalid(f"{text!r} is not a digest: expected sha256:<64 hex> or sha512:<128 hex>")
    return text


def _registry(segment: str) -> str:
    try:
        return references.parse_registry_segment(segment)
    except ValueError as exc:
        raise name_invalid(
            f"{segment!r} is not a registry host (write host, host_port or host:port): {exc}"
        ) from None


def _repository(registry: str, parts: list[str]) -> str:
    if not parts:
        raise name_invalid("the path names no repository: expected /v2/<registry>/<repository>/...")
    for part in parts:
        if not _COMPONENT.match(part):
            raise name_invalid(
                f"{part!r} is not a valid repository path component "
                "(lower-case letters, digits and single separators . _ __ -)"
            )
    repository = "/".join(parts)
    if registry == "docker.io" and len(parts) == 1:
        repository = "library/" + repository  # Docker Hub's official images
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise name_invalid(f"repository name over {MAX_NAME} characters")
    return repository


def parse(path: str, ns: str | None = None, own_hosts: frozenset[str] = frozenset()) -> Target:
    """Parse a `/v2/...` request path (and mirror mode's `ns` query value) into a Target.

    `own_hosts` are the names of this proxy (`localhost:7439`): containerd sends `ns=<host>` for every
    host that has a `hosts.toml`, the proxy's own included, and such a request is in rewrite mode.

    Raises RegistryError: NAME_INVALID / DIGEST_INVALID (400) for malformed names, tags or digests,
    NAME_UNKNOWN (404) for paths outside the pull API."""
    if path in ("/v2", "/v2/"):
        return Target(Kind.BASE)
    if not path.startswith("/v2/"):
        raise RegistryError("NAME_UNKNOWN", f"{path} is not part of the registry API", status=404)
    parts = path[len("/v2/") :].split("/")
    if len(parts) < 3 or parts[-2] not in ("manifests", "blobs"):
        raise RegistryError(
            "NAME_UNKNOWN",
            f"{path}: expected /v2/<name>/manifests/<reference> or /v2/<name>/blobs/<digest>",
            status=404,
        )
    kind = Kind.MANIFEST if parts[-2] == "manifests" else Kind.BLOB
    ref = parts[-1]
    names = parts[:-2]
    if ns and ns.lower() not in own_hosts:
        registry = _registry(ns)
    else:
        registry = _registry(names[0])
        names = names[1:]
    repository = _repository(registry, names)
    if kind is Kind.BLOB or ":" in ref:
        check_digest(ref)
    elif not _TAG.match(ref):
        raise name_invalid(f"{ref!r} is not a valid tag (letters, digits, _ . -; at most 128)")
    return Target(kind, registry, repository, ref)
