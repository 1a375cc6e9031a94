"""A slow network link in front of a local server: a TCP relay on loopback that forwards to
`target` and sends the answers back at most `bytes_per_second` per connection, as if the server sat
across a slow link (no root, no traffic shaping of anyone else's loopback traffic)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from localcluster.processes import free_ports

_CHUNK = 64 << 10


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
        self.bytes_down = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        threading.Thread(target=self._accept, name="slowlink", daemon=True).start()
        return self

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
            threading.Thread(target=self._pipe, args=(client, server, 0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.bytes_per_second), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: int) -> None:
        started, sent = time.monotonic(), 0
        try:
            while chunk := source.recv(_CHUNK):
                sink.sendall(chunk)
                sent += len(chunk)
                if rate:  # the target-to-client direction
                    with self._lock:
                        self.bytes_down += len(chunk)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)
