"""A gunicorn worker with one thread per keep-alive connection.

gunicorn's `gthread` worker hands every request from its poller thread to a pool thread and back
(a future, a wake-up pipe, a re-registration with the poller): on a small request that machinery
costs more CPU than the request itself, and under load its thread handoffs make the latency tail.
Our clients hold a few long-lived connections (the API server to the webhook, the container runtime
to the node proxy), so a thread per connection that reads, answers and reads again is both simpler
and cheaper. Connections are bounded by `worker_connections`; idle ones close after `keepalive`
seconds, and a client that takes or sends nothing for `timeout` seconds within a request is dropped.

Use it with `worker_class="imagewarm.worker.ConnectionThreadWorker"`.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Any, cast

from gunicorn import sock as gunicorn_sock
from gunicorn.workers.base_async import AsyncWorker

# How often the main loop wakes to tell the arbiter it is alive and to check its parent.
HEARTBEAT = 1.0
# Workers race for each new connection, and one worker may win them all (seen: 8 of 8), leaving the
# others idle while its clients queue. A worker holding connections waits this long per connection
# (up to ACCEPT_DELAY_MAX) before it accepts, so a less loaded worker takes the connection first.
ACCEPT_DELAY = 0.005
ACCEPT_DELAY_MAX = 0.05
# ...but only while few connections wait. Deferring at most 20 accepts a second per worker, a burst
# filled the accept queue, and the kernel dropped what it had no room for: each such client retries
# its SYN after one second. With this many queued, every worker accepts all it can at once.
BALANCE_QUEUE_MAX = 16
# A held header block goes out in one piece with a body up to this size; copying a larger body to
# join them would cost more than the send it saves.
COALESCE_MAX = 64 * 1024


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting in `listener`'s accept queue (Linux: `tcpi_unacked` of a listening
    socket's TCP_INFO, what `ss` shows as Recv-Q); 0 where it cannot be read."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(info[24:28], sys.byteorder) if len(info) >= 28 else 0


class _IdleTimeout:
    """Around the wait for the next request: a keep-alive connection idle past its timeout is
    closed quietly (gunicorn treats StopIteration as "close the connection")."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is not None and issubclass(kind, TimeoutError):
            raise StopIteration("keep-alive connection idle") from None


