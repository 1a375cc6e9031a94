"""The local cluster starts deterministically: kubelets start one after another, each once the one
before has bound the host's one device-plugin socket (two kubelets started at the same instant
could both bind it, and one then exited with `bind: address already in use`). Several 2-node
clusters in a row, each started and stopped."""

from __future__ import annotations

import pytest

from localcluster.cluster import Cluster
from localcluster.kubelet import DEVICE_PLUGIN_SOCKET
from localcluster.registry import Registry

# Five starts, and maybe a wait for another run's cluster to release the machine lock first.
pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster, pytest.mark.timeout(1800)]

CYCLES = 5


def test_a_two_node_cluster_starts_and_stops_five_times_in_a_row(registry: Registry):
    for cycle in range(CYCLES):
        said: list[str] = []
        cluster = Cluster.start(nodes=2, registry=registry, progress=said.append)
        try:
            logs = [
                node.kubelet.log_path.read_text(errors="replace") for node in cluster.nodes if node.kubelet
            ]
            nodes = cluster.kubectl("get", "nodes", "-o", "name").stdout.split()
        finally:
            cluster.stop()
        assert nodes == ["node/iw-node-1", "node/iw-node-2"], (cycle, said)
        in_use = [line for log in logs for line in log.splitlines() if "address already in use" in line]
        assert len(logs) == 2 and not in_use, (cycle, in_use[:3])
        # The second kubelet started only once the first had bound the socket.
        order = [
            said.index(f"kubelet iw-node-1 bound {DEVICE_PLUGIN_SOCKET}"),
            next(i for i, line in enumerate(said) if line.startswith("started kubelet iw-node-2")),
            said.index(f"kubelet iw-node-2 bound {DEVICE_PLUGIN_SOCKET}"),
        ]
        assert order == sorted(order), (cycle, said)
        assert said[-1] == "torn down", (cycle, said)
