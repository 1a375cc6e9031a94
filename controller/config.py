"""The controller's settings: one frozen value, from flags then `IMAGEWARM_*` variables."""

from __future__ import annotations

from dataclasses import dataclass

from imagewarm.config import parse_bool, parse_duration, parse_host_port, parse_positive_int, setting
from imagewarm.kube import SERVICE_ACCOUNT_DIR

FALLBACK_NAMESPACE = "imagewarm-system"


def pod_namespace() -> str:
    """The namespace this pod runs in (its service account's namespace file), else the chart's
    default namespace."""
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or FALLBACK_NAMESPACE
    except OSError:
        return FALLBACK_NAMESPACE


def _namespace(text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class ControllerConfig:
    kubeconfig: str = setting("", help="kubeconfig path; empty: in-cluster config", metavar="PATH")
    leader_elect: bool = setting(
        False, help="run only while holding the imagewarm-controller Lease (for several replicas)",
        parse=parse_bool,
    )  # fmt: skip
    leader_election_namespace: str = setting(
        "", help="namespace of the leader Lease; empty: the pod's namespace, else imagewarm-system",
        parse=_namespace, metavar="NS",
    )  # fmt: skip
    namespace: str = setting(
        "", help="the release namespace, where pull-secret copies and SidecarSet pre-pull jobs live; "
        "empty: the pod's namespace, else imagewarm-system", parse=_namespace, metavar="NS",
    )  # fmt: skip
    unused_image_ttl: float = setting(
        720 * 3600.0, help="how long an image no pod uses keeps its CachedImage", parse=parse_duration
    )
    repull_period: float = setting(
        86400.0,
        help="how often a completionPolicy Never job pulls again on each node (with +-10%% jitter)",
        parse=parse_duration,
    )
    metrics_listen: tuple[str, int] = setting(
        ("0.0.0.0", 8080), help="address serving /metrics, /healthz and /readyz", parse=parse_host_port,
        metavar="HOST:PORT",
    )  # fmt: skip
    workers: int = setting(2, help="worker threads per kind of object reconciled", parse=parse_positive_int)
    lease_duration: float = setting(15.0, help="leader Lease duration", parse=parse_duration)
    renew_deadline: float = setting(
        10.0, help="a leader that cannot renew for this long stops", parse=parse_duration
    )
    retry_period: float = setting(2.0, help="how often the Lease is renewed or tried", parse=parse_duration)
    resync_period: float = setting(
        600.0, help="every object is reconciled again at least this often", parse=parse_duration
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    log_format: str = setting("json", help="json or text")

    def __post_init__(self) -> None:
        if self.log_format not in ("json", "text"):
            raise ValueError("--log-format must be json or text")
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "--retry-period < --renew-deadline < --lease-duration must hold (e.g. 2s, 10s, 15s)"
            )
        if self.repull_period <= 0:
            raise ValueError("--repull-period must be positive, e.g. 24h")

    @property
    def release_namespace(self) -> str:
        return self.namespace or pod_namespace()

    @property
    def lease_namespace(self) -> str:
        return self.leader_election_namespace or pod_namespace()
