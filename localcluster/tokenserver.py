"""A small bearer-token server, so a real ``docker-registry`` can run with ``auth.token``.

distribution only *verifies* tokens (registry/auth/token): a JWT whose header carries an ``x5c``
chain ending in a certificate of its ``rootcertbundle``, whose ``iss`` is its ``issuer``, whose
``aud`` is its ``service``, inside ``nbf``..``exp``, granting the request's ``access`` claims. This
server issues such tokens (ES256, signed by a leaf certificate of its own CA) at
``GET /token?service=...&scope=repository:NAME:pull,push`` as the token spec describes:

- Basic credentials of a known user: every requested action on any repository;
- wrong credentials: 401;
- anonymous: ``pull`` only on repositories under a public prefix (``public/`` by default);
  other scopes are granted nothing (the registry then refuses the token, as real services do).

It runs on a thread of the calling process and counts what it issues, so tests can assert that a
client caches tokens instead of asking for one per request.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import json
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from imagewarm import certs

DEFAULT_LIFETIME = 300  # seconds; the spec's minimum is 60
TOKEN_PATH = "/token"


def _b64url(data: bytes) -> str:
    """JOSE base64url: URL alphabet, no padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Access:
    """One resource's granted actions, as in a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class Scope:
    """A requested scope ``type:name:action,action`` (the name may itself contain colons)."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Raises ValueError unless ``text`` has a type, a name and actions."""
        kind, _, rest = text.partition(":")
        name, sep, actions = rest.rpartition(":")
        if not kind or not sep or not name:
            raise ValueError(f"scope {text!r} is not TYPE:NAME:ACTIONS (e.g. repository:library/app:pull)")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))


class TokenSigner:
    """Signs JWTs with an EC P-256 leaf certificate issued by its own CA (``ca_pem`` goes in the
    registry's ``rootcertbundle``)."""

    def __init__(self, common_name: str = "imagewarm-test-token-signer") -> None:
        self.ca = certs.new_ca(f"{common_name} CA")
        self.leaf = certs.issue(self.ca, common_name)
        key = serialization.load_pem_private_key(self.leaf.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("imagewarm.certs issued a non-EC key; ES256 needs P-256")
        self._key = key
        leaf_der = self.leaf.certificate.public_bytes(serialization.Encoding.DER)
        # x5c is standard base64 (not base64url) DER, leaf first (RFC 7515 4.1.6).
        self._x5c = [base64.b64encode(leaf_der).decode()]

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS (``header.claims.signature``), ES256: the raw 64-byte r||s signature."""
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def leaf_certificate(token: str) -> x509.Certificate:
    """The certificate in a token's ``x5c`` header (for tests that inspect what was issued)."""
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))


def token_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a compact JWT."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


class TokenServer:
    """An HTTP token service on ``127.0.0.1:port`` (a free port unless given), served by a thread.

    ``users`` maps usernames to passwords; ``public_prefixes`` name the repositories anonymous
    clients may pull. ``issued`` counts tokens handed out, ``refused`` requests answered 401, and
    ``issued_by_scope`` tokens per (account, scope string) ("" for anonymous). While ``failing`` is
    set, every token request is answered 503 and counted in ``failed`` (a broken token service whose
    port still answers: `stop` leaves kept-alive connections served).
    """

    def __init__(
        self,
        *,
        service: str,
        users: Mapping[str, str],
        issuer: str = "imagewarm-test-token-server",
        public_prefixes: Sequence[str] = ("public/",),
        lifetime: int = DEFAULT_LIFETIME,
        port: int = 0,
        signer: TokenSigner | None = None,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.users = dict(users)
        self.public_prefixes = tuple(public_prefixes)
        self.lifetime = lifetime
        self.signer = signer or TokenSigner()
        self.port = port
        self.issued = 0
        self.refused = 0
        self.failing = False
        self.failed = 0
        self.issued_by_scope: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        """The URL registries name in their ``Bearer realm=...`` challenge."""
        return f"http://127.0.0.1:{self.port}{TOKEN_PATH}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def write_root_bundle(self, path: Path) -> Path:
        """Write the CA certificate the registry's ``rootcertbundle`` must name."""
        path.write_bytes(self.signer.ca_pem)
        return path

    def start(self) -> TokenServer:
        """Listen (on the same port as before after a stop) and serve on a daemon thread. Idempotent."""
        if self.running:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"token-server:{self.port}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        self._thread = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- policy and issuing ----------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str | None:
        """The account named by Basic credentials; "" when anonymous. None when they are wrong."""
        if not authorization:
            return ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            username, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.users.get(username)
        if not sep or expected is None or not secrets.compare_digest(expected, password):
            return None
        return username

    def grant(self, account: str, scope: Scope) -> Access:
        """What ``account`` ("" = anonymous) gets of ``scope``: possibly no actions at all."""
        if scope.type != "repository":
            return Access(scope.type, scope.name, ())
        if account:
            allowed: tuple[str, ...] = ("pull", "push", "delete", "*")
        elif scope.name.startswith(self.public_prefixes):
            allowed = ("pull",)
        else:
            allowed = ()
        return Access(scope.type, scope.name, tuple(a for a in scope.actions if a in allowed))

    def issue(self, account: str, scopes: Sequence[Scope]) -> dict[str, Any]:
        """The token response body for ``account`` asking for ``scopes``."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": [self.grant(account, scope).claim() for scope in scopes],
        }
        token = self.signer.sign(claims)
        with self._lock:
            self.issued += 1
            for scope in scopes:
                self.issued_by_scope[(account, f"{scope.type}:{scope.name}:{','.join(scope.actions)}")] += 1
        issued_at = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.lifetime, "issued_at": issued_at}

    def record_refusal(self) -> None:
        with self._lock:
            self.refused += 1

    def record_failure(self) -> None:
        with self._lock:
            self.failed += 1


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != TOKEN_PATH:
                return self._reply(HTTPStatus.NOT_FOUND, {"details": f"the token endpoint is {TOKEN_PATH}"})
            if server.failing:
                server.record_failure()
                return self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"details": "token service failing"})
            query = parse_qs(url.query)
            service = query.get("service", [""])[0]
            if service and service != server.service:
                return self._reply(
                    HTTPStatus.BAD_REQUEST,
                    {"details": f"this server issues tokens for service {server.service!r}, not {service!r}"},
                )
            account = server.authenticate(self.headers.get("Authorization"))
            if account is None:
                server.record_refusal()
                return self._reply(
                    HTTPStatus.UNAUTHORIZED,
                    {"details": "wrong username or password"},
                    {"WWW-Authenticate": 'Basic realm="imagewarm-test-token-server"'},
                )
            try:
                # Several scopes come as repeated parameters or space-separated in one.
                scopes = [Scope.parse(s) for value in query.get("scope", []) for s in value.split()]
            except ValueError as exc:
                return self._reply(HTTPStatus.BAD_REQUEST, {"details": str(exc)})
            self._reply(HTTPStatus.OK, server.issue(account, scopes))

        def _reply(
            self, status: HTTPStatus, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the counters are the record; stderr would clutter test output

    return Handler
