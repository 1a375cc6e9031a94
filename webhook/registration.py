"""The MutatingWebhookConfiguration the chart installs (and the end-to-end tests register)."""

from __future__ import annotations

import base64
from typing import Any

from imagewarm.api import ENABLED_LABEL

# Pods of imagewarm itself carry this label and are never sent to the webhook (the proxy must be
# able to start even when the webhook is down, and must not be rewritten onto itself).
COMPONENT_LABEL = "app.kubernetes.io/part-of"
COMPONENT_VALUE = "imagewarm"


def mutating_webhook_configuration(
    *,
    name: str,
    service_name: str,
    namespace: str,
    port: int = 443,
    ca_bundle: bytes | None = None,
    opt_in: bool = False,
    timeout_seconds: int = 3,
) -> dict[str, Any]:
    """The configuration: `failurePolicy: Ignore` (the cluster never stops creating pods because of
    us), a short timeout, no side effects, reinvocation (so pods another webhook changes later are
    rewritten too; the decision is idempotent), pods CREATE and `pods/ephemeralcontainers` UPDATE.
    Namespaces labelled `imagewarm.io/enabled: "false"`, kube-system and `namespace` (imagewarm's
    own) are skipped; with `opt_in` only namespaces labelled `"true"` are rewritten. The Helm chart
    renders the same webhook (tests/unit/test_chart.py compares them)."""
    # imagewarm's own namespace too: its pods must start while the webhook or the proxy is down.
    skipped = list(dict.fromkeys(["kube-system", namespace]))
    expressions: list[dict[str, Any]] = [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": skipped},
    ]
    if opt_in:
        expressions.append({"key": ENABLED_LABEL, "operator": "In", "values": ["true"]})
    else:
        expressions.append({"key": ENABLED_LABEL, "operator": "NotIn", "values": ["false"]})
    client_config: dict[str, Any] = {
        "service": {"name": service_name, "namespace": namespace, "path": "/mutate", "port": port},
    }
    if ca_bundle:
        client_config["caBundle"] = base64.b64encode(ca_bundle).decode()
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {COMPONENT_LABEL: COMPONENT_VALUE}},
        "webhooks": [
            {
                "name": "pods.imagewarm.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": client_config,
                "failurePolicy": "Ignore",
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "IfNeeded",
                "sideEffects": "None",
                "timeoutSeconds": timeout_seconds,
                "namespaceSelector": {"matchExpressions": expressions},
                "objectSelector": {
                    "matchExpressions": [
                        {"key": COMPONENT_LABEL, "operator": "NotIn", "values": [COMPONENT_VALUE]}
                    ]
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    },
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": ["pods/ephemeralcontainers"],
                        "scope": "Namespaced",
                    },
                ],
            }
        ],
    }
