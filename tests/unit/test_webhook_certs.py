"""Self-managed certificate material (renewal decisions) and the registered configuration."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from imagewarm import certs
from imagewarm.selectors import LabelSelector
from webhook import selfcert
from webhook.registration import mutating_webhook_configuration

NAMES = ("svc", "svc.ns", "svc.ns.svc", "svc.ns.svc.cluster.local")


def material(ca_days: int = 3650, leaf_days: int = 365, names: tuple[str, ...] = NAMES) -> selfcert.Material:
    ca = certs.new_ca("ca", days=ca_days)
    leaf = certs.issue(ca, names[0], dns_names=names, days=leaf_days)
    return selfcert.Material(ca.cert_pem, ca.key_pem, leaf.cert_pem, leaf.key_pem)


def test_fresh_material_is_good_and_round_trips_through_secret_data() -> None:
    fresh = selfcert.fresh(NAMES)
    assert selfcert.problem(fresh, NAMES) is None
    secret = {"data": fresh.to_secret_data()}
    assert selfcert.Material.from_secret(secret) == fresh
    assert selfcert.Material.from_secret({"data": {"tls.crt": "x"}}) is None


@pytest.mark.parametrize(
    ("made", "reason"),
    [
        (lambda: material(leaf_days=10), "certificate expires soon"),
        (lambda: material(ca_days=100, leaf_days=50), "CA expires soon"),
        (lambda: material(names=("other.ns.svc",)), "does not name the service"),
    ],
)
def test_problems_are_found(made: Callable[[], selfcert.Material], reason: str) -> None:
    assert reason in (selfcert.problem(made(), NAMES) or "")


def test_leaf_renewal_keeps_the_ca() -> None:
    old = material(leaf_days=10)
    new = selfcert.renewed(old, NAMES)
    assert new.ca_bundle == old.ca_bundle and new.cert != old.cert
    assert selfcert.problem(new, NAMES) is None


def test_ca_renewal_keeps_the_old_ca_in_the_bundle_while_valid() -> None:
    old = material(ca_days=100, leaf_days=50)
    new = selfcert.renewed(old, NAMES)
    assert selfcert.problem(new, NAMES) is None
    bundle = x509.load_pem_x509_certificates(new.ca_bundle)
    assert len(bundle) == 2 and bundle[1].public_bytes(Encoding.PEM) == old.ca_bundle
    leaf = x509.load_pem_x509_certificate(new.cert)
    assert leaf.issuer == bundle[0].subject
    assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)


def test_registration_is_safe_by_default() -> None:
    config = mutating_webhook_configuration(name="iw", service_name="svc", namespace="ns", ca_bundle=b"PEM")
    hook = config["webhooks"][0]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] <= 5 and hook["matchPolicy"] == "Equivalent"
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["admissionReviewVersions"] == ["v1"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"PEM"
    assert {(r["operations"][0], r["resources"][0]) for r in hook["rules"]} == {
        ("CREATE", "pods"),
        ("UPDATE", "pods/ephemeralcontainers"),
    }
    namespaces = LabelSelector.parse(hook["namespaceSelector"])
    assert namespaces.matches({"kubernetes.io/metadata.name": "default"})
    assert not namespaces.matches({"kubernetes.io/metadata.name": "kube-system"})
    assert not namespaces.matches({"kubernetes.io/metadata.name": "a", "imagewarm.io/enabled": "false"})
    objects = LabelSelector.parse(hook["objectSelector"])
    assert not objects.matches({"app.kubernetes.io/part-of": "imagewarm"}) and objects.matches({})


def test_opt_in_mode_requires_the_label() -> None:
    hook = mutating_webhook_configuration(name="iw", service_name="s", namespace="n", opt_in=True)[
        "webhooks"
    ][0]
    namespaces = LabelSelector.parse(hook["namespaceSelector"])
    assert not namespaces.matches({"kubernetes.io/metadata.name": "a"})
    assert namespaces.matches({"kubernetes.io/metadata.name": "a", "imagewarm.io/enabled": "true"})
