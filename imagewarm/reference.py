"""Image references: the one parser every component uses.

`parse` reads a reference the way the kubelet and containerd do (the distribution reference
grammar with Docker's normalisation: `nginx` is `docker.io/library/nginx`) and returns a frozen
`Reference`; everything after works on that value. `to_proxied` / `from_proxied` map a reference
to and from its form behind the node proxy, `localhost:7439/<registry-segment>/<repository>`.

Where we are deliberately stricter than distribution (anything we accept, the kubelet accepts):
- A first component with upper-case letters and no `.` or `:port` (`Foo/bar`) is rejected;
  distribution reads it as a registry host, which lower-cased would be a Docker Hub namespace.
- The 255-character limit applies to the whole normalised name (`docker.io/library/x`), as in
  distribution v0.6 (which Kubernetes vendors), not only to the repository path.
- Digests: only `sha256` (64 hex) and `sha512` (128 hex), lower-case, since the cache verifies
  content against them (`imagewarm.digest`). Other algorithms that fit the grammar are named as
  unsupported.
And deliberately more normalising: host names are case-insensitive, so the registry is lower-cased
(`Registry.Corp/app` and `registry.corp/app` are the same Reference).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from imagewarm.digest import Digest, InvalidDigest

DEFAULT_REGISTRY = "docker.io"
LEGACY_DEFAULT_REGISTRY = "index.docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
OFFICIAL_NAMESPACE = "library/"
DEFAULT_PROXY_PREFIX = "localhost:7439"
MAX_NAME_LENGTH = 255

# No valid reference is longer (a 255-character name, a 128-character tag, a sha512 digest, plus
# the few characters normalisation may remove); the bound also keeps huge texts out of the cache.
_MAX_TEXT_LENGTH = 600

# The grammar (distribution/reference regexp.go), as pieces that build the anchored expressions.
_ALPHANUMERIC = "[a-z0-9]+"
_SEPARATOR = "(?:[._]|__|-+)"
_PATH_COMPONENT = f"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_PORT = "[0-9]+"

_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT)
_REPOSITORY_RE = re.compile(f"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_HOST_RE = re.compile(f"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::{_PORT})?")
_DOMAIN_NAME_RE = re.compile(_DOMAIN_NAME)
_PORT_RE = re.compile(_PORT)
_TAG_RE = re.compile("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IDENTIFIER_RE = re.compile("[a-f0-9]{64}")

_FORM = "[REGISTRY/]REPOSITORY[:TAG][@DIGEST]"
_TAG_GRAMMAR = "tags are [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_PATH_GRAMMAR = "path components are lower-case letters and digits, separated by '.', '_', '__' or dashes"
_HOST_GRAMMAR = "a registry is HOST[:PORT], HOST a DNS name, an IPv4 address or an [IPv6] address"


class InvalidReference(ValueError):
    """Text that is not a valid image reference; the message names the offending part."""


class Unproxiable(ValueError):
    """A valid reference whose proxied form would not be valid (IPv6 host, name too long)."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed, normalised image reference. Build it with `parse`, which guarantees the fields:
    `registry` lower-case host[:port] (`docker.io` for Docker Hub), `repository` the path
    (`library/nginx`), `tag` and `digest` (`sha256:<hex>`) or None when absent."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`registry/repository`, e.g. `docker.io/library/nginx`."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar(self) -> str:
        """Docker's short form: `nginx:1.27`, `user/app`, `registry.corp:5000/app` (full elsewhere).
        It parses back to this reference: `docker.io/a.b/c` keeps `docker.io/`, since `a.b/c`
        would name the registry `a.b`."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            namespace = self.repository.split("/", 1)[0]
            official = self.repository.removeprefix(OFFICIAL_NAMESPACE)
            if official != self.repository and "/" not in official:
                name = official
            elif "." not in namespace and namespace != "localhost":
                name = self.repository
        return name + self._suffix()

    def with_tag(self, tag: str | None) -> Reference:
        """This reference with `tag` (None removes it); raises InvalidReference for a bad tag."""
        if tag is not None:
            _check_tag(tag, str(self))
        return Reference(self.registry, self.repository, tag, self.digest)

    def with_digest(self, digest: str | None) -> Reference:
        """This reference with `digest` (None removes it); raises InvalidReference for a bad digest."""
        if digest is not None:
            _check_digest(digest, str(self))
        return Reference(self.registry, self.repository, self.tag, digest)

    def _suffix(self) -> str:
        suffix = f":{self.tag}" if self.tag is not None else ""
        return suffix + (f"@{self.digest}" if self.digest is not None else "")

    def __str__(self) -> str:
        """The canonical full form, e.g. `docker.io/library/nginx:1.27@sha256:...`."""
        return self.name + self._suffix()


def parse(text: str) -> Reference:
    """Parse an image reference as the kubelet would, normalised (`nginx` ->
    `docker.io/library/nginx`). Raises InvalidReference naming the offending part."""
    if not isinstance(text, str):
        raise InvalidReference(f"an image reference is text, not {type(text).__name__}: {text!r}")
    if len(text) > _MAX_TEXT_LENGTH:
        raise InvalidReference(
            f"image reference '{text[:60]}...' is {len(text)} characters long: a name has at most "
            f"{MAX_NAME_LENGTH}, a tag 128 and a digest 135"
        )
    return _parse(text)


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> Reference:
    if not text:
        raise InvalidReference(f"empty image reference: expected {_FORM}")
    if _IDENTIFIER_RE.fullmatch(text):
        raise InvalidReference(
            f"'{text}' is a bare 64-hex identifier, not an image name: write REPOSITORY@sha256:{text}"
        )
    rest, at, digest = text.partition("@")
    # The tag follows the first ':' after the last '/': a port's ':' always precedes a '/'.
    colon = rest.find(":", rest.rfind("/") + 1)
    name, tag = (rest[:colon], rest[colon + 1 :]) if colon >= 0 else (rest, None)
    registry, repository = _split_registry(name, text)
    if tag is not None:
        _check_tag(tag, text)
    if at:
        _check_digest(digest, text)
    return Reference(registry, repository, tag, digest if at else None)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    """Split `name` into (registry, repository) by Docker's rule: the first component is a registry
    when it contains '.' or ':' or is exactly `localhost`; otherwise the registry is Docker Hub."""
    first, slash, remainder = name.partition("/")
    if not slash:
        if name.startswith("["):
            raise InvalidReference(f"'{text}' names a registry but no repository: write HOST/REPOSITORY")
        registry, repository = DEFAULT_REGISTRY, name
    elif first == "localhost" or "." in first or ":" in first:
        registry, repository = _normalise_host(first, text), remainder
    elif first.lower() != first:
        raise InvalidReference(
            f"invalid repository '{name}' in '{text}': it must be lower-case (a registry host needs "
            "a '.', a ':PORT' or to be 'localhost')"
        )
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = OFFICIAL_NAMESPACE + repository
    _check_repository(repository, text)
    full_name = f"{registry}/{repository}"
    if len(full_name) > MAX_NAME_LENGTH:
        raise InvalidReference(
            f"name '{full_name[:60]}...' of '{text[:80]}' is {len(full_name)} characters long: "
            f"the limit is {MAX_NAME_LENGTH}"
        )
    return registry, repository


def _normalise_host(host: str, text: str) -> str:
    """Validate a registry HOST[:PORT], lower-cased, with Docker Hub's legacy name made `docker.io`."""
    if not _HOST_RE.fullmatch(host):
        raise InvalidReference(f"invalid registry '{host}' in '{text}': {_HOST_GRAMMAR}")
    host = host.lower()
    return DEFAULT_REGISTRY if host == LEGACY_DEFAULT_REGISTRY else host


