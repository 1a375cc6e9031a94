"""containerd's per-registry host configuration (`<config_path>/<host>/hosts.toml`), rendered.

containerd reads the file on every pull of an image named `<host>/...` and tries each `[host]` entry
in order, then `server`. Used by the node proxy (its fallback to peers) and by the local cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

PULL: tuple[str, ...] = ("pull", "resolve")


def toml_string(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(server_url: str, hosts: Sequence[str] = (), *, header: str = "") -> str:
    """A hosts.toml that tries each of `hosts` (pull, resolve) in order, then `server_url`.

    Without hosts, `server_url` itself gets a host entry (pull, resolve, push), so a plain-HTTP
    registry is pullable. `skip_verify`: the hosts we write are plain HTTP or test registries."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    lines += [f"server = {toml_string(server_url)}", ""]
    entries: list[tuple[str, tuple[str, ...]]] = [(url, PULL) for url in hosts]
    entries = entries or [(server_url, (*PULL, "push"))]
    for url, capabilities in entries:
        caps = ", ".join(toml_string(c) for c in capabilities)
        lines += [f"[host.{toml_string(url)}]", f"  capabilities = [{caps}]", "  skip_verify = true", ""]
    return "\n".join(lines)
