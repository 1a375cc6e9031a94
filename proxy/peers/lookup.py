"""Other nodes' proxies, asked for a blob before the upstream (`--peer`): in an elastic cluster a new
node then pulls from a neighbour's cache instead of every node fetching the same bytes upstream.

A peer request carries `X-Imagewarm-Peer` (see `imagewarm.protocol`): the peer answers from its cache
only, checking the forwarded client credentials as for any client. What a peer sends is teed into the
cache and verified against the digest like upstream bytes, so a faulty peer cannot plant content.
A peer that does not answer is skipped for `retry_after` seconds. A fill resuming a partial file asks
for the rest only (`Range`); peers answer ranges of cached blobs (206), and an answer of the whole
blob (200) is used as it is. The list of peers is read per miss
(`--peer` plus those `proxy.peers.discovery` finds), so it may change while the proxy runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import requests

from imagewarm import protocol
from imagewarm.reference import registry_segment
from proxy import metrics
from proxy.routes import Target
from proxy.upstream.auth import Credentials

log = logging.getLogger("imagewarm.proxy.peers")


class Peers:
    """`urls` gives the peer proxies to ask, in order; it is called once per miss."""

    def __init__(
        self,
        urls: Callable[[], Sequence[str]],
        connect_timeout: float = 1.0,
        read_timeout: float = 30.0,
        retry_after: float = 30.0,
    ) -> None:
        self.urls = urls
        self._timeouts = (connect_timeout, read_timeout)
        self._retry_after = retry_after
        self._session = requests.Session()
        self._session.trust_env = False  # peers are reached directly, never through HTTP(S)_PROXY
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def blob(
        self, target: Target, credentials: Credentials | None, start: int = 0
    ) -> tuple[str, requests.Response] | None:
        """(peer URL, streaming response) for the blob from the first peer that has it cached, or None.
        The response is a 200, or with `start` (`Range: bytes=START-`) possibly a 206 the caller checks."""
        if not self.urls():
            return None  # none known (yet): not a miss of any peer
        found = self._first("GET", target, credentials, start)
        if found is None:
            metrics.PEER_FETCHES.labels(result="miss").inc()
            return None
        metrics.PEER_FETCHES.labels(result="hit").inc()
        log.info("blob fetched from a peer", extra={"peer": found[0], "digest": target.reference})
        return found

    def head(self, target: Target, credentials: Credentials | None) -> requests.Response | None:
        """The 200 answer to a HEAD of the blob from the first peer that has it cached and accepts the
        client's credentials (as for any client of its cache), or None."""
        found = self._first("HEAD", target, credentials)
        return found[1] if found is not None else None

    def _first(
        self, method: str, target: Target, credentials: Credentials | None, start: int = 0
    ) -> tuple[str, requests.Response] | None:
        path = f"/v2/{registry_segment(target.registry)}/{target.repository}/blobs/{target.reference}"
        headers = {protocol.PEER_HEADER: "1"}
        if start:
            headers["Range"] = f"bytes={start}-"
        if credentials is not None:
            headers["Authorization"] = credentials.basic()
        for url in self.urls():
            with self._lock:
                if self._down_until.get(url, 0.0) > time.monotonic():
                    continue
            try:
                response = self._session.request(
                    method, url + path, headers=headers, stream=True, timeout=self._timeouts
                )
            except requests.RequestException as exc:
                with self._lock:
                    self._down_until[url] = time.monotonic() + self._retry_after
                metrics.PEER_FETCHES.labels(result="unreachable").inc()
                log.warning(
                    "peer proxy unreachable; skipping it for a while",
                    extra={"peer": url, "error": str(exc), "retry_after_seconds": self._retry_after},
                )
                continue
            if response.status_code == 200 or (start and response.status_code == 206):
                return url, response
            response.close()
        return None

    def failed(self, url: str) -> None:
        """A blob from the peer at `url` broke off or did not verify: do not ask it for a while, so a
        faulty peer cannot keep failing pulls that the upstream would serve."""
        with self._lock:
            self._down_until[url] = time.monotonic() + self._retry_after
        metrics.PEER_FETCHES.labels(result="failed").inc()
        log.warning(
            "a peer's blob transfer failed or did not verify; skipping that peer for a while",
            extra={"peer": url, "retry_after_seconds": self._retry_after},
        )
