"""`Kube` over real sockets against a scripted stand-in API server: JSON requests and their query,
typed errors, and watch streams however the events fall into HTTP chunks (the real API server:
tests/e2e)."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator

import pytest

from imagewarm.kube import AlreadyExists, Gone, Invalid, Kube, NotFound, Unavailable

Script = Callable[[str, bytes], bytes]  # (request line, body) -> the raw HTTP answer
HANG_UP = b"<hang up>"  # at the end of an answer: the server closes the connection after it


def _answer(status: int, body: object, *, reason: str = "OK") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _chunked(*chunks: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def served() -> Iterator[Callable[[Script], tuple[Kube, list[str]]]]:
    servers: list[_Server] = []

    def start(script: Script) -> tuple[Kube, list[str]]:
        seen: list[str] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:  # keep-alive: several requests per connection
                    line = self.rfile.readline().decode().strip()
                    if not line:
                        return
                    length = 0
                    while (header := self.rfile.readline().decode().strip()) != "":
                        name, _, value = header.partition(":")
                        if name.lower() == "content-length":
                            length = int(value)
                    body = self.rfile.read(length)
                    seen.append(line)
                    answer = script(line, body)
                    self.wfile.write(answer.removesuffix(HANG_UP))
                    self.wfile.flush()
                    if answer.endswith(HANG_UP):
                        return

        server = _Server(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return Kube(server=f"http://127.0.0.1:{server.server_address[1]}", timeout=5), seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_json_in_and_out_with_the_query_and_without_empty_parameters(
    served: Callable[[Script], tuple[Kube, list[str]]],
) -> None:
    bodies: list[bytes] = []

    def script(line: str, body: bytes) -> bytes:
        bodies.append(body)
        return _answer(200, {"echo": line})

    kube, seen = served(script)
    listed = kube.get("/api/v1/pods", limit=500, labelSelector="app=web", fieldSelector=None)
    assert listed == {"echo": "GET /api/v1/pods?limit=500&labelSelector=app%3Dweb HTTP/1.1"}
    kube.patch("/api/v1/namespaces/ns/pods/p", {"metadata": {"labels": {"a": "b"}}})
    assert seen[1].startswith("PATCH /api/v1/namespaces/ns/pods/p ")
    assert json.loads(bodies[1]) == {"metadata": {"labels": {"a": "b"}}}


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [(404, "NotFound", NotFound), (409, "AlreadyExists", AlreadyExists), (422, "Invalid", Invalid),
     (429, "TooManyRequests", Unavailable), (503, "ServiceUnavailable", Unavailable)],
)  # fmt: skip
def test_answers_become_typed_errors(
    served: Callable[[Script], tuple[Kube, list[str]]], status: int, reason: str, error: type[Exception]
) -> None:
    kube, _ = served(lambda line, body: _answer(status, {"reason": reason, "message": "m"}, reason=reason))
    with pytest.raises(error, match=f"{status} m"):
        kube.get("/api/v1/nodes/n")


def test_no_server_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="no answer"):
        Kube(server="http://127.0.0.1:1", timeout=2).get("/api/v1/nodes")


def _event(name: str, version: str, kind: str = "MODIFIED") -> bytes:
    return json.dumps(
        {"type": kind, "object": {"metadata": {"name": name, "resourceVersion": version}}}
    ).encode()


def test_watch_events_split_across_chunks_or_sharing_one(
    served: Callable[[Script], tuple[Kube, list[str]]],
) -> None:
    one, two, three = _event("a", "1"), _event("b", "2"), _event("c", "3")
    stream = _chunked(one[:10], one[10:] + b"\n" + two + b"\n", three + b"\n")
    kube, seen = served(lambda line, body: stream if "watch=true" in line else _answer(200, {"ok": 1}))
    events = list(kube.watch("/api/v1/nodes", "7", timeout_seconds=5))
    assert [e["object"]["metadata"]["name"] for e in events] == ["a", "b", "c"]
    assert "resourceVersion=7" in seen[0] and "allowWatchBookmarks=true" in seen[0]
    assert kube.get("/api/v1/nodes") == {"ok": 1}  # the finished watch's connection is fine to reuse


def test_a_watch_left_mid_stream_does_not_hand_its_connection_to_the_next_request(
    served: Callable[[Script], tuple[Kube, list[str]]],
) -> None:
    stream = _chunked(_event("a", "1") + b"\n", _event("b", "2") + b"\n", _event("c", "3") + b"\n")
    kube, _ = served(lambda line, body: stream if "watch=true" in line else _answer(200, {"ok": 1}))
    watch = kube.watch("/api/v1/nodes", "7", timeout_seconds=5)
    assert next(watch)["object"]["metadata"]["name"] == "a"
    watch.close()  # the informer stopping: events b and c are still unread on that connection
    assert kube.get("/api/v1/nodes") == {"ok": 1}


def test_an_error_event_is_raised_as_its_typed_error(
    served: Callable[[Script], tuple[Kube, list[str]]],
) -> None:
    expired = json.dumps(
        {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}
    )
    invalid = json.dumps({"type": "ERROR", "object": {"code": 422, "reason": "Invalid", "message": "bad"}})
    answers = iter(
        [_chunked(_event("a", "1") + b"\n" + expired.encode() + b"\n"), _chunked(invalid.encode())]
    )
    kube, _ = served(lambda line, body: next(answers))
    watch = kube.watch("/api/v1/nodes", "7")
    assert next(watch)["type"] == "MODIFIED"
    with pytest.raises(Gone, match="too old"):
        next(watch)
    with pytest.raises(Invalid, match="bad"):  # an ERROR event, not a broken stream
        list(kube.watch("/api/v1/nodes", "7"))


def test_a_stream_cut_mid_event_is_unavailable(served: Callable[[Script], tuple[Kube, list[str]]]) -> None:
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + _event("a", "1")[:20] + HANG_UP
    kube, _ = served(lambda line, body: cut)
    with pytest.raises(Unavailable, match="watch interrupted"):
        list(kube.watch("/api/v1/nodes", "7", timeout_seconds=1))


def test_a_server_url_with_a_path_keeps_it_in_front_of_every_request(
    served: Callable[[Script], tuple[Kube, list[str]]],
) -> None:
    kube, seen = served(lambda line, body: _answer(200, {"ok": 1}))
    behind = Kube(server=f"{kube.server}/k8s/clusters/c-1/", timeout=5)
    assert behind.get("/api/v1/nodes", limit=1) == {"ok": 1}
    assert seen == ["GET /k8s/clusters/c-1/api/v1/nodes?limit=1 HTTP/1.1"]
