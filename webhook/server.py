"""Serving the app with gunicorn over TLS, and the background work around it.

Each worker process starts its own informers (SidecarSets, namespaces) after the fork, so no thread
crosses a fork. Self-managed certificates are kept by one separate process (`cert_keeper`) that
writes the files the workers' `ReloadingContext` picks up.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

from gunicorn.app.base import BaseApplication

from imagewarm import serving
from imagewarm.informer import Informer
from imagewarm.kube import Kube, KubeError
from imagewarm.worker import ConnectionThreadWorker
from webhook import metrics
from webhook.app import create_app
from webhook.config import WebhookConfig
from webhook.selfcert import CertManager
from webhook.tls import ReloadingContext

log = logging.getLogger("imagewarm.webhook")

SIDECARSETS_PATH = "/apis/imagewarm.io/v1alpha1/sidecarsets"
NAMESPACES_PATH = "/api/v1/namespaces"


def informers(config: WebhookConfig) -> tuple[Informer | None, Informer | None]:
    """Started SidecarSet and namespace caches, or (None, None) when injection is off."""
    if not config.sidecarsets:
        return None, None
    kube = Kube.load(config.kubeconfig or None)
    sidecarsets = Informer(kube, SIDECARSETS_PATH, name="sidecarsets", on_progress=export_progress).start()
    namespaces = Informer(kube, NAMESPACES_PATH, name="namespaces", on_progress=export_progress).start()
    return sidecarsets, namespaces


def export_progress(cache: Informer) -> None:
    metrics.cache_progressed(cache.name, cache.state(), cache.progressed_at)


def wsgi_app(config: WebhookConfig) -> Any:
    """The app with its caches (called in each worker)."""
    sidecarsets, namespaces = informers(config)
    return create_app(config, sidecarsets=sidecarsets, namespaces=namespaces)


class WebhookWorker(ConnectionThreadWorker):
    """The API server sends each admission on one of the keep-alive connections it holds: on a stop,
    an idle connection gets 2 s to carry a last review (answered, then closed) instead of being
    closed under a review already on its way (which would admit that pod unrewritten)."""

    idle_drain_seconds = 2.0


class WebhookServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured from `WebhookConfig`, serving TLS from `tls_dir` (reloaded on change)."""

    def __init__(self, config: WebhookConfig, tls_dir: str) -> None:
        self.webhook_config = config
        self.tls_dir = tls_dir
        super().__init__()

    def load_config(self) -> None:
        config = self.webhook_config
        context = ReloadingContext(self.tls_dir)
        settings = serving.base_settings(
            config.listen, workers=config.workers, connections=config.connections, log_level="warning"
        )
        settings.update(
            {
                # The API server keeps connections to webhooks open and drops idle ones after 90 s
                # (Go's default). Ours must outlast that: if we closed first, a POST sent on a
                # connection we were closing would fail, not be retried, and (failurePolicy Ignore)
                # its pod would be admitted unrewritten.
                "keepalive": 120,
                "worker_class": f"{__name__}.WebhookWorker",
                "timeout": 30,
                "graceful_timeout": 5,
                "certfile": str(context.cert_path),
                "keyfile": str(context.key_path),
                "ssl_context": lambda conf, default: context.get(),
                "limit_request_line": 8190,
            }
        )
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return wsgi_app(self.webhook_config)


def keep_certificates(config: WebhookConfig, directory: str, parent: int) -> None:
    """Loop (in its own process): sync the self-managed certificates every `cert_check_interval`,
    sooner while the caBundle could not be set; exit when the parent exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    manager = cert_manager(config, directory)
    stop = threading.Event()
    while os.getppid() == parent:
        try:
            in_place = manager.sync()
        except KubeError as exc:
            log.warning("certificate sync failed; retrying", extra={"error": str(exc)})
            in_place = False
        stop.wait(config.cert_check_interval if in_place else 5.0)


def cert_manager(config: WebhookConfig, directory: str) -> CertManager:
    return CertManager(
        Kube.load(config.kubeconfig or None),
        namespace=config.namespace,
        secret_name=config.secret_name,
        webhook_config_name=config.webhook_config_name,
        dns_names=config.service_dns_names,
        directory=directory,
    )


def start_cert_keeper(config: WebhookConfig, directory: str) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(
        target=keep_certificates,
        args=(config, directory, os.getpid()),
        name="imagewarm-cert-keeper",
        daemon=True,
    )
    process.start()
    return process