def _check_repository(repository: str, text: str) -> None:
    if _REPOSITORY_RE.fullmatch(repository):
        return
    if _REPOSITORY_RE.fullmatch(repository.lower()):
        raise InvalidReference(f"invalid repository '{repository}' in '{text}': it must be lower-case")
    for component in repository.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            shown = "an empty path component" if not component else f"invalid path component '{component}'"
            raise InvalidReference(f"{shown} in '{text}': {_PATH_GRAMMAR}")
    raise AssertionError(f"unreachable: {repository!r} failed as a whole but not by component")


def _check_tag(tag: str, text: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise InvalidReference(f"invalid tag '{tag}' in '{text}': {_TAG_GRAMMAR}")


def _check_digest(digest: str, text: str) -> None:
    try:
        Digest.parse(digest, within=text)
    except InvalidDigest as exc:
        raise InvalidReference(str(exc)) from None


def check_tag(tag: str) -> str:
    """`tag` when it is a valid tag; raises InvalidReference saying the grammar otherwise."""
    if not isinstance(tag, str):
        raise InvalidReference(f"a tag must be text, not {type(tag).__name__}")
    _check_tag(tag, tag)
    return tag


# The proxied form: `<prefix>/<registry-segment>/<repository>`, tag and digest kept.


def registry_segment(registry: str) -> str:
    """The path segment naming `registry` behind the proxy: lower-cased, port after '_'
    (`registry.corp:5000` -> `registry.corp_5000`; '_' never occurs in a host, so it decodes back).
    Raises Unproxiable for an IPv6 host (brackets cannot appear in a path), InvalidReference for
    text that is not a registry."""
    host = _normalise_host(registry, registry)
    if host.startswith("["):
        raise Unproxiable(
            f"registry '{registry}' is an IPv6 address, which cannot be written in an image path"
        )
    return host.replace(":", "_")


@functools.lru_cache(maxsize=1024)
def parse_registry_segment(segment: str) -> str:
    """The registry named by a proxy path segment or `ns=` value: accepts `host`, `host_port` and
    `host:port` (also `[ipv6]:port`); returns lower-case `host[:port]`, `index.docker.io` as
    `docker.io`. Raises InvalidReference when `segment` is none of these."""
    if _HOST_RE.fullmatch(segment):
        return _normalise_host(segment, segment)
    host, underscore, port = segment.rpartition("_")
    if underscore and _DOMAIN_NAME_RE.fullmatch(host) and _PORT_RE.fullmatch(port):
        return _normalise_host(f"{host}:{port}", segment)
    raise InvalidReference(
        f"invalid registry segment '{segment}': expected HOST, HOST_PORT or HOST:PORT "
        "(e.g. docker.io, registry.corp_5000)"
    )


def registry_endpoint(registry: str) -> str:
    """The host[:port] to contact for `registry`: Docker Hub's API lives at registry-1.docker.io."""
    if registry.lower() in (DEFAULT_REGISTRY, LEGACY_DEFAULT_REGISTRY):
        return DOCKER_HUB_ENDPOINT
    return registry


@functools.lru_cache(maxsize=64)
def _proxy_prefix(prefix: str) -> str:
    """Validate a proxy prefix (`localhost:7439`, or a host with path components) and normalise it."""
    host, slash, path = prefix.partition("/")
    valid = (
        (host == "localhost" or "." in host or ":" in host)
        and _HOST_RE.fullmatch(host) is not None
        and not host.startswith("[")
        and (not slash or _REPOSITORY_RE.fullmatch(path) is not None)
    )
    if not valid:
        raise ValueError(
            f"invalid proxy prefix '{prefix}': expected HOST:PORT such as {DEFAULT_PROXY_PREFIX}, "
            "where HOST contains a '.' or is 'localhost' (or has a port)"
        )
    return _normalise_host(host, prefix) + (f"/{path}" if slash else "")


def to_proxied(reference: Reference | str, prefix: str = DEFAULT_PROXY_PREFIX) -> str:
    """The reference as pulled through the proxy, tag and digest kept:
    `localhost:7439/docker.io/library/nginx:1.27@sha256:...`. The result is itself a valid reference.
    Raises Unproxiable when it cannot be written validly (IPv6 host, name over 255 characters),
    InvalidReference for invalid text, ValueError for an invalid prefix."""
    ref = parse(reference) if isinstance(reference, str) else reference
    name = f"{_proxy_prefix(prefix)}/{registry_segment(ref.registry)}/{ref.repository}"
    if len(name) > MAX_NAME_LENGTH:
        raise Unproxiable(
            f"'{ref}' cannot be proxied: its proxied name would be {len(name)} characters, "
            f"over the {MAX_NAME_LENGTH} a name may have"
        )
    return name + ref._suffix()


def from_proxied(text: str, prefix: str = DEFAULT_PROXY_PREFIX) -> Reference | None:
    """The original Reference behind a proxied reference (the inverse of `to_proxied`), or None when
    `text` is not a proxied reference under `prefix` that decodes to a valid one."""
    head = _proxy_prefix(prefix) + "/"
    try:
        proxied = parse(text)
    except InvalidReference:
        return None
    if not proxied.name.startswith(head):
        return None
    segment, slash, repository = proxied.name[len(head) :].partition("/")
    if not slash:
        return None
    try:
        registry = parse_registry_segment(segment)
    except InvalidReference:
        return None
    # Only a host that parse() reads as a registry can have been written by to_proxied.
    if not (registry == "localhost" or "." in registry or ":" in registry):
        return None
    try:
        return parse(f"{registry}/{repository}{proxied._suffix()}")
    except InvalidReference:
        return None


def is_proxied(text: str, prefix: str = DEFAULT_PROXY_PREFIX) -> bool:
    """Whether `text` already points at the proxy under `prefix` (so must never be rewritten again),
    even when it does not decode to an original reference."""
    try:
        name = parse(text).name
    except InvalidReference:
        return False
    head = _proxy_prefix(prefix)
    return name == head or name.startswith(head + "/")
