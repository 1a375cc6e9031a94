"""The runtime fallback list (proxy.peers.fallback): which peers a node lists, the hosts.toml it writes."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from imagewarm.config import ConfigError
from proxy import metrics  # noqa: F401  (declares the metrics read below)
from proxy.peers.fallback import RuntimeHosts, choose, fallback_hosts, render
from tests.unit.test_peer_discovery import config

PEERS = [f"http://10.0.0.{i}:7439" for i in range(1, 21)]


def test_choose_is_stable_for_a_node_and_spreads_across_nodes():
    mine = choose(PEERS, "node-a", 3)
    assert len(mine) == 3 and set(mine) <= set(PEERS)
    assert choose(reversed(PEERS), "node-a", 3) == mine  # order of discovery does not matter
    firsts = {choose(PEERS, f"node-{i}", 1)[0] for i in range(40)}
    assert len(firsts) >= 8, "40 nodes should not all fall back to the same few peers"
    # A peer that was not chosen going away changes nothing; a chosen one is replaced by one other.
    others = [p for p in PEERS if p not in mine]
    assert choose([p for p in PEERS if p != others[0]], "node-a", 3) == mine
    without = choose([p for p in PEERS if p != mine[0]], "node-a", 3)
    assert without[:2] == mine[1:] and mine[0] not in without


def test_render_lists_this_proxy_first_then_its_peers():
    hosts = fallback_hosts("http://localhost:7439", [*PEERS, "http://localhost:7439"], "node-a", 3)
    text = render("localhost:7439", hosts)
    parsed = tomllib.loads(text)
    assert parsed["server"] == "http://localhost:7439"
    hosts = list(parsed["host"])
    assert hosts == ["http://localhost:7439", *choose(PEERS, "node-a", 3)]
    assert all(parsed["host"][h]["capabilities"] == ["pull", "resolve"] for h in hosts)
    assert text.startswith("# Written by imagewarm proxy: pulls of localhost:7439")
    alone = fallback_hosts("http://localhost:7439", [], "n", 3)
    assert list(tomllib.loads(render("localhost:7439", alone))["host"]) == ["http://localhost:7439"]


def test_write_replaces_the_file_only_when_it_changes(tmp_path: Path):
    hosts = RuntimeHosts(tmp_path, "localhost:7439", owner="node-a", limit=2)
    assert hosts.write(PEERS[:5])
    path = tmp_path / "localhost:7439" / "hosts.toml"
    first = path.read_text()
    assert not hosts.write(list(reversed(PEERS[:5])))
    assert hosts.write(PEERS[:1]) and path.read_text() != first
    assert [p.name for p in path.parent.iterdir()] == ["hosts.toml"]  # no temporary left


def test_an_unwritable_directory_is_logged_with_what_to_do_and_never_raises(tmp_path: Path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    hosts = RuntimeHosts(blocker, "localhost:7439", owner="node-a", limit=2)

    def failures() -> float:
        return REGISTRY.get_sample_value("imagewarm_proxy_runtime_hosts_write_failures_total") or 0.0

    before = failures()
    with caplog.at_level(logging.ERROR, logger="imagewarm.proxy.fallback"):
        assert not hosts.write(PEERS)
    assert "mount containerd's config_path" in caplog.text
    assert failures() == before + 1


def test_proxy_prefix_defaults_to_localhost_and_the_listen_port_and_is_checked():
    assert config("--listen", "0.0.0.0:7500").runtime_name == "localhost:7500"
    assert config("--proxy-prefix", "Node.Local:7439").runtime_name == "node.local:7439"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        config("--proxy-prefix", "localhost")
    with pytest.raises(ConfigError, match="--fallback-peers"):
        config("--fallback-peers", "-1")


def test_a_mirrored_registry_lists_this_proxy_then_peers_then_the_registry_itself(tmp_path: Path):
    hosts = RuntimeHosts(
        tmp_path,
        "ghcr.io",
        owner="node-a",
        limit=2,
        local_url="http://10.0.0.9:7439",
        server="https://ghcr.io",
    )
    assert hosts.write(PEERS[:5])
    text = (tmp_path / "ghcr.io" / "hosts.toml").read_text()
    parsed = tomllib.loads(text)
    assert list(parsed["host"]) == ["http://10.0.0.9:7439", *choose(PEERS[:5], "node-a", 2)]
    assert parsed["server"] == "https://ghcr.io"  # containerd tries the server after every host
    assert "then https://ghcr.io itself" in text


def test_a_proxy_on_one_address_is_listed_at_that_address_and_the_agent_pulls_from_itself():
    on_node = config("--listen", "10.244.2.1:7500")
    assert on_node.runtime_local_url == "http://10.244.2.1:7500" == on_node.own_url
    for wildcard in ("0.0.0.0:7500", "127.0.0.1:7500"):
        assert config("--listen", wildcard).runtime_local_url == ""  # localhost:7500 reaches it
        assert config("--listen", wildcard).own_url == "http://127.0.0.1:7500"
    assert config("--listen", "[::]:7500").own_url == "http://[::1]:7500"
