"""Checks shared by tests that copy images with skopeo: what arrived is exactly what was pushed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def copy_to_dir(skopeo: Any, source: str, target: Path, *extra: str) -> Path:
    """skopeo copy docker://source dir:target, keeping manifests byte for byte."""
    skopeo(
        "copy", "--src-tls-verify=false", "--preserve-digests", *extra, f"docker://{source}", f"dir:{target}"
    )
    return target


def assert_dir_matches(copied: Path, image: Any) -> None:
    """The dir: copy holds exactly the image's manifest and blobs, each matching its digest."""
    assert (copied / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        stored = copied / blob.digest.split(":")[1]
        assert stored.stat().st_size == blob.size
        assert sha256_file(stored) == blob.digest