class _CoalescingSocket:
    """The client socket as one response writes to it. gunicorn sends a response's header block and
    its body in two `sendall`s: over TLS two records and two sends, 3-5% of the CPU of a small
    webhook answer. Here the first `sendall` (the header block) is held and sent with the next one.
    `sendfile` (the proxy's blobs) sends what is held first and keeps its zero-copy path; `flush`
    sends a header block that no body followed. (An early hint, which neither program sends, would
    be held the same way and go out, still first, with the headers.)"""

    __slots__ = ("_held", "_socket", "_started")

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._held: bytes | None = None
        self._started = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)

    def sendall(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            self._held = bytes(data)
            return
        held, self._held = self._held, None
        if held is not None and len(data) <= COALESCE_MAX:
            self._socket.sendall(held + data)
            return
        if held is not None:
            self._socket.sendall(held)
        self._socket.sendall(data)

    def send(self, data: bytes) -> int:
        self.flush()
        return self._socket.send(data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        self.flush()
        return self._socket.sendfile(file, offset, count)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._socket.sendall(held)

    def shutdown(self, how: int) -> None:
        self._held = None  # gunicorn aborting a response it started: nothing more goes out
        self._socket.shutdown(how)

    def close(self) -> None:
        self._held = None
        self._socket.close()


class _Connection:
    __slots__ = ("busy", "socket")

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.busy = False


class ConnectionThreadWorker(AsyncWorker):  # type: ignore[misc]
    # On a graceful stop, how long an idle keep-alive connection may still take one more request
    # (answered with `Connection: close`, as every request is once the worker stops) before it is
    # closed. A client may be sending on it at the instant we close it, and a POST that fails that
    # way is not retried: for the webhook, a pod admitted unrewritten. 0: close idle ones at once.
    idle_drain_seconds = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        # Open connections by descriptor: the socket (TLS-wrapped once the handshake is done) and
        # whether it is serving a request now.
        self._connections: dict[int, _Connection] = {}
        self._idle = _IdleTimeout()

    @property
    def _idle_timeout(self) -> float:
        return float(self.cfg.keepalive or self.cfg.timeout)

    def timeout_ctx(self) -> _IdleTimeout:
        return self._idle

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for listener in self.sockets:
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ)
        while self.alive and self.ppid == os.getppid():
            self.notify()
            if len(self._connections) >= self.worker_connections:
                time.sleep(0.01)
                continue
            for key, _ in selector.select(HEARTBEAT):
                ready = cast(socket.socket, key.fileobj)
                if accept_queue_length(ready) > BALANCE_QUEUE_MAX:
                    self._accept_all(ready)
                    continue
                if self._connections:
                    time.sleep(min(len(self._connections) * ACCEPT_DELAY, ACCEPT_DELAY_MAX))
                accepted = self._accept(ready)
                if accepted is not None:
                    self._start(ready, *accepted)
        selector.close()
        self._drain()

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, Any] | None:
        try:
            return listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None  # another worker took it, or the client gave up

    def _accept_all(self, listener: socket.socket) -> None:
        """Empty the accept queue (up to the connection limit) before starting any thread: a thread
        start costs ten accepts, and a burst arrives faster than that."""
        room = self.worker_connections - len(self._connections)
        accepted: list[tuple[socket.socket, Any]] = []
        while len(accepted) < room and (pair := self._accept(listener)) is not None:
            accepted.append(pair)
        for client, address in accepted:
            self._start(listener, client, address)

    def _start(self, listener: socket.socket, client: socket.socket, address: Any) -> None:
        client.settimeout(self._idle_timeout)
        with self._lock:
            self._connections[client.fileno()] = _Connection(client)
        threading.Thread(target=self._serve, args=(listener, client, address), daemon=True).start()

    def _serve(self, listener: socket.socket, client: socket.socket, address: Any) -> None:
        fd = client.fileno()
        connection = client
        try:
            if self.cfg.is_ssl:
                connection = gunicorn_sock.ssl_wrap_socket(client, self.cfg)  # takes over the descriptor
                with self._lock:
                    self._connections[fd].socket = connection
            self.handle(listener, connection, address)  # closes the connection when done
        except OSError as exc:  # a failed TLS handshake: the client's problem, logged quietly
            self.log.debug("connection from %s failed: %s", address, exc)
            connection.close()
        finally:
            with self._lock:
                self._connections.pop(fd, None)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        connection = self._connections.get(sock.fileno())
        if connection is not None:
            connection.busy = True
        sock.settimeout(self.cfg.timeout)
        response_socket = _CoalescingSocket(sock)
        try:
            return bool(super().handle_request(listener_name, req, response_socket, addr))
        finally:
            with contextlib.suppress(OSError):  # closed when a response failed mid-way
                response_socket.flush()  # a response without body: its header block
                sock.settimeout(self._idle_timeout)
            if connection is not None:
                connection.busy = False

    def _drain(self) -> None:
        """Graceful stop: let requests in progress finish (up to `graceful_timeout`), give idle
        keep-alive connections `idle_drain_seconds` to take a last request, then close the rest so
        their threads end."""
        started = time.monotonic()
        deadline = started + self.cfg.graceful_timeout
        idle_deadline = min(deadline, started + self.idle_drain_seconds)
        while (now := time.monotonic()) < deadline:
            with self._lock:
                busy = any(connection.busy for connection in self._connections.values())
                left = len(self._connections)
            if not busy and (not left or now >= idle_deadline):
                break
            time.sleep(0.02)
        with self._lock:
            connections = [connection.socket for connection in self._connections.values()]
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
