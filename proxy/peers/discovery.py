"""Peer discovery (`--peers-from NAMESPACE/SERVICE`): the other nodes' proxies, read from the Service's
EndpointSlices through a watch-backed cache, so a DaemonSet's peers need not be known in advance.

`peer_urls` is the pure rule (slices in, URLs out). `PeerDiscovery` keeps the current set: built in the
gunicorn master (the kubeconfig is checked there, at start), its informer thread started in each worker
after the fork (threads do not survive a fork). Until the first list there are no discovered peers, and
misses simply go upstream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from imagewarm.informer import Informer
from imagewarm.kube import Kube
from proxy import metrics

log = logging.getLogger("imagewarm.proxy.discovery")

PORT_NAME = "proxy"  # the Service port peers are reached on, when the Service names its ports


def _port(slice_: dict[str, Any]) -> int | None:
    ports = [port for port in slice_.get("ports") or [] if port.get("port")]
    named = [port for port in ports if port.get("name") == PORT_NAME]
    chosen = named or ports
    return int(chosen[0]["port"]) if chosen else None


def _url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def peer_urls(
    slices: Iterable[dict[str, Any]], own_node: str = "", own_address: tuple[str, int] | None = None
) -> tuple[str, ...]:
    """The peer proxy URLs (`http://ADDRESS:PORT`, IPv6 in brackets), sorted and without duplicates, of
    the ready endpoints (`conditions.ready` not false) in `slices`, on the port named `proxy` or else the
    slice's first port. This proxy itself is left out: endpoints on `own_node` (when given) and the
    address:port it listens on (`own_address`)."""
    own = (own_address[0].lower(), own_address[1]) if own_address else None
    urls: set[str] = set()
    for slice_ in slices:
        port = _port(slice_)
        if port is None:
            continue
        for endpoint in slice_.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            if own_node and endpoint.get("nodeName") == own_node:
                continue
            for address in endpoint.get("addresses") or []:
                if own is not None and (address.lower(), port) == own:
                    continue
                urls.add(_url(address, port))
    return tuple(sorted(urls))


def slices_path(namespace: str) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


class PeerDiscovery:
    """The discovered peer URLs of one Service, kept current by an EndpointSlice informer once `start`ed.
    `static` (the `--peer` list) only counts toward the `imagewarm_proxy_peers` gauge."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        service: str,
        *,
        own_node: str = "",
        own_address: tuple[str, int] | None = None,
        static: tuple[str, ...] = (),
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.service = service
        self.own_node = own_node
        self.own_address = own_address
        self.static = static
        self.informer: Informer | None = None
        # Called (on the informer's thread) with the new set whenever it changes.
        self.on_change: Callable[[tuple[str, ...]], None] | None = None
        self._urls: tuple[str, ...] = ()
        self._announced = False  # the first set is announced even when empty
        self._lock = threading.Lock()

    def urls(self) -> tuple[str, ...]:
        """The peers discovered now (empty before the first list)."""
        return self._urls

    def start(self) -> PeerDiscovery:
        """Start watching (call in the process that will use it: after gunicorn forks)."""
        metrics.PEERS.set(len(self.static))
        self.informer = Informer(
            self.kube,
            slices_path(self.namespace),
            name=f"endpointslices {self.namespace}/{self.service}",
            label_selector=f"kubernetes.io/service-name={self.service}",
            handlers=(self._changed,),
        )
        self.informer.start()
        return self

    def stop(self) -> None:
        if self.informer is not None:
            self.informer.stop()

    def _changed(self, _kind: str, _slice: dict[str, Any]) -> None:
        assert self.informer is not None
        urls = peer_urls(self.informer.items(), self.own_node, self.own_address)
        with self._lock:  # handlers run on the informer's one thread; the lock keeps the log in order
            if urls == self._urls and self._announced:
                return
            added = sorted(set(urls) - set(self._urls))
            removed = sorted(set(self._urls) - set(urls))
            self._urls = urls
            self._announced = True
        metrics.PEERS.set(len(set(self.static) | set(urls)))
        log.info(
            "discovered peer set changed",
            extra={
                "service": f"{self.namespace}/{self.service}",
                "peers": list(urls),
                "added": added,
                "removed": removed,
            },
        )
        if self.on_change is not None:
            self.on_change(urls)
