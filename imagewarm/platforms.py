"""OCI platforms (`linux/amd64`, `linux/arm64/v8`): parsed once, and matched against an image index.

Architectures use Go's names, as in image indexes (`amd64`, `arm64`, not `x86_64`, `aarch64`).
Variants are normalised as containerd does: `arm64` is `arm64/v8`, `amd64` is `amd64/v1` and `arm`
without a variant is `arm/v7`, so `linux/arm64` and `linux/arm64/v8` are the same platform.
"""

from __future__ import annotations

import platform as host
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagewarm.errors import ImagewarmError

ALL = "all"

_NAME = re.compile(r"[a-z0-9_.-]+")
# Go's GOARCH for the names Python's platform.machine() gives.
_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
_DEFAULT_VARIANT = {"arm64": "v8", "amd64": "v1", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    """An `os/architecture[/variant]`; build it with `parse_platform` or `this_platform`."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def _normal_variant(self) -> str:
        return self.variant or _DEFAULT_VARIANT.get(self.architecture, "")

    def matches(self, other: Platform) -> bool:
        """Whether an index entry for `other` runs here: same os and architecture; the variant must
        match only when this platform names one (`linux/arm/v6` does not take `linux/arm/v7`)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or self._normal_variant() == other._normal_variant()


def parse_platform(text: str) -> Platform:
    """`os/arch` or `os/arch/variant` -> Platform. Raises ValueError saying the expected form."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"platform {text!r} must be os/arch or os/arch/variant, e.g. linux/amd64, or all")
    return Platform(*parts)


def parse_choice(text: str) -> Platform | str:
    """A `--platform` value: `all` (every platform of an index) or one platform."""
    return ALL if text.strip().lower() == ALL else parse_platform(text)


def this_platform() -> Platform:
    """`linux/<arch>` of this machine, the architecture in Go's names (x86_64 -> amd64)."""
    machine = host.machine().lower()
    return Platform("linux", _GO_ARCH.get(machine, machine))


def of_descriptor(descriptor: Mapping[str, Any]) -> Platform | None:
    """The platform an index entry declares, or None when it declares none (or not os+arch)."""
    fields = descriptor.get("platform")
    if not isinstance(fields, Mapping):
        return None
    os_name, arch = fields.get("os"), fields.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    variant = fields.get("variant")
    return Platform(
        os_name.lower(), arch.lower(), variant.lower() if isinstance(variant, str) and variant else None
    )


class NoMatchingPlatform(ImagewarmError, LookupError):
    """An index has no entry for the wanted platform; the message lists the ones it has."""


def choose(
    entries: Sequence[Mapping[str, Any]], wanted: Platform | str, image: str = "the image"
) -> list[Mapping[str, Any]]:
    """The index entries (`manifests[]`) to pull for `wanted`: all of them for `ALL`; for one platform
    the first entry that matches it, preferring one whose variant is exactly the wanted one. Raises
    NoMatchingPlatform naming the platforms the index has and how to choose another."""
    if not isinstance(wanted, Platform):  # ALL, the only other choice parse_choice gives
        return list(entries)
    matching = [e for e in entries if (p := of_descriptor(e)) is not None and wanted.matches(p)]
    exact = [e for e in matching if of_descriptor(e) == wanted]
    if exact or matching:
        return [(exact or matching)[0]]
    offered = sorted({str(p) for e in entries if (p := of_descriptor(e)) is not None})
    raise NoMatchingPlatform(
        f"{image} has no {wanted} image (it has: {', '.join(offered) or 'no declared platforms'}); "
        "choose one with --platform, or --platform all"
    )
