"""`imagewarm webhook`: the admission webhook (rewrites pod images to the node proxy, injects SidecarSets)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile

from imagewarm import logs, serving
from imagewarm.command import Command
from imagewarm.kube import KubeError
from webhook.config import WebhookConfig

log = logging.getLogger("imagewarm.webhook")


def print_configuration(config: WebhookConfig) -> None:
    """The MutatingWebhookConfiguration for these settings, for installs without the chart."""
    from webhook.registration import mutating_webhook_configuration

    configuration = mutating_webhook_configuration(
        name=config.webhook_config_name,
        service_name=config.service_name,
        namespace=config.namespace,
        opt_in=config.opt_in,
    )
    print(json.dumps(configuration, indent=2))


def run(config: WebhookConfig) -> int:
    if config.print_configuration:
        print_configuration(config)
        return 0
    logs.setup(config.log_level, config.log_format)
    serving.prepare_metrics_dir("imagewarm-webhook-metrics-")
    from webhook import server  # gunicorn and the app load only when serving

    tls_dir = config.tls_dir
    keeper = None
    if not tls_dir:
        tls_dir = tempfile.mkdtemp(prefix="imagewarm-webhook-tls-")
        try:
            # The first sync happens before serving, so the certificate files exist for the workers.
            server.cert_manager(config, tls_dir).sync()
        except KubeError as exc:
            print(
                f"imagewarm webhook: cannot set up self-managed certificates: {exc}. Give --tls-dir DIR "
                "with tls.crt/tls.key, or allow get/create/update on the Secret and the "
                "MutatingWebhookConfiguration.",
                file=sys.stderr,
            )
            return 1
        keeper = server.start_cert_keeper(config, tls_dir)
    log.info("serving", extra={"listen": f"{config.listen[0]}:{config.listen[1]}", "tls_dir": tls_dir})
    try:
        server.WebhookServer(config, tls_dir).run()
    finally:
        if keeper is not None:
            keeper.terminate()
    return 0


command = Command(
    help="the admission webhook: rewrites pod images to the node proxy and injects SidecarSets",
    config=WebhookConfig,
    run=run,
)
