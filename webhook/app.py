"""The Flask app: `POST /mutate`, `/healthz`, `/metrics`. The view parses, decides, answers.

Contract for `/mutate`: a body that is not a usable AdmissionReview gets a 4xx JSON `{"error": ...}`;
every parsed review gets 200 with `allowed: true` (a patch when there is something to change).
Nothing a client sends produces a 5xx: a pod not shaped like one (`admission.InvalidPod`) is answered
`allowed: true` without a patch, with a warning naming the field, and counted as decision "invalid";
an unexpected failure while deciding (a bug) is logged with its traceback, answered the same way and
counted as "error" (the pod is created unrewritten, as with `failurePolicy: Ignore`).

While the SidecarSet cache has not finished its first sync, a request waits up to `sync_wait` for it;
after that the pod is answered without SidecarSet injection (images still rewritten) and a warning
saying so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from imagewarm.metrics import exposition
from webhook import admission, metrics
from webhook.caches import SidecarSets, Store, namespace_labels
from webhook.config import WebhookConfig
from webhook.mutation import Decision, on_create, on_ephemeral_update
from webhook.rewrite import Rule

log = logging.getLogger("imagewarm.webhook")


def rule_of(config: WebhookConfig) -> Rule:
    return Rule(
        proxy_prefix=config.proxy_prefix,
        excluded_registries=config.excluded_registries,
        excluded_images=config.exclude_image,
        only_registries=config.only_registries,
    )


def decision_for(
    req: admission.AdmissionRequest,
    rule: Rule,
    sidecarsets: SidecarSets | None,
    namespaces: Store | None,
    sync_wait: float,
) -> Decision:
    """The decision for one parsed request (reads the caches, never the API server)."""
    if req.is_pod_create and req.pod is not None:
        found, synced = sidecarsets.current(sync_wait) if sidecarsets is not None else ([], True)
        decision = on_create(
            req.pod,
            rule,
            sidecarsets=found,
            namespace=req.namespace,
            namespace_labels=namespace_labels(namespaces, req.namespace),
        )
        if not synced:
            decision.warnings.append("imagewarm: SidecarSet cache not synced yet; no SidecarSet injected")
        return decision
    if req.is_ephemeral_update and req.pod is not None:
        return on_ephemeral_update(req.pod, req.old_pod, rule)
    return Decision(reason="ignored")


def create_app(
    config: WebhookConfig, *, sidecarsets: Store | None = None, namespaces: Store | None = None
) -> Flask:
    """The app. `sidecarsets` and `namespaces` are watch-backed caches (None: no SidecarSet injection,
    namespace labels unknown)."""
    app = Flask("webhook")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    rule = rule_of(config)
    parsed_sidecarsets = SidecarSets(sidecarsets) if sidecarsets is not None else None

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        if exc.code == 413:
            _drain(request.environ)
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 400

    @app.get("/healthz")
    def healthz() -> Response:
        # Which worker answered and how current its SidecarSet cache is: each gunicorn worker has its
        # own, and a client holding a keep-alive connection keeps talking to the same worker.
        return jsonify(
            ok=True,
            sidecarsetsSynced=sidecarsets.synced if sidecarsets is not None else None,
            worker=os.getpid(),
            sidecarsetCache=sidecarsets.state() if sidecarsets is not None else None,
        )

    @app.get("/metrics")
    def metrics_view() -> Response:
        body, content_type = exposition()
        return Response(body, content_type=content_type)

    @app.post("/mutate")
    def mutate() -> tuple[Response, int]:
        started = time.perf_counter()
        operation = "unknown"
        try:
            try:
                req = admission.parse_review(request.get_data(cache=False))
            except admission.BadReview as exc:
                metrics.decisions("invalid").inc()
                metrics.requests(operation, "400").inc()
                return jsonify(error=f"bad AdmissionReview: {exc}"), 400
            except admission.InvalidPod as exc:
                # Junk a client sent, not our bug: allowed unchanged, saying what is wrong.
                req = exc.request
                metrics.decisions("invalid").inc()
                answer = admission.response(req.uid, warnings=[f"imagewarm: pod left unchanged: {exc}"])
            else:
                answer = _answer(req, rule, parsed_sidecarsets, namespaces, config.sync_wait)
            operation = (
                req.operation if req.operation in ("CREATE", "UPDATE", "DELETE", "CONNECT") else "other"
            )
            metrics.requests(operation, "200").inc()
            return Response(json.dumps(answer, separators=(",", ":")), mimetype="application/json"), 200
        finally:
            metrics.DURATION.observe(time.perf_counter() - started)

    return app


DRAIN_LIMIT = 16 * 1024 * 1024


def _drain(environ: dict[str, Any]) -> None:
    """Read and drop a too-large body (up to DRAIN_LIMIT) so the client receives our 413 instead of
    a connection reset while it is still sending; beyond that the connection is simply closed."""
    try:
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    if remaining > DRAIN_LIMIT:
        return
    stream = environ["wsgi.input"]
    while remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)


def _answer(
    req: admission.AdmissionRequest,
    rule: Rule,
    sidecarsets: SidecarSets | None,
    namespaces: Store | None,
    sync_wait: float,
) -> dict[str, Any]:
    try:
        decision = decision_for(req, rule, sidecarsets, namespaces, sync_wait)
    except Exception:
        # Never a 5xx: the pod goes through unchanged, as it would with the webhook down.
        log.exception("unexpected failure deciding a pod; allowed unchanged", extra={"uid": req.uid})
        metrics.decisions("error").inc()
        return admission.response(req.uid, warnings=["imagewarm: internal error; pod left unchanged"])
    metrics.decisions(decision.reason).inc()
    if decision.rewrites and not req.dry_run:
        metrics.REWRITES.inc(decision.rewrites)
    for name in decision.injected if not req.dry_run else ():
        metrics.INJECTIONS.labels(name).inc()
    if decision.patch and log.isEnabledFor(logging.DEBUG):
        # Debug only: at hundreds of pods a second a line per pod is noise (and 10% of the CPU); the
        # pod's own imagewarm.io/original-images annotation records what changed.
        log.debug(
            "pod mutated",
            extra={
                "uid": req.uid,
                "namespace": req.namespace,
                "pod": req.name,
                "rewrites": decision.rewrites,
                "injected": list(decision.injected),
                "dry_run": req.dry_run,
            },
        )
    return admission.response(req.uid, decision.patch, decision.warnings)
