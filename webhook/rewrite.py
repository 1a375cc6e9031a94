"""Which image an image reference becomes: the one decision about a single reference.

Parsing and the proxied form come from `imagewarm.reference` (the one parser); this module only
decides whether to rewrite, and says why not when it does not.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable
from dataclasses import dataclass

from imagewarm import reference


@dataclass(frozen=True)
class Rule:
    """What is never rewritten: the proxy itself, `excluded_registries` (lower-case `host[:port]`),
    images matching any glob of `excluded_images` (matched against the image as written, its
    canonical form and its `registry/repository` name) and, when `only_registries` is not empty,
    images of any registry it does not list (the proxy refuses registries it was not given)."""

    proxy_prefix: str
    excluded_registries: frozenset[str]
    excluded_images: tuple[str, ...] = ()
    only_registries: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Outcome:
    """`image` is the new image, or None when unchanged; `warning` says why an image could not be."""

    image: str | None = None
    warning: str | None = None


def _matches(patterns: Iterable[str], *candidates: str) -> bool:
    return any(fnmatch.fnmatchcase(c, p) for p in patterns for c in candidates)


# Only images this short are remembered: the references clusters run are far shorter (a name has at
# most 255 characters), and longer text, whatever a client sends, is decided again each time.
MAX_CACHED_IMAGE = 512
# What a warning quotes of an image, and its length in all: users send what they like, and the
# answer carries at most 120 characters of each warning anyway (they travel as headers).
QUOTED_CHARACTERS = 100
WARNING_CHARACTERS = 300


def quoted(text: str) -> str:
    """`text` in quotes, cut to its first QUOTED_CHARACTERS characters with its length told."""
    if len(text) <= QUOTED_CHARACTERS:
        return repr(text)
    return f"{text[:QUOTED_CHARACTERS]!r}...({len(text)} characters)"


def _warning(text: str) -> Outcome:
    return Outcome(
        warning=text if len(text) <= WARNING_CHARACTERS else text[: WARNING_CHARACTERS - 3] + "..."
    )


def decide(image: object, rule: Rule) -> Outcome:
    """The rewritten form of `image`, or no change (with a warning when the reference is invalid
    or cannot be proxied). Idempotent: an image already on the proxy is never prefixed again."""
    if not isinstance(image, str) or not image:
        return _warning(f"image {quoted(repr(image))} is not a reference; left unchanged")
    if len(image) > MAX_CACHED_IMAGE:
        return _decide.__wrapped__(image, rule)
    return _decide(image, rule)


# A cluster runs few distinct images over and over: remember the last few thousand answers (pure
# function of its arguments; Outcome is immutable). At most 4,096 entries of at most
# MAX_CACHED_IMAGE characters and a WARNING_CHARACTERS warning: 14 MiB at worst (measured, 4-byte
# characters), whatever clients send.
@functools.lru_cache(maxsize=4096)
def _decide(image: str, rule: Rule) -> Outcome:
    # The prefix test is the cheap common case (reinvocation); is_proxied also catches other spellings.
    if image.startswith(rule.proxy_prefix + "/") or reference.is_proxied(image, rule.proxy_prefix):
        return Outcome()
    try:
        ref = reference.parse(image)
    except ValueError as exc:
        return _warning(f"image {quoted(image)} left unchanged: {exc}")
    registry = ref.registry.lower()
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else registry
    if registry in rule.excluded_registries or host in rule.excluded_registries:
        return Outcome()
    if rule.only_registries and registry not in rule.only_registries:
        return Outcome()
    if rule.excluded_images and _matches(rule.excluded_images, image, str(ref), ref.name):
        return Outcome()
    try:
        proxied = reference.to_proxied(ref, prefix=rule.proxy_prefix)
    except ValueError as exc:
        return _warning(f"image {quoted(image)} cannot be proxied, left unchanged: {exc}")
    return Outcome(image=proxied) if proxied != image else Outcome()
