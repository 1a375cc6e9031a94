"""HTTP `Range` for blobs: one `bytes=` range, as registries and their clients use it; and the other
direction, the `Content-Range` of a source's answer when a fill resumes (`bytes=N-`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import RegistryError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# A source's answer is hostile input: ASCII digits only (`int` takes any Unicode digit), at most 19 of
# them (any real size fits; a thousand-digit number is not worth converting).
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)", re.IGNORECASE)
_LENGTH = re.compile(r"[0-9]{1,19}")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a satisfiable single range; None to send the whole blob (no header,
    or a form we ignore as RFC 9110 allows). Raises RANGE_INVALID (416) when it cannot be satisfied."""
    if not header:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first_text, last_text = match.groups()
    if first_text == "":  # suffix: the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            raise unsatisfiable(size)
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        raise unsatisfiable(size)
    return first, min(last, size - 1)


def unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        "RANGE_INVALID",
        f"requested range not satisfiable: the blob has {size} bytes",
        status=416,
        headers={"Content-Range": f"bytes */{size}"},
    )


def parse_length(value: str | None) -> int | None:
    """A `Content-Length` value, or None when absent or not a plain decimal number."""
    if value is None or not _LENGTH.fullmatch(value.strip(" \t")):
        return None
    return int(value)


@dataclass(frozen=True)
class ContentRange:
    """A satisfied range as a source states it: bytes `first` to `last` inclusive of `total` (None
    when the source wrote `*`, size unknown)."""

    first: int
    last: int
    total: int | None

    def __str__(self) -> str:
        return f"bytes {self.first}-{self.last}/{'*' if self.total is None else self.total}"


def parse_content_range(header: str | None) -> ContentRange | None:
    """`bytes FIRST-LAST/TOTAL` (RFC 9110 §14.4; TOTAL may be `*`), or None when the header is absent,
    malformed, an unsatisfied-range form (`bytes */TOTAL`), or impossible (LAST before FIRST, or not
    inside TOTAL)."""
    if header is None:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip(" \t"))
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return ContentRange(first, last, total)


def resumed_size(
    status: int, content_range: str | None, content_length: str | None, start: int
) -> int | None:
    """The blob's whole size when an answer to `Range: bytes=START-` is exactly the rest of the blob
    from START; None when it is not (a 200: the source ignored the range; a 206 of another range, of
    a size it does not state, or whose Content-Length disagrees), and the fill must start from byte 0."""
    if status != 206 or start <= 0:
        return None
    span = parse_content_range(content_range)
    if span is None or span.total is None or span.first != start or span.last != span.total - 1:
        return None
    if content_length is not None and parse_length(content_length) != span.last - span.first + 1:
        return None
    return span.total
