"""HTTP `Range` for blobs: one `bytes=` range, as registries and their clients use it."""

from __future__ import annotations

import re

from proxy.errors import RegistryError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


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
