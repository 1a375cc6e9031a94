"""`imagewarm status`: the cluster's cache at a glance, read from the API server and the proxies.

Four tables on stdout: the CachedImages (image, phase, digest, size, nodes holding it, pods using
it, expiry), the ImagePullJobs still in progress, a per-node summary of the NodeImage tasks, and the
node proxies' hit ratio from their `/metrics` (bytes served from the cache over all bytes served:
`imagewarm_proxy_cache_hit_bytes_total` and `imagewarm_proxy_cache_miss_bytes_total`). Proxies
come from `--proxy URL`, else from the Nodes' InternalIP and `--proxy-port` (a proxy that does not
answer is listed as unreachable, never an error). Exit 0; 2 when the cluster cannot be read (no
kubeconfig, CRDs not installed, RBAC), with what to do.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagewarm import api
from imagewarm.command import Command, table
from imagewarm.config import parse_positive_int, setting
from imagewarm.reference import InvalidReference, parse
from imagewarm.warmcommand import parse_proxy_url
from imagewarm.warmjob import CRDS_MISSING

DEFAULT_PROXY_PORT = 7439
MAX_DISCOVERED_PROXIES = 20  # asked when no --proxy is given; more nodes are summed up, not asked
HIT_METRIC = "imagewarm_proxy_cache_hit_bytes"
MISS_METRIC = "imagewarm_proxy_cache_miss_bytes"


@dataclass(frozen=True)
class StatusConfig:
    kubeconfig: str = setting(
        "", help="kubeconfig to read the cluster with; empty: in-cluster, $KUBECONFIG or ~/.kube/config",
        metavar="PATH",
    )  # fmt: skip
    proxy: tuple[str, ...] = setting(
        help="a node proxy's URL to read the hit ratio from; without it the Nodes' addresses are asked",
        parse=parse_proxy_url,
        repeated=True,
        metavar="URL",
    )
    proxy_port: int = setting(
        DEFAULT_PROXY_PORT, help="the node proxies' port on the Nodes' addresses", parse=parse_positive_int
    )


# --- rendering (pure) ----------------------------------------------------------------------------


def short_digest(digest: object) -> str:
    """`sha256:0123456789ab` (12 hex digits), `-` when unknown."""
    if not isinstance(digest, str) or ":" not in digest:
        return "-"
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}"


def human_size(size: object) -> str:
    if not isinstance(size, int) or isinstance(size, bool):
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _familiar(image: object) -> str:
    try:
        return parse(str(image)).familiar
    except InvalidReference:
        return str(image)


def _listed(names: Sequence[str], limit: int = 3) -> str:
    if not names:
        return "-"
    shown = ",".join(names[:limit])
    return f"{len(names)}: {shown}" + (",…" if len(names) > limit else "")


def cached_image_rows(items: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for item in sorted(items, key=lambda i: str((i.get("spec") or {}).get("sourceImage"))):
        spec, status = item.get("spec") or {}, item.get("status") or {}
        used = status.get("usedBy") or {}
        expires = "never (retain)" if spec.get("retain") else spec.get("expiresAt") or "-"
        rows.append(
            (
                _familiar(spec.get("sourceImage")),
                str(status.get("phase") or "-"),
                short_digest(status.get("digest")),
                human_size(status.get("size")),
                _listed(list(status.get("nodes") or [])),
                str(used.get("count", 0)),
                str(expires),
            )
        )
    return rows


def job_rows(jobs: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """ImagePullJobs without a completionTime, as (namespace/name, image, succeeded/desired, ...)."""
    rows = []
    for job in jobs:
        status = job.get("status") or {}
        if status.get("completionTime"):
            continue
        metadata = job.get("metadata") or {}
        rows.append(
            (
                f"{metadata.get('namespace')}/{metadata.get('name')}",
                _familiar((job.get("spec") or {}).get("image")),
                f"{status.get('succeeded', 0)}/{status.get('desired', 0)}",
                str(status.get("active", 0)),
                str(status.get("failed", 0)),
            )
        )
    return sorted(rows)


def node_rows(nodeimages: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """Per node: its tasks in spec, and how many the agent reports in each phase."""
    rows = []
    for nodeimage in nodeimages:
        name = str((nodeimage.get("metadata") or {}).get("name"))
        tasks = sum(
            len(e.get("tags") or []) for e in ((nodeimage.get("spec") or {}).get("images") or {}).values()
        )
        phases = {"Waiting": 0, "Pulling": 0, "Succeeded": 0, "Failed": 0}
        statuses = ((nodeimage.get("status") or {}).get("imageStatuses") or {}).values()
        for entry in statuses:
            for tag in entry.get("tags") or []:
                if tag.get("phase") in phases:
                    phases[tag["phase"]] += 1
        rows.append(
            (name, str(tasks), *(str(phases[p]) for p in ("Succeeded", "Pulling", "Waiting", "Failed")))
        )
    return sorted(rows)


@dataclass(frozen=True)
class ProxyReading:
    """A node proxy's cache counters, or why they could not be read."""

    url: str
    hit_bytes: float = 0.0
    miss_bytes: float = 0.0
    error: str = ""

    @property
    def hit_ratio(self) -> float | None:
        served = self.hit_bytes + self.miss_bytes
        return self.hit_bytes / served if served else None


