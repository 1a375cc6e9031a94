"""Self-managed TLS: a CA and serving certificate kept in a Secret, the CA in the webhook
configuration's `caBundle`, renewed before expiry.

Several replicas may start at once: each reads the Secret; when absent each makes a candidate and
tries to create it, and the losers of that race (409 AlreadyExists) read and use the winner's. A
renewal replaces the Secret only at the resourceVersion that was read (a 409 Conflict means another
replica renewed first: read again). So all replicas converge on one CA and one certificate.
When the CA itself is renewed the old one stays in the bundle until it expires, so callers trust
certificates from both while replicas switch over.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from imagewarm import certs
from imagewarm.kube import AlreadyExists, Conflict, Kube, NotFound
from webhook.tls import CERT_FILE, KEY_FILE

log = logging.getLogger("imagewarm.webhook")

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_LEAF_BEFORE = datetime.timedelta(days=30)
RENEW_CA_BEFORE = datetime.timedelta(days=400)  # > LEAF_DAYS: a leaf never outlives its CA


@dataclass(frozen=True)
class Material:
    """What the Secret holds: the CA bundle (current CA first, then older still-valid ones), the
    current CA's key, and the serving certificate and key."""

    ca_bundle: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    @property
    def ca(self) -> certs.CertKey:
        return certs.CertKey(_pems(self.ca_bundle)[0], self.ca_key)

    def to_secret_data(self) -> dict[str, str]:
        raw = {"ca.crt": self.ca_bundle, "ca.key": self.ca_key, CERT_FILE: self.cert, KEY_FILE: self.key}
        return {k: base64.b64encode(v).decode() for k, v in raw.items()}

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> Material | None:
        data = secret.get("data") or {}
        try:
            return cls(*(base64.b64decode(data[k]) for k in ("ca.crt", "ca.key", CERT_FILE, KEY_FILE)))
        except (KeyError, ValueError, TypeError):
            return None


def _pems(bundle: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part.strip() + b"\n" + marker + b"\n" for part in bundle.split(marker) if part.strip()]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _leaf(ca: certs.CertKey, dns_names: Sequence[str], days: int) -> certs.CertKey:
    return certs.issue(ca, dns_names[0], dns_names=dns_names, server=True, days=days)


def fresh(dns_names: Sequence[str], *, leaf_days: int = LEAF_DAYS) -> Material:
    ca = certs.new_ca("imagewarm-webhook-ca", days=CA_DAYS)
    leaf = _leaf(ca, dns_names, leaf_days)
    return Material(ca.cert_pem, ca.key_pem, leaf.cert_pem, leaf.key_pem)


def problem(material: Material, dns_names: Sequence[str]) -> str | None:
    """Why `material` must be renewed now, or None when it is good."""
    try:
        ca = x509.load_pem_x509_certificate(_pems(material.ca_bundle)[0])
        leaf = x509.load_pem_x509_certificate(material.cert)
    except (ValueError, IndexError):
        return "unreadable certificates"
    if ca.not_valid_after_utc - _now() < RENEW_CA_BEFORE:
        return "CA expires soon"
    if leaf.not_valid_after_utc - _now() < RENEW_LEAF_BEFORE:
        return "certificate expires soon"
    if leaf.issuer != ca.subject:
        return "certificate not issued by the current CA"
    try:
        sans = set(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            )
        )
    except x509.ExtensionNotFound:
        sans = set()
    if not set(dns_names) <= sans:
        return "certificate does not name the service"
    return None


def renewed(material: Material, dns_names: Sequence[str], *, leaf_days: int = LEAF_DAYS) -> Material:
    """New material that fixes `problem(material)`: a new leaf, and a new CA when needed (the old CA
    kept in the bundle while still valid)."""
    try:
        ca_cert = x509.load_pem_x509_certificate(_pems(material.ca_bundle)[0])
        ca_ok = ca_cert.not_valid_after_utc - _now() >= RENEW_CA_BEFORE
    except (ValueError, IndexError):
        ca_ok = False
    if ca_ok:
        ca = material.ca
        bundle = material.ca_bundle
    else:
        ca = certs.new_ca("imagewarm-webhook-ca", days=CA_DAYS)
        still_valid = [p for p in _pems(material.ca_bundle) if _valid(p)]
        bundle = b"".join([ca.cert_pem, *still_valid])
    leaf = _leaf(ca, dns_names, leaf_days)
    return Material(bundle, ca.key_pem, leaf.cert_pem, leaf.key_pem)


