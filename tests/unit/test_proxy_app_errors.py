"""The proxy's Flask app answers an exception nothing expected with OCI error JSON, never an HTML page.

The fault is real, not mocked: the cache's manifests directory replaced by a file, so looking a
manifest up by digest raises NotADirectoryError (an OSError no code path handles)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from proxy.app import create_app
from proxy.cache.paths import Layout
from proxy.config import ProxyConfig

DIGEST = "sha256:" + "b" * 64
PATH = f"/v2/registry.example/team/app/manifests/{DIGEST}"


@pytest.fixture
def broken_cache(tmp_path: Path) -> FlaskClient:
    app = create_app(ProxyConfig(cache_dir=tmp_path / "cache", upstream=("registry.example",)))
    manifests = Layout(tmp_path / "cache").manifests_dir
    shutil.rmtree(manifests)
    manifests.write_bytes(b"not a directory")
    return app.test_client()


def test_an_unexpected_exception_becomes_oci_error_json_and_a_logged_traceback(broken_cache, caplog):
    with caplog.at_level(logging.ERROR, logger="imagewarm.proxy"):
        response = broken_cache.get(PATH)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    (error,) = response.get_json()["errors"]
    assert error["code"] == "UNKNOWN"
    assert "retry" in error["message"] and PATH in error["message"]
    assert error["detail"] == {"exception": "NotADirectoryError"}
    (record,) = [r for r in caplog.records if r.getMessage() == "request failed unexpectedly"]
    assert record.exc_info is not None and record.exc_info[0] is NotADirectoryError
    assert getattr(record, "path", None) == PATH


def test_head_gets_the_same_status_without_a_body(broken_cache):
    response = broken_cache.head(PATH)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert response.data == b""
    assert int(response.headers["Content-Length"]) > 0  # the length the GET body would have


def test_registry_errors_and_routing_errors_keep_their_answers(broken_cache):
    denied = broken_cache.get("/v2/elsewhere.example/app/manifests/v1")
    assert denied.status_code == 403 and denied.get_json()["errors"][0]["code"] == "DENIED"
    assert broken_cache.get("/no-such-route").status_code == 404
