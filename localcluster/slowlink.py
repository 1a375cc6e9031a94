"""A slow network link in front of a local server: a TCP relay on loopback that forwards to
`target` and sends the answers back at most `bytes_per_second` per connection, as if the server sat
across a slow link (no root, no traffic shaping of anyone else's loopback traffic). It can also
break a connection at a chosen byte (`cut_after`), as a flaky network or a middlebox does."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from localcluster.processes import free_ports

_CHUNK = 64 << 10

# How `cut_after` breaks the connection: a TCP reset, a clean close (the body ends short of its
# Content-Length), or a stall (the connection stays open and nothing more arrives).
Cut = Literal["reset", "close", "stall"]


@dataclass
class _Connection:
    client: socket.socket
    server: socket.socket
    cut: bool = False  # the downstream relay broke it on purpose: the other side must not close it
    done: threading.Event = field(default_factory=threading.Event)


class SlowLink:
    """`SlowLink(target_host, target_port, bytes_per_second).start()`; clients connect to `host`.
    `bytes_down` counts what crossed the link from the target to its clients (headers included)."""

    def __init__(self, target_host: str, target_port: int, bytes_per_second: int) -> None:
        self.target = (target_host, target_port)
        self.bytes_per_second = bytes_per_second
        self.port = free_ports(1)[0]
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut: tuple[int, Cut] | None = None
        self.bytes_down = 0
        self.cuts = 0  # connections broken by `cut_after` so far

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        threading.Thread(target=self._accept, name="slowlink", daemon=True).start()
        return self

    def cut_after(self, nbytes: int, how: Cut = "reset") -> None:
        """Break the connection that carries the link's next `nbytes` bytes down, right after them,
        once (the connections after it cross whole). The bytes are counted from now, whichever
        connection carries them."""
        with self._lock:
            self._cut = (self.bytes_down + nbytes, how)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for each in self._sockets:
                with contextlib.suppress(OSError):
                    each.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            connection = _Connection(client, server)
            threading.Thread(target=self._up, args=(connection,), daemon=True).start()
            threading.Thread(target=self._down, args=(connection,), daemon=True).start()

    def _up(self, connection: _Connection) -> None:
        """Client to target, unthrottled."""
        try:
            while chunk := connection.client.recv(_CHUNK):
                connection.server.sendall(chunk)
        except OSError:
            pass
        finally:
            if not connection.cut:
                _shut(connection.client, connection.server)
            connection.done.set()

    def _down(self, connection: _Connection) -> None:
        """Target to client, throttled, counted, and cut where `cut_after` says."""
        started, sent = time.monotonic(), 0
        try:
            while chunk := connection.server.recv(_CHUNK):
                with self._lock:
                    cut = self._cut
                    if cut is not None and self.bytes_down + len(chunk) >= cut[0]:
                        chunk = chunk[: cut[0] - self.bytes_down]
                        self._cut = None
                        self.cuts += 1
                    else:
                        cut = None
                    self.bytes_down += len(chunk)
                connection.client.sendall(chunk)
                if cut is not None:
                    self._break(connection, cut[1])
                    return
                sent += len(chunk)
                if self.bytes_per_second:  # 0: not throttled
                    ahead = sent / self.bytes_per_second - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            if not connection.cut:
                _shut(connection.server, connection.client)

    def _break(self, connection: _Connection, how: Cut) -> None:
        if how == "close":
            return  # `_down`'s end closes both sides cleanly: a FIN
        if how == "stall":
            # The target's further bytes are swallowed (uncounted) until the client gives up and closes.
            with contextlib.suppress(OSError):
                while connection.server.recv(_CHUNK):
                    pass
            return
        connection.cut = True
        # A close with a zero linger sends a reset. The upstream relay may be blocked reading the client
        # socket (which holds it open): wake it first with a read shutdown (it sends nothing).
        connection.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            connection.client.shutdown(socket.SHUT_RD)
        connection.done.wait(5)
        connection.client.close()
        _shut(connection.server)


def _shut(*sockets: socket.socket) -> None:
    for each in sockets:
        with contextlib.suppress(OSError):
            each.shutdown(socket.SHUT_RDWR)