def read_metrics(url: str, text: str) -> ProxyReading:
    """The hit and miss byte counters (all kinds summed) of a proxy's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {HIT_METRIC: 0.0, MISS_METRIC: 0.0}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    except ValueError as exc:
        return ProxyReading(url, error=f"its /metrics is not Prometheus text ({exc})")
    return ProxyReading(url, totals[HIT_METRIC], totals[MISS_METRIC])


def proxy_rows(readings: Iterable[ProxyReading]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for reading in readings:
        if reading.error:
            rows.append((reading.url, "-", "-", reading.error))
            continue
        ratio = reading.hit_ratio
        rows.append(
            (
                reading.url,
                human_size(int(reading.hit_bytes)),
                human_size(int(reading.miss_bytes)),
                "no bytes served yet" if ratio is None else f"{ratio:.1%}",
            )
        )
    return rows


def render(
    cached_images: Sequence[Mapping[str, Any]],
    jobs: Sequence[Mapping[str, Any]],
    nodeimages: Sequence[Mapping[str, Any]],
    readings: Sequence[ProxyReading],
    note: str = "",
) -> str:
    """The whole report, one table per part (a part with nothing to show says so)."""
    parts = []

    def part(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
        parts.append(table(title, header, rows) if rows else f"{title}\n{empty}")

    part(
        "cached images",
        ("image", "phase", "digest", "size", "nodes", "used-by", "expires"),
        cached_image_rows(cached_images),
        "(none: no pod uses an image yet, or the controller is not running)",
    )
    part(
        "pull jobs in progress",
        ("job", "image", "succeeded", "active", "failed"),
        job_rows(jobs),
        "(none)",
    )
    part(
        "nodes",
        ("node", "tasks", "succeeded", "pulling", "waiting", "failed"),
        node_rows(nodeimages),
        "(no NodeImage: the controller makes one per Node)",
    )
    hits = sum(r.hit_bytes for r in readings if not r.error)
    misses = sum(r.miss_bytes for r in readings if not r.error)
    total = ProxyReading("all answering proxies", hits, misses)
    rows = proxy_rows(readings)
    if sum(1 for r in readings if not r.error) > 1:
        rows += proxy_rows([total])
    part("proxies", ("proxy", "from cache", "from upstream", "hit ratio"), rows, "(no proxy to ask)")
    text = "\n\n".join(parts)
    return f"{text}\n{note}" if note else text


# --- reading the cluster ---------------------------------------------------------------------------


class StatusError(RuntimeError):
    """The cluster cannot be read; the message says what to do."""


def _list(client: Any, resource: api.Resource) -> list[dict[str, Any]]:
    from imagewarm import kube

    try:
        # Temporary answers (a 429 while a CRD's storage initializes, a 5xx) are retried.
        items: list[dict[str, Any]] = kube.retry(lambda: client.get(resource.path())).get("items") or []
    except kube.NotFound:
        raise StatusError(CRDS_MISSING) from None
    except kube.Forbidden as exc:
        raise StatusError(
            f"cannot list {resource.plural}: {exc} (needs `list` on {resource.crd_name})"
        ) from None
    except kube.KubeError as exc:
        raise StatusError(f"cannot list {resource.plural}: {exc}") from None
    return items


def _node_proxies(client: Any, port: int) -> tuple[list[str], str]:
    """The proxy URLs of the Nodes' InternalIPs (at most MAX_DISCOVERED_PROXIES) and a note."""
    from imagewarm import kube

    try:
        nodes = client.get("/api/v1/nodes").get("items") or []
    except kube.KubeError as exc:
        return [], f"node proxies not asked: cannot list Nodes ({exc}); pass --proxy URL"
    urls = []
    for node in nodes:
        for address in (node.get("status") or {}).get("addresses") or []:
            if address.get("type") == "InternalIP":
                host = address["address"]
                urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
                break
    note = ""
    if len(urls) > MAX_DISCOVERED_PROXIES:
        note = f"({MAX_DISCOVERED_PROXIES} of {len(urls)} node proxies asked; pass --proxy URL for others)"
    return urls[:MAX_DISCOVERED_PROXIES], note


def _read_proxy(url: str) -> ProxyReading:
    import requests

    try:
        response = requests.get(f"{url}/metrics", timeout=3)
    except requests.RequestException as exc:
        return ProxyReading(url, error=f"unreachable ({type(exc).__name__})")
    if response.status_code != 200:
        return ProxyReading(url, error=f"unreachable (/metrics answered {response.status_code})")
    return read_metrics(url, response.text)


def read_proxies(urls: Sequence[str]) -> list[ProxyReading]:
    if not urls:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(16, len(urls))) as pool:
        return list(pool.map(_read_proxy, urls))


def run(config: StatusConfig) -> int:
    from imagewarm import kube

    try:
        client = kube.Kube.load(config.kubeconfig or None)
        cached_images = _list(client, api.CACHED_IMAGE)
        jobs = _list(client, api.IMAGE_PULL_JOB)
        nodeimages = _list(client, api.NODE_IMAGE)
    except kube.ConfigurationError as exc:
        print(f"imagewarm status: {exc}", file=sys.stderr)
        return 2
    except StatusError as exc:
        print(f"imagewarm status: {exc}", file=sys.stderr)
        return 2
    urls, note = (list(config.proxy), "") if config.proxy else _node_proxies(client, config.proxy_port)
    print(render(cached_images, jobs, nodeimages, read_proxies(urls), note), flush=True)
    return 0


command = Command(
    help="show the cluster's cache: images, the nodes holding them, sizes, jobs, hit ratio",
    config=StatusConfig,
    run=run,
    description="Print the CachedImages (image, digest, size, nodes holding it, pods using it, expiry), "
    "the ImagePullJobs in progress, a per-node summary of the NodeImage tasks, and the node proxies' "
    "cache hit ratio from their metrics. Exit 2 when the cluster cannot be read.",
)
