"""The worker's response socket: a header block goes out with the body, in order, never lost."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator

import pytest

from imagewarm.worker import COALESCE_MAX, _CoalescingSocket


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, client = socket.socketpair()
    client.settimeout(2)
    yield ours, client
    ours.close()
    client.close()


def pending(client: socket.socket) -> bytes:
    """What the client can read now, without waiting."""
    client.setblocking(False)
    try:
        return client.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        client.settimeout(2)


def test_the_header_block_waits_for_the_body(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, client = pair
    response = _CoalescingSocket(ours)
    response.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert pending(client) == b""
    response.sendall(b"{}")
    assert pending(client) == b"HTTP/1.1 200 OK\r\n\r\n{}"
    response.sendall(b"more")  # later writes go straight out
    assert pending(client) == b"more"


def test_a_large_body_follows_the_header_block(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, client = pair
    response = _CoalescingSocket(ours)
    response.sendall(b"head ")
    response.sendall(b"x" * (COALESCE_MAX + 1))
    received = b""
    while len(received) < 5 + COALESCE_MAX + 1:
        received += client.recv(1 << 20)
    assert received == b"head " + b"x" * (COALESCE_MAX + 1)


def test_flush_sends_a_header_block_without_body(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, client = pair
    response = _CoalescingSocket(ours)
    response.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    response.flush()
    assert pending(client) == b"HTTP/1.1 204 No Content\r\n\r\n"
    response.flush()
    assert pending(client) == b""


def test_sendfile_sends_the_header_block_first(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, client = pair
    response = _CoalescingSocket(ours)
    with tempfile.TemporaryFile() as blob:
        blob.write(b"blob bytes")
        blob.seek(0)
        response.sendall(b"head ")
        response.sendfile(blob, offset=0, count=10)
    assert client.recv(100) + pending(client) == b"head blob bytes"


def test_an_aborted_response_sends_nothing_held(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, client = pair
    response = _CoalescingSocket(ours)
    response.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    response.shutdown(socket.SHUT_RDWR)
    response.flush()  # what the worker does after every response: nothing left to send
    assert client.recv(100) == b""
