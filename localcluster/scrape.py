"""Reading a component's Prometheus metrics over HTTP, as the tests, the benches and the demo do."""

from __future__ import annotations

import re

import requests

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(url: str, timeout: float = 10) -> list[tuple[str, dict[str, str], float]]:
    """Every sample `url` (a server's base URL) serves on /metrics: (name, labels, value)."""
    found = []
    for line in requests.get(f"{url}/metrics", timeout=timeout).text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            found.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return found


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` at `url` whose labels include `labels` (0 when none)."""
    return sum(
        value
        for sample, found, value in samples(url)
        if sample == name and all(found.get(k) == v for k, v in labels.items())
    )
