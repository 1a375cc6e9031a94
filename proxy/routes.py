"""The request path, parsed once into a typed value; everything after the edge works on that value.

Rewrite mode: `/v2/<registry-segment>/<repository>/(manifests|blobs)/<reference>`, the segment being
`host`, `host_port` or `host:port`. Mirror mode (containerd `hosts.toml`): `/v2/<repository>/...?ns=<host>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from imagewarm import reference as references
from imagewarm.digest import Digest, InvalidDigest
from proxy.errors import RegistryError, digest_invalid, name_invalid


class Kind(Enum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"


@dataclass(frozen=True)
class Target:
    """What a request asks for. `reference` is a tag or digest for manifests, a digest for blobs
    (`digest` the parsed digest). Raises InvalidDigest for a blob reference that is not one."""

    kind: Kind
    registry: str = ""
    repository: str = ""
    reference: str = ""
    # Parsed once, when the Target is made: what a blob (or a manifest by digest) names.
    digest: Digest | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind is Kind.BLOB or (self.kind is Kind.MANIFEST and ":" in self.reference):
            object.__setattr__(self, "digest", Digest.parse(self.reference))

    @property
    def blob_digest(self) -> Digest:
        """The digest of a blob Target; raises ValueError for a Target that names none."""
        if self.digest is None:
            raise ValueError(f"{self.name}:{self.reference} names no digest")
        return self.digest

    @property
    def by_digest(self) -> bool:
        return ":" in self.reference  # tags never contain a colon

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


def _registry(segment: str) -> str:
    try:
        return references.parse_registry_segment(segment)
    except ValueError as exc:
        raise name_invalid(
            f"{segment!r} is not a registry host (write host, host_port or host:port): {exc}"
        ) from None


def _repository(registry: str, parts: list[str]) -> str:
    """The repository named by `parts` on `registry`, by the one reference parser (which also adds
    Docker Hub's `library/` and enforces the name length)."""
    if not parts:
        raise name_invalid("the path names no repository: expected /v2/<registry>/<repository>/...")
    try:
        return references.parse(f"{registry}/{'/'.join(parts)}").repository
    except references.InvalidReference as exc:
        raise name_invalid(str(exc)) from None


def parse(path: str, ns: str | None = None, own_hosts: frozenset[str] = frozenset()) -> Target:
    """Parse a `/v2/...` request path (and mirror mode's `ns` query value) into a Target.

    `own_hosts` are the names of this proxy (`localhost:7439`): containerd sends `ns=<host>` for every
    host that has a `hosts.toml`, the proxy's own included, and such a request is in rewrite mode.

    Raises RegistryError: NAME_INVALID / DIGEST_INVALID (400) for malformed names, tags or digests and
    for any `.` or `..` segment (wherever it is: no path is resolved against another),
    NAME_UNKNOWN (404) for paths outside the pull API."""
    if path in ("/v2", "/v2/"):
        return Target(Kind.BASE)
    if not path.startswith("/v2/"):
        raise RegistryError("NAME_UNKNOWN", f"{path} is not part of the registry API", status=404)
    parts = path[len("/v2/") :].split("/")
    if any(part in (".", "..") for part in parts):
        raise name_invalid(
            f"{path}: a path segment is '.' or '..' (name the repository and reference as they are)"
        )
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
    if kind is Kind.MANIFEST and ":" not in ref:
        try:
            references.check_tag(ref)
        except references.InvalidReference as exc:
            raise name_invalid(str(exc)) from None
    try:
        return Target(kind, registry, repository, ref)  # parses the digest a blob or manifest names
    except InvalidDigest as exc:
        raise digest_invalid(str(exc)) from None
