"""localcluster.processes.free_ports: ports a server can still bind when it starts a moment later."""

from __future__ import annotations

import socket

from localcluster.processes import _ephemeral_low, free_ports


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    # An outgoing connection takes its local port from the ephemeral range: a port picked there
    # could be taken before its server binds it. And a port handed out earlier may not be bound yet.
    first, second = free_ports(20), free_ports(20)
    assert len(set(first + second)) == 40
    assert all(1024 < port < _ephemeral_low() for port in first + second)


def test_a_bound_port_is_not_handed_out() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_ports(1)[0]))
        taken = held.getsockname()[1]
        assert taken not in free_ports(200)
