"""The webhook's settings: one frozen value, from flags then `IMAGEWARM_*` variables."""

from __future__ import annotations

from dataclasses import dataclass

from imagewarm.config import parse_bool, parse_bytes, parse_duration, parse_host_port, setting

DEFAULT_EXCLUDED_REGISTRIES = ("localhost",)


@dataclass(frozen=True)
class WebhookConfig:
    listen: tuple[str, int] = setting(
        ("0.0.0.0", 8443), help="address to serve HTTPS on", parse=parse_host_port, metavar="HOST:PORT"
    )
    tls_dir: str = setting(
        "",
        help="directory with tls.crt and tls.key (reloaded when they change); "
        "empty: make and manage our own CA and certificate",
        metavar="DIR",
    )
    proxy_prefix: str = setting(
        "localhost:7439", help="the node proxy that images are rewritten to", metavar="HOST:PORT"
    )
    webhook_config_name: str = setting(
        "imagewarm",
        help="MutatingWebhookConfiguration whose caBundle self-managed certificates are patched into",
    )
    service_name: str = setting(
        "imagewarm-webhook", help="Service in front of the webhook (certificate names)"
    )
    namespace: str = setting("imagewarm", help="namespace of the Service and of the certificate Secret")
    secret_name: str = setting("imagewarm-webhook-tls", help="Secret holding self-managed CA and certificate")
    kubeconfig: str = setting("", help="kubeconfig path; empty: in-cluster config", metavar="PATH")
    exclude_registry: tuple[str, ...] = setting(
        (), help="registry never rewritten (localhost always is)", repeated=True, metavar="HOST[:PORT]"
    )
    only_registry: tuple[str, ...] = setting(
        (),
        help="rewrite only images of this registry (repeatable: the proxy's --upstream and "
        "--insecure-upstream list, so no pod is sent to a proxy that refuses its registry); "
        "none given: every registry not excluded",
        repeated=True,
        metavar="HOST[:PORT]",
    )
    exclude_image: tuple[str, ...] = setting(
        (), help="glob of images never rewritten, e.g. 'docker.io/library/*'", repeated=True, metavar="GLOB"
    )
    sidecarsets: bool = setting(
        True, help="inject SidecarSets (needs list/watch on sidecarsets, namespaces)", parse=parse_bool
    )
    workers: int = setting(2, help="gunicorn worker processes", parse=int)
    connections: int = setting(
        1000, help="open client connections per worker (a thread each; the API server keeps a few)", parse=int
    )
    max_body_bytes: int = setting(3 * 1024 * 1024, help="largest AdmissionReview accepted", parse=parse_bytes)
    sync_wait: float = setting(
        1.0, help="how long a request waits for the SidecarSet cache's first sync", parse=parse_duration
    )
    cert_check_interval: float = setting(
        600.0, help="how often self-managed certificates are checked", parse=parse_duration
    )
    opt_in: bool = setting(
        False, help='rewrite only namespaces labelled imagewarm.io/enabled="true"', parse=parse_bool
    )
    print_configuration: bool = setting(
        False,
        help="print the MutatingWebhookConfiguration these flags call for (JSON) and exit",
        parse=parse_bool,
    )
    log_level: str = setting("info", help="debug, info, warning or error")
    log_format: str = setting("json", help="json or text")

    def __post_init__(self) -> None:
        if "/" in self.proxy_prefix or not self.proxy_prefix:
            raise ValueError(
                f"--proxy-prefix {self.proxy_prefix!r}: give HOST:PORT only, e.g. localhost:7439"
            )
        if self.workers < 1 or self.connections < 1:
            raise ValueError("--workers and --connections must be at least 1")
        if self.log_format not in ("json", "text"):
            raise ValueError("--log-format must be json or text")

    @property
    def excluded_registries(self) -> frozenset[str]:
        """Registries (lower case, `host[:port]`) whose images stay as they are."""
        return frozenset(r.lower() for r in (*DEFAULT_EXCLUDED_REGISTRIES, *self.exclude_registry))

    @property
    def only_registries(self) -> frozenset[str]:
        """Registries (lower case, `host[:port]`) whose images are rewritten; empty: all."""
        return frozenset(r.lower() for r in self.only_registry)

    @property
    def service_dns_names(self) -> tuple[str, ...]:
        s, ns = self.service_name, self.namespace
        return (s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.cluster.local")
