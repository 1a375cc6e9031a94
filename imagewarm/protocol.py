"""What imagewarm's programs add to the registry protocol, defined once for the proxy and its clients.

`X-Imagewarm-Cache` on every manifest and blob answer of the proxy says where the bytes came from:
`hit` (its cache), `miss` (fetched upstream now, and cached), `joined` (another request's fetch in
progress), `stale` (a tag's last known digest, the upstream being unavailable), `uncached` (relayed
without caching: a range of a blob not cached, or a full cache disk). Operators see it with `curl -I`;
`imagewarm warm` counts what was already cached.

`X-Imagewarm-Peer: 1` marks a blob request from another node's proxy (`--peer`): it is answered from
the cache only (404 BLOB_UNKNOWN when the blob is not cached there), never fetched upstream or from
further peers, so peers cannot loop or fetch on each other's behalf. Access is checked as for any
client: the asking proxy forwards its client's credentials.
"""

from __future__ import annotations

CACHE_HEADER = "X-Imagewarm-Cache"
HIT = "hit"
MISS = "miss"
JOINED = "joined"
STALE = "stale"
UNCACHED = "uncached"

PEER_HEADER = "X-Imagewarm-Peer"
