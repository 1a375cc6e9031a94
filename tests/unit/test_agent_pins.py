"""The agent's pins on a real on-disk store: an owner's blobs are pinned, re-pinned to a new set,
unpinned; eviction keeps pinned blobs."""

from __future__ import annotations

from pathlib import Path

from imagewarm.digest import Digest
from proxy.agent.pins import Pins
from proxy.cache.eviction import Evictor
from proxy.cache.store import BlobStore


def put(store: BlobStore, data: bytes) -> str:
    digest = Digest.of(data)
    store.put_bytes(digest, data)
    return str(digest)


def test_pins_follow_the_owners_blobs_and_spare_them_from_eviction(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "cache")
    pins = Pins(store, tmp_path / "cache" / "agent" / "pins")
    a, b, c = (put(store, bytes([n]) * 1000) for n in range(3))
    pins.pin("nodeimage/nginx:1.27", [a, b])
    pins.pin("nodeimage/redis:7", [b])
    assert pins.owners() == {"nodeimage/nginx:1.27", "nodeimage/redis:7"}
    assert store.pins(Digest.parse(b)) == {"nodeimage/nginx:1.27", "nodeimage/redis:7"}

    Evictor(store, max_bytes=1000, high=0.5, low=0.1).run_once()
    assert store.has(Digest.parse(a)) and store.has(Digest.parse(b)) and not store.has(Digest.parse(c))

    pins.pin("nodeimage/nginx:1.27", [b])  # re-pulled: now resolves to other blobs
    assert not store.is_pinned(Digest.parse(a)) and pins.pinned("nodeimage/nginx:1.27") == {b}
    assert pins.unpin("nodeimage/redis:7") == 1
    assert store.pins(Digest.parse(b)) == {"nodeimage/nginx:1.27"}
    assert pins.owners() == {"nodeimage/nginx:1.27"}
    assert Pins(store, tmp_path / "cache" / "agent" / "pins").pinned("nodeimage/nginx:1.27") == {b}
