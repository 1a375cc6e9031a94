"""The product image as `./dev.sh image` builds it: its layers, its config, its caching, and the image
imported into a real containerd and run there (the CLI, the interpreter's TLS, and the proxy serving
a pull from a real registry from inside the container, as the nonroot user)."""

from __future__ import annotations

import gzip
import hashlib
import io
import marshal
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from localcluster import binaries, productimage, wheels
from localcluster.containerd import Containerd
from localcluster.images import Blob, ImageBuilder, push
from localcluster.processes import free_ports
from localcluster.productimage import ProductImage
from localcluster.registry import Registry

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def product_image() -> ProductImage:
    """Built once (a few seconds when ~/.cache/imagewarm/images has it, about a minute cold)."""
    return productimage.build_product_image()


def members(layer: Blob) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer.path, "r:gz") as tar:
        return {m.name: m for m in tar}


def read_member(layer: Blob, name: str) -> bytes:
    with tarfile.open(layer.path, "r:gz") as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None, name
        return extracted.read()


def test_the_three_layers_hold_the_runtime_the_dependencies_and_imagewarm(
    product_image: ProductImage,
) -> None:
    runtime, dependencies, app = (members(layer) for layer in product_image.image.layers)
    site = "usr/local/lib/python3.11/dist-packages"
    expected = {"usr/bin/python3.11", "usr/lib/python3.11/os.py", "etc/passwd", "lib64",
                "etc/ssl/certs/ca-certificates.crt", "usr/lib/x86_64-linux-gnu/libssl.so.3"}  # fmt: skip
    assert expected <= set(runtime)
    assert runtime["tmp"].mode == 0o1777
    assert {f"{site}/flask/__init__.py", f"{site}/gunicorn/__init__.py", f"{site}/kubernetes/__init__.py",
            f"{site}/cryptography/hazmat/bindings/_rust.abi3.so"} <= set(dependencies)  # fmt: skip
    assert not [n for n in dependencies if n.startswith("usr/local/bin/")]  # one command in the image
    assert f"{site}/imagewarm/__init__.py" in app and f"{site}/proxy/main.py" in app
    assert not [n for n in app if n.startswith(f"{site}/tests/")]
    entry_points = read_member(
        product_image.image.layers[2], f"{site}/imagewarm-{product_image.tag}.dist-info/entry_points.txt"
    )
    assert b"proxy = proxy.main:command" in entry_points
    script = read_member(product_image.image.layers[2], "usr/local/bin/imagewarm").decode()
    assert script.startswith("#!/usr/bin/python3.11\n") and "from imagewarm.cli import main" in script
    assert app["usr/local/bin/imagewarm"].mode == 0o755


def test_modules_are_precompiled_unchecked_hash_pyc_naming_their_image_path(
    product_image: ProductImage,
) -> None:
    site = "usr/local/lib/python3.11/dist-packages"
    for layer, name in [(0, "usr/lib/python3.11/__pycache__/os.cpython-311.pyc"),
                        (2, f"{site}/imagewarm/__pycache__/cli.cpython-311.pyc")]:  # fmt: skip
        data = read_member(product_image.image.layers[layer], name)
        assert int.from_bytes(data[4:8], "little") == 0b01  # hash-based, source never checked
        code = marshal.loads(data[16:])
        assert code.co_filename == "/" + name.replace("__pycache__/", "").replace(".cpython-311.pyc", ".py")


def test_the_config_is_the_containerfiles_with_this_commit(product_image: ProductImage) -> None:
    document = product_image.image.config_json()
    version = productimage.project()["version"]
    assert document["config"] == productimage.image_config(version, productimage.revision())
    assert product_image.reference == f"imagewarm:{version}"
    assert product_image.name == f"docker.io/library/imagewarm:{version}"


def test_a_second_build_reuses_every_layer_and_gives_the_same_digest(
    product_image: ProductImage, tmp_path: Path
) -> None:
    messages: list[str] = []
    again = productimage.build_product_image(tmp_path / "again.tar", progress=messages.append)
    assert again.digest == product_image.digest
    assert again.archive.read_bytes() == product_image.archive.read_bytes()
    assert [m for m in messages if m.startswith("layer ")] == [
        m for m in messages if m.startswith("layer ") and m.endswith("cached")
    ] and len([m for m in messages if m.startswith("layer ")]) == 3


