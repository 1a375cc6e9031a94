"""`Kube` reads the proxy variables once, when it is made, and honours them as requests did on
every request: through HTTP(S)_PROXY unless NO_PROXY names the API server. Real sockets: a
stand-in API server and a forward proxy that answers for it, each recording what reached it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagewarm.kube import Kube


class _Recording(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        type(self).seen.append(self.path)  # a proxy gets the absolute URL, a server the path
        body = json.dumps({"kind": "NodeList", "items": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve() -> tuple[ThreadingHTTPServer, list[str]]:
    seen: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Recording,), {"seen": seen}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def servers() -> Iterator[tuple[str, list[str], str, list[str]]]:
    api, api_seen = _serve()
    proxy, proxy_seen = _serve()
    yield (
        f"http://127.0.0.1:{api.server_port}",
        api_seen,
        f"http://127.0.0.1:{proxy.server_port}",
        proxy_seen,
    )
    api.shutdown()
    proxy.shutdown()


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_requests_go_through_the_proxy_the_environment_names(
    servers: tuple[str, list[str], str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, api_seen, proxy, proxy_seen = servers
    _clear(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    kube = Kube(server=api)
    monkeypatch.delenv("HTTP_PROXY")  # read once, when made: later changes do not matter
    assert kube.get("/api/v1/nodes")["kind"] == "NodeList"
    assert proxy_seen == [f"{api}/api/v1/nodes"] and api_seen == []


def test_no_proxy_naming_the_server_goes_direct(
    servers: tuple[str, list[str], str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, api_seen, proxy, proxy_seen = servers
    _clear(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    kube = Kube(server=api)
    assert kube.get("/api/v1/nodes")["kind"] == "NodeList"
    assert api_seen == ["/api/v1/nodes"] and proxy_seen == []


def test_the_ca_bundle_variable_applies_when_no_ca_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    assert Kube(server="https://example.invalid").verify == "/etc/ssl/certs/ca-certificates.crt"
    assert Kube(server="https://example.invalid", verify="/ca.crt").verify == "/ca.crt"
    assert Kube(server="https://example.invalid", verify=False).verify is False
