"""`proxy.peers.discovery.peer_urls`: EndpointSlices in, peer proxy URLs out; `--peers-from` parsing."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from imagewarm.config import ConfigError, add_arguments, from_arguments
from proxy.config import ProxyConfig
from proxy.peers.discovery import peer_urls


def endpoint(*addresses: str, ready: bool | None = True, node: str = "") -> dict[str, Any]:
    result: dict[str, Any] = {"addresses": list(addresses)}
    if ready is not None:
        result["conditions"] = {"ready": ready}
    if node:
        result["nodeName"] = node
    return result


def slice_(
    *endpoints: dict[str, Any], ports: tuple[tuple[str, int], ...] = (("proxy", 7439),)
) -> dict[str, Any]:
    return {
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": name, "port": port, "protocol": "TCP"} for name, port in ports],
    }


CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], tuple[str, ...]]] = [
    ("no slices", [], {}, ()),
    (
        "ready endpoints, sorted",
        [slice_(endpoint("10.0.0.9"), endpoint("10.0.0.2"))],
        {},
        ("http://10.0.0.2:7439", "http://10.0.0.9:7439"),
    ),
    (
        "not ready left out; no condition means ready",
        [slice_(endpoint("10.0.0.1", ready=False), endpoint("10.0.0.2", ready=None))],
        {},
        ("http://10.0.0.2:7439",),
    ),
    (
        "the port named proxy, wherever it is",
        [slice_(endpoint("10.0.0.1"), ports=(("metrics", 9100), ("proxy", 7439)))],
        {},
        ("http://10.0.0.1:7439",),
    ),
    (
        "no port named proxy: the first",
        [slice_(endpoint("10.0.0.1"), ports=(("", 8080), ("other", 9090)))],
        {},
        ("http://10.0.0.1:8080",),
    ),
    ("a slice without ports is skipped", [slice_(endpoint("10.0.0.1"), ports=())], {}, ()),
    (
        "own node excluded",
        [slice_(endpoint("10.0.0.1", node="a"), endpoint("10.0.0.2", node="b"))],
        {"own_node": "a"},
        ("http://10.0.0.2:7439",),
    ),
    (
        "no own node given: nothing excluded by node",
        [slice_(endpoint("10.0.0.1", node="a"))],
        {"own_node": ""},
        ("http://10.0.0.1:7439",),
    ),
    (
        "own address:port excluded, the same address on another port kept",
        [
            slice_(endpoint("10.0.0.1"), endpoint("10.0.0.2")),
            slice_(endpoint("10.0.0.1"), ports=(("proxy", 8000),)),
        ],
        {"own_address": ("10.0.0.1", 7439)},
        ("http://10.0.0.1:8000", "http://10.0.0.2:7439"),
    ),
    (
        "IPv6 in brackets; own IPv6 address excluded whatever its case",
        [slice_(endpoint("fd00::1", "FD00::2"))],
        {"own_address": ("fd00::2", 7439)},
        ("http://[fd00::1]:7439",),
    ),
    (
        "several slices, duplicates once",
        [
            slice_(endpoint("10.0.0.3"), endpoint("10.0.0.1")),
            slice_(endpoint("10.0.0.1"), endpoint("10.0.0.2")),
        ],
        {},
        ("http://10.0.0.1:7439", "http://10.0.0.2:7439", "http://10.0.0.3:7439"),
    ),
    (
        "a slice with null endpoints",
        [{"addressType": "IPv4", "endpoints": None, "ports": [{"name": "proxy", "port": 7439}]}],
        {},
        (),
    ),
]


@pytest.mark.parametrize(
    ("slices", "own", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_peer_urls(slices: list[dict[str, Any]], own: dict[str, Any], expected: tuple[str, ...]) -> None:
    assert peer_urls(slices, **own) == expected


def config(*flags: str) -> ProxyConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ProxyConfig)
    args = parser.parse_args(["--cache-dir", "/tmp/x", "--upstream", "docker.io", *flags])
    return from_arguments(ProxyConfig, args, environ={})


def test_peers_from_is_namespace_and_service() -> None:
    assert config("--peers-from", "imagewarm-system/imagewarm-proxy").peers_from == (
        "imagewarm-system",
        "imagewarm-proxy",
    )
    assert config().peers_from is None


@pytest.mark.parametrize("bad", ["imagewarm-proxy", "ns/", "/svc", "a/b/c", "NS/svc", "ns/svc_1"])
def test_peers_from_rejects_other_forms(bad: str) -> None:
    with pytest.raises(ConfigError, match="NAMESPACE/SERVICE"):
        config("--peers-from", bad)