def _valid(pem: bytes) -> bool:
    try:
        return x509.load_pem_x509_certificate(pem).not_valid_after_utc > _now()
    except ValueError:
        return False


class CertManager:
    """Keeps the Secret, the files in `directory` and the webhook configuration's caBundle in step."""

    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        secret_name: str,
        webhook_config_name: str,
        dns_names: Sequence[str],
        directory: str | os.PathLike[str],
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.secret_name = secret_name
        self.webhook_config_name = webhook_config_name
        self.dns_names = tuple(dns_names)
        self.directory = Path(directory)

    @property
    def secret_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/secrets/{self.secret_name}"

    def ensure_secret(self) -> Material:
        """The Secret's material, creating or renewing it (conflict-safe, see the module docstring)."""
        for _ in range(10):
            try:
                secret = self.kube.get(self.secret_path)
            except NotFound:
                candidate = fresh(self.dns_names)
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "kubernetes.io/tls",
                    "metadata": {
                        "name": self.secret_name,
                        "namespace": self.namespace,
                        "labels": {"app.kubernetes.io/part-of": "imagewarm"},
                    },
                    "data": candidate.to_secret_data(),
                }
                try:
                    self.kube.create(f"/api/v1/namespaces/{self.namespace}/secrets", body)
                    log.info("webhook CA and certificate created", extra={"secret": self.secret_name})
                    return candidate
                except AlreadyExists:
                    continue  # another replica created it first: use theirs
            material = Material.from_secret(secret)
            reason = problem(material, self.dns_names) if material else "incomplete Secret"
            if reason is None and material is not None:
                return material
            replacement = renewed(material, self.dns_names) if material else fresh(self.dns_names)
            secret["data"] = {**(secret.get("data") or {}), **replacement.to_secret_data()}
            try:
                self.kube.replace(self.secret_path, secret)  # carries the resourceVersion read
                log.info("webhook certificate renewed", extra={"secret": self.secret_name, "reason": reason})
                return replacement
            except Conflict:
                continue  # another replica renewed first: read again
        raise Conflict(
            f"Secret {self.namespace}/{self.secret_name} kept changing while renewing it; "
            "check for another writer fighting over it"
        )

    def write_files(self, material: Material) -> bool:
        """Write tls.crt/tls.key atomically (key first, so a reader never pairs a new cert with an
        old key for long); True when they changed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        changed = False
        for name, content in (
            (KEY_FILE, material.key),
            (CERT_FILE, material.cert),
            ("ca.crt", material.ca_bundle),
        ):
            path = self.directory / name
            if path.exists() and path.read_bytes() == content:
                continue
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(content)
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
            changed = True
        return changed

    def patch_ca_bundle(self, ca_bundle: bytes) -> bool:
        """Set `caBundle` on every webhook of the configuration; False when it does not exist (yet)."""
        path = (
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{self.webhook_config_name}"
        )
        encoded = base64.b64encode(ca_bundle).decode()
        for _ in range(10):
            try:
                configuration = self.kube.get(path)
            except NotFound:
                log.warning(
                    "MutatingWebhookConfiguration not found; caBundle not set yet",
                    extra={"webhook_configuration": self.webhook_config_name},
                )
                return False
            webhooks = configuration.get("webhooks") or []
            if all((w.get("clientConfig") or {}).get("caBundle") == encoded for w in webhooks):
                return True
            for webhook in webhooks:
                webhook.setdefault("clientConfig", {})["caBundle"] = encoded
            try:
                self.kube.replace(path, configuration)
                log.info("caBundle set", extra={"webhook_configuration": self.webhook_config_name})
                return True
            except Conflict:
                continue
        return False

    def sync(self) -> bool:
        """One round: Secret, files, caBundle. True when the caBundle is in place."""
        material = self.ensure_secret()
        self.write_files(material)
        return self.patch_ca_bundle(material.ca_bundle)
