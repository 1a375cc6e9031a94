"""The product image builder's pieces: deterministic trees and layers, wheel installation, the
dependency pins, the runtime's file set and the OCI archive (localcluster/productimage.py, wheels.py,
pythonruntime.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from localcluster import productimage, pythonruntime, wheels
from localcluster.images import ImageBuilder, write_oci_archive
from localcluster.wheels import WheelError


def make_tree(root: Path, order: list[str], mtime: int) -> Path:
    files = {"usr/bin/tool": b"#!/bin/true\n", "usr/lib/a.py": b"A = 1\n", "etc/passwd": b"root:x:0:0::/:\n"}
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
        path.chmod(0o775 if name.endswith("tool") else 0o600)
        os.utime(path, (mtime, mtime))
    (root / "lib").symlink_to("usr/lib")
    for special in pythonruntime.SPECIAL_DIRS:
        (root / special).mkdir(parents=True)
    return root


def layer_digest(builder: ImageBuilder, key: str, root: Path) -> str:
    return builder.layer(key, lambda tar: productimage.write_tree(tar, root)).digest


def test_the_same_tree_gives_the_same_layer_whatever_its_mtimes_and_creation_order(tmp_path: Path) -> None:
    builder = ImageBuilder(tmp_path / "images")
    one = make_tree(tmp_path / "one", ["usr/bin/tool", "usr/lib/a.py", "etc/passwd"], 1_000)
    two = make_tree(tmp_path / "two", ["etc/passwd", "usr/lib/a.py", "usr/bin/tool"], 2_000_000)
    assert layer_digest(builder, "one", one) == layer_digest(builder, "two", two)
    (two / "usr/lib/a.py").write_bytes(b"A = 2\n")
    assert layer_digest(builder, "three", two) != layer_digest(builder, "one", one)


def test_layer_entries_are_sorted_root_owned_and_have_normalised_modes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", ["usr/bin/tool", "usr/lib/a.py", "etc/passwd"], 5)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        productimage.write_tree(tar, root)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        members = {m.name: m for m in tar}
    names = list(members)
    assert names == sorted(names)
    assert members["usr/bin/tool"].mode == 0o755 and members["etc/passwd"].mode == 0o644
    assert members["lib"].issym() and members["lib"].linkname == "usr/lib"
    assert members["tmp"].mode == 0o1777
    assert (members["home/nonroot"].uid, members["home/nonroot"].mode) == (65532, 0o700)
    assert {m.mtime for m in members.values()} == {0}
    assert {m.uid for n, m in members.items() if n != "home/nonroot"} == {0}


def wheel(tmp_path: Path, files: dict[str, bytes], *, tamper: str | None = None) -> Path:
    """A wheel of ``files`` (names relative to the wheel root) with a RECORD of their hashes."""
    dist_info = "demo_pkg-1.0.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        f"{dist_info}/entry_points.txt": b"[console_scripts]\ndemo = demo_pkg.cli:main\n",
    }

    def digest(data: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},{digest(d)},{len(d)}\n" for n, d in files.items()) + f"{dist_info}/RECORD,,\n"
    path = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data + (b"# changed\n" if name == tamper else b""))
        archive.writestr(f"{dist_info}/RECORD", record)
    return path


def test_a_wheel_installs_into_debians_site_directory_with_its_console_script(tmp_path: Path) -> None:
    files = {"demo_pkg/__init__.py": b"", "demo_pkg/cli.py": b"def main():\n    return 0\n",
             "demo_pkg-1.0.data/purelib/extra.py": b"X = 1\n"}  # fmt: skip
    wheels.install_wheel(wheel(tmp_path, files), tmp_path / "root", console_scripts=True)
    site = tmp_path / "root" / pythonruntime.SITE_PACKAGES
    assert (site / "demo_pkg/cli.py").read_bytes() == files["demo_pkg/cli.py"]
    assert (site / "extra.py").read_bytes() == b"X = 1\n"
    assert (site / "demo_pkg-1.0.dist-info/INSTALLER").is_file()
    script = tmp_path / "root/usr/local/bin/demo"
    assert script.read_text().splitlines() == [
        "#!/usr/bin/python3.11", "import sys", "from demo_pkg.cli import main", "sys.exit(main())"
    ]  # fmt: skip
    assert script.stat().st_mode & 0o111


def test_a_dependencys_console_scripts_are_left_out(tmp_path: Path) -> None:
    wheels.install_wheel(wheel(tmp_path, {"demo_pkg/__init__.py": b""}), tmp_path / "root")
    assert not (tmp_path / "root/usr/local/bin").exists()


def test_a_wheel_whose_file_does_not_match_its_record_is_refused(tmp_path: Path) -> None:
    path = wheel(tmp_path, {"demo_pkg/__init__.py": b""}, tamper="demo_pkg/__init__.py")
    with pytest.raises(WheelError, match="does not match its RECORD"):
        wheels.install_wheel(path, tmp_path / "root")


def test_dependencies_are_pinned_to_the_installed_versions_with_markers_and_extras() -> None:
    from importlib.metadata import version

    pins = wheels.pinned_dependencies(["flask>=3.0", 'pytest; python_version < "3"'])
    assert {"flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "click", "blinker"} <= set(pins)
    assert pins["werkzeug"] == version("werkzeug")
    assert "pytest" not in pins


def test_a_missing_or_unsatisfied_dependency_says_what_to_do() -> None:
    with pytest.raises(WheelError, match=r"not installed here: run ./dev.sh setup"):
        wheels.pinned_dependencies(["no-such-distribution-imagewarm>=1"])
    with pytest.raises(WheelError, match="does not satisfy"):
        wheels.pinned_dependencies(["flask<0.1"])


def test_host_entries_reproduce_every_symlink_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/libz.so.1.2").write_bytes(b"\x7fELF")
    (tmp_path / "usr/lib/libz.so.1").symlink_to("libz.so.1.2")
    (tmp_path / "lib").symlink_to("usr/lib")
    entries = pythonruntime.host_entries(tmp_path / "lib/libz.so.1")
    base = str(tmp_path)[1:]
    assert [(e.path, e.link, e.source) for e in entries] == [
        (f"{base}/lib", "usr/lib", None),
        (f"{base}/usr/lib/libz.so.1", "libz.so.1.2", None),
        (f"{base}/usr/lib/libz.so.1.2", None, tmp_path / "usr/lib/libz.so.1.2"),
    ]


def test_the_runtime_holds_the_interpreter_its_libraries_and_a_minimal_etc() -> None:
    entries = {e.path: e for e in pythonruntime.runtime_entries()}
    assert entries["usr/bin/python3.11"].source == pythonruntime.PYTHON
    assert "usr/lib/python3.11/os.py" in entries
    assert entries["lib64"].link == "usr/lib64"  # merged /usr, as Debian has it
    for library in ("libc.so.6", "libssl.so.3", "libcrypto.so.3", "libz.so.1", "libffi.so.8"):
        assert f"usr/lib/x86_64-linux-gnu/{library}" in entries, library
    assert not [p for p in entries if "/test/" in p or "/tkinter/" in p or "/idlelib/" in p]
    assert not [p for p in entries if "_testcapi" in p or "readline" in p]
    passwd = entries["etc/passwd"].data
    assert passwd is not None and b"nonroot:x:65532:65532:" in passwd
    # Scanners see the distribution and the Debian packages the files come from, at their versions.
    assert entries["etc/os-release"].link == "../usr/lib/os-release" and "usr/lib/os-release" in entries
    for package in ("python3.11-minimal", "libpython3.11-stdlib", "libssl3", "libc6", "zlib1g"):
        record = entries[f"var/lib/dpkg/status.d/{package}"].data
        assert record is not None and record.startswith(f"Package: {package}\n".encode()), package
        version = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
        )
        assert f"\nVersion: {version.stdout}\n".encode() in record
    # The CA bundle is Debian's Mozilla set, nothing this machine added to /etc/ssl/certs.
    bundle = entries[pythonruntime.CA_BUNDLE].data
    assert bundle is not None
    assert bundle.count(b"BEGIN CERTIFICATE") == len(list(pythonruntime.CA_CERTIFICATES.glob("*.crt")))


def test_the_oci_archive_names_the_image_for_ctr_import(tmp_path: Path) -> None:
    builder = ImageBuilder(tmp_path / "images")
    root = make_tree(tmp_path / "tree", ["usr/bin/tool"], 0)
    layer = builder.layer("tree", lambda tar: productimage.write_tree(tar, root))
    image = builder.assemble([layer], productimage.image_config("9.9.9", "abc"))
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    write_oci_archive(image, first, "docker.io/library/imagewarm:9.9.9")
    write_oci_archive(image, second, "docker.io/library/imagewarm:9.9.9")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
    (descriptor,) = index["manifests"]
    assert descriptor["digest"] == image.digest
    assert descriptor["annotations"] == {
        "io.containerd.image.name": "docker.io/library/imagewarm:9.9.9",
        "org.opencontainers.image.ref.name": "9.9.9",
    }
    for digest in [image.digest, image.config.digest, layer.digest]:
        assert f"blobs/sha256/{digest[7:]}" in names
    assert image.config_json()["config"]["Entrypoint"] == ["imagewarm"]


def test_a_missing_runtime_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(pythonruntime.RuntimeFilesError, match=r"apt-get install python3\.11"):
        pythonruntime.package_files("python3.11-no-such-package")
    monkeypatch.setattr(pythonruntime, "PYTHON", tmp_path / "python3.11")
    with pytest.raises(pythonruntime.RuntimeFilesError, match=r"python3.11 not found: apt-get install"):
        pythonruntime.runtime_entries()