def test_the_imagewarm_layer_rebuilt_from_the_same_sources_has_the_same_bytes(
    product_image: ProductImage, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    productimage.imagewarm_tree(productimage.ROOT, productimage.source_files(), tree)
    digest = hashlib.sha256()

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            view = memoryview(data)  # type: ignore[arg-type]
            digest.update(view)
            return len(view)

    with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        productimage.write_tree(tar, tree)
    assert "sha256:" + digest.hexdigest() == product_image.image.config_json()["rootfs"]["diff_ids"][2]


def run(containerd: Containerd, image: ProductImage, *args: str, extra: tuple[str, ...] = ()) -> str:
    proc = containerd.ctr(
        "run", "--rm", "--snapshotter", "native", *extra, image.name, f"iw-{uuid.uuid4().hex[:8]}", *args
    )
    return proc.stdout


@pytest.fixture
def imported(containerd: Containerd, product_image: ProductImage) -> Containerd:
    containerd.ctr("images", "import", "--snapshotter", "native", str(product_image.archive))
    assert product_image.name in containerd.ctr("images", "ls", "-q").stdout.split()
    return containerd


def test_the_imported_image_runs_the_cli_as_nonroot_with_working_tls(
    imported: Containerd, product_image: ProductImage
) -> None:
    assert run(imported, product_image, "imagewarm", "--version").strip() == f"imagewarm {product_image.tag}"
    for command, flag in [("proxy", "--cache-dir"), ("webhook", "--tls-dir"), ("warm", "--proxy")]:
        assert flag in run(imported, product_image, "imagewarm", command, "--help")
    check = ("import os, ssl, sys; import proxy.app, webhook.server, gunicorn.app.base, kubernetes.config, "
             "cryptography.x509; ctx = ssl.create_default_context(); print(os.getuid(), os.getgid(), "
             "ctx.cert_store_stats()['x509_ca'] > 100, sys.flags.dont_write_bytecode)")  # fmt: skip
    assert run(imported, product_image, "python3", "-c", check).split() == ["65532", "65532", "True", "1"]


def test_the_proxy_in_the_image_serves_a_pull_from_a_real_registry(
    imported: Containerd, product_image: ProductImage, registry: Registry, images: ImageBuilder
) -> None:
    repository = f"product-{uuid.uuid4().hex[:6]}/busybox"
    digest = push(registry, repository, "1", images.busybox())
    port = free_ports(1)[0]
    name = f"iw-proxy-{uuid.uuid4().hex[:8]}"
    imported.ctr("run", "-d", "--net-host", "--snapshotter", "native", product_image.name, name,
                 "imagewarm", "proxy", "--listen", f"127.0.0.1:{port}", "--cache-dir", "/tmp/cache",
                 "--insecure-upstream", registry.host, "--workers", "1")  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v2/{registry.host}/{repository}/manifests/1"
        accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        deadline = time.monotonic() + 60
        while True:
            try:
                response = requests.get(url, headers=accept, timeout=5)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert response.status_code == 200, response.text
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["X-Imagewarm-Cache"] == "miss"
        again = requests.get(url, headers=accept, timeout=5)
        assert again.headers["X-Imagewarm-Cache"] == "hit"
    finally:
        imported.ctr("task", "kill", "--signal", "SIGKILL", name, check=False)
        for _ in range(50):
            if imported.ctr("task", "delete", name, check=False).returncode == 0:
                break
            time.sleep(0.1)
        imported.ctr("containers", "delete", name, check=False)


def test_each_layers_diff_id_is_the_sha256_of_its_uncompressed_tar(product_image: ProductImage) -> None:
    diff_ids = product_image.image.config_json()["rootfs"]["diff_ids"]
    for layer, diff_id, size in zip(
        product_image.image.layers, diff_ids, product_image.uncompressed_sizes, strict=True
    ):
        digest, total = hashlib.sha256(), 0
        with gzip.open(layer.path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
        assert ("sha256:" + digest.hexdigest(), total) == (diff_id, size)


def test_dev_sh_image_writes_the_archive_where_asked_and_prints_a_summary(
    product_image: ProductImage, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "image.tar"
    env = {**os.environ, "PYTHONPATH": str(productimage.ROOT)}
    proc = subprocess.run([sys.executable, "-m", "localcluster.productimage", "--output", str(output)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert output.read_bytes() == product_image.archive.read_bytes()
    assert f"reference        {product_image.reference}" in proc.stdout
    assert product_image.digest in proc.stdout and str(output) in proc.stdout
    assert "layer 3/3 imagewarm" in proc.stderr  # progress on stderr, the summary on stdout


def test_the_containerfiles_build_script_gives_the_same_trees_as_dev_sh_image(tmp_path: Path) -> None:
    """The Containerfile's build stage, run here as it would run in debian:12-slim (Debian's
    python3.11 and pip, the dependency versions pinned to the ones ./dev.sh image uses), installs
    byte for byte the files ./dev.sh image does, but for pip's own records and script template."""
    from tests.unit.test_containerfile import CONTAINERFILE, parse

    _, stages = parse(CONTAINERFILE.read_text())
    (script,) = [a for i, a in stages[0].instructions if i == "RUN" and "pip wheel" in a]
    for directory in ("/wheels", "/deps", "/app"):
        script = script.replace(f" {directory}", f" {tmp_path}{directory}").replace(
            f'"{directory}', f'"{tmp_path}{directory}'
        )
    source = tmp_path / "src"
    files = productimage.source_files()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((productimage.ROOT / name).read_bytes())
    pins = wheels.pinned_dependencies(productimage.project()["dependencies"])
    (tmp_path / "constraints.txt").write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    wheelhouse = binaries.cache_root() / "images" / "wheels"
    env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "PIP_CONSTRAINT": str(tmp_path / "constraints.txt"),
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INDEX": "1",
    }  # fmt: skip (offline: the wheelhouse holds the build backend too)
    proc = subprocess.run(
        ["sh", "-ec", script], cwd=source, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    ours = tmp_path / "ours"
    productimage.dependencies_tree(wheels.dependency_wheels(pins, wheelhouse, print), ours / "deps")
    productimage.imagewarm_tree(productimage.ROOT, files, ours / "app")
    pip_records = {"INSTALLER", "RECORD", "REQUESTED", "direct_url.json"}
    for tree in ("deps", "app"):
        theirs = {str(p.relative_to(tmp_path / tree)): p for p in (tmp_path / tree).rglob("*") if p.is_file()}
        mine = {str(p.relative_to(ours / tree)): p for p in (ours / tree).rglob("*") if p.is_file()}
        compared = {n for n in theirs if Path(n).name not in pip_records and n != "usr/local/bin/imagewarm"}
        assert compared == {
            n for n in mine if Path(n).name not in pip_records and n != "usr/local/bin/imagewarm"
        }
        different = [n for n in sorted(compared) if theirs[n].read_bytes() != mine[n].read_bytes()]
        assert not different, f"{tree}: {different[:10]}"
    script_text = (tmp_path / "app/usr/local/bin/imagewarm").read_text()
    assert (
        script_text.startswith("#!/usr/bin/python3.11\n") and "from imagewarm.cli import main" in script_text
    )
