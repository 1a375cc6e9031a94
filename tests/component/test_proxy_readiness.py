"""`/readyz` says whether the proxy can serve: its cache directory usable (every directory of the
layout a directory, writable) and a worker answering. A real proxy, a real read-only bind mount."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import requests

from proxy.cache.paths import Layout
from tests.component import proxy_fixtures

proxy_factory = proxy_fixtures.proxy_factory  # the fixture, used by name


def readyz(proxy) -> requests.Response:
    return requests.get(f"{proxy.url}/readyz", timeout=5)


def test_a_read_only_cache_directory_is_not_ready_until_it_is_writable_again(proxy_factory):
    proxy = proxy_factory(insecure=("127.0.0.1:9",), workers=2)
    assert readyz(proxy).status_code == 200
    root = str(proxy.cache_dir)
    subprocess.run(["mount", "--bind", root, root], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
        for _ in range(4):  # whichever worker answers
            got = readyz(proxy)
            assert got.status_code == 503, got.text
            assert "not writable" in got.text and root in got.text, got.text
            assert requests.head(f"{proxy.url}/readyz", timeout=5).status_code == 503
        assert requests.get(f"{proxy.url}/healthz", timeout=5).status_code == 200  # alive, not ready
    finally:
        subprocess.run(["umount", root], check=True)
    got = readyz(proxy)
    assert (got.status_code, got.text) == (200, "ready\n")


def test_a_cache_directory_replaced_by_a_file_is_not_ready(proxy_factory):
    proxy = proxy_factory(insecure=("127.0.0.1:9",), workers=1)
    partial = Layout(Path(proxy.cache_dir)).partial_dir
    shutil.rmtree(partial)
    partial.write_text("not a directory")
    got = readyz(proxy)
    assert got.status_code == 503 and f"{partial} is not a directory" in got.text, got.text
    partial.unlink()
    got = readyz(proxy)
    assert got.status_code == 503 and f"{partial} is missing" in got.text, got.text
    partial.mkdir()
    assert readyz(proxy).status_code == 200
