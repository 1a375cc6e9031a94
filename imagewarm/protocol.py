"""What imagewarm's programs add to the registry protocol, defined once for the proxy and its clients.

`X-Imagewarm-Cache` on every manifest and blob answer of the proxy says where the bytes came from:
`hit` (its cache), `miss` (fetched upstream now, and cached), `joined` (another request's fetch in
progress), `stale` (a tag's last known digest, the upstream being unavailable), `uncached` (relayed
without caching: a range of a blob not cached, or a full cache disk). Operators see it with `curl -I`;
`imagewarm warm` counts what was already cached.
"""

from __future__ import annotations

CACHE_HEADER = "X-Imagewarm-Cache"
HIT = "hit"
MISS = "miss"
JOINED = "joined"
STALE = "stale"
UNCACHED = "uncached"
