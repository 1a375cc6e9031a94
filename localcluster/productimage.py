"""The product image (every subcommand, ``ENTRYPOINT ["imagewarm"]``) built on this machine without
pulling a base image, as an OCI archive that ``ctr -n k8s.io images import`` accepts.

    image = build_product_image()          # ProductImage: .archive, .reference, .digest
    import_into(cluster, image)            # every node's containerd; pods use image.reference

It is the equivalent of the repository's ``Containerfile`` (same entrypoint, user, env, labels and
ports; ``tests/unit/test_containerfile.py`` compares them), in three layers so that a code change
rebuilds only the small top one:

1. runtime: Debian's python3.11 and the libraries it loads, a minimal ``/etc`` (``pythonruntime``);
2. dependencies: the runtime dependencies at exactly the versions installed here (what the tests
   ran), from PyPI's wheels (``wheels``: kept in ``~/.cache/imagewarm/images/wheels``);
3. imagewarm: the wheel ``pip wheel .`` builds from the source tree (setuptools, as
   ``python -m build`` does), installed with its ``imagewarm`` console script.

Every ``.py`` is compiled to an unchecked-hash ``.pyc`` by the image's own interpreter (the image is
immutable, so imports never stat sources, and compiled modules need no writable directory). Layers
are deterministic tars (sorted, mtime 0, root-owned), so the same inputs give the same digest; each
is cached under a key hashing its inputs (host files' sizes and mtimes, wheel hashes, source file
contents), so a rebuild with nothing changed takes about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagewarm.command import table
from imagewarm.errors import ImagewarmError
from localcluster import binaries, pythonruntime
from localcluster.images import Image, ImageBuilder, Layer, tar_info, write_oci_archive
from localcluster.wheels import (
    WheelError,
    backend_requirements,
    backend_wheels,
    build_wheel,
    default_wheelhouse,
    dependency_wheels,
    install_wheel,
    pinned_dependencies,
)

if TYPE_CHECKING:
    from localcluster.cluster import Cluster, Node

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "imagewarm"
# What goes into the wheel (pyproject's packages, its metadata); a change elsewhere rebuilds nothing.
SOURCE_PATHS = ("pyproject.toml", "README.md", "imagewarm", "proxy", "webhook", "controller", "localcluster")
USER = f"{pythonruntime.NONROOT_UID}:{pythonruntime.NONROOT_UID}"
ENTRYPOINT = ("imagewarm",)
CMD = ("--help",)
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
    "LANG=C.UTF-8",
    "PYTHONUNBUFFERED=1",
    "PYTHONDONTWRITEBYTECODE=1",
)
# proxy (--listen 0.0.0.0:7439), webhook (8443, TLS), the controller's metrics and health (8080).
PORTS = ("7439/tcp", "8080/tcp", "8443/tcp")
LICENSE = "Apache-2.0"
_FORMAT = "2"  # bump when the layers a given set of inputs produces change
# gzip 9 makes the dependencies layer 1.8% smaller than 6, and takes 5 times longer (19 s vs 4 s).
_GZIP_LEVEL = 6
Progress = Callable[[str], None]


class ProductImageError(ImagewarmError, RuntimeError):
    """The image cannot be built; the message says what failed and what to do."""


@dataclass(frozen=True)
class ProductImage:
    """The built image: its OCI ``archive``, manifest ``digest``, and ``reference`` = what pods and
    the chart's ``image.repository:image.tag`` say (``imagewarm:<version>``); containerd knows it as
    ``name`` (``docker.io/library/imagewarm:<version>``) after ``import_into``."""

    archive: Path
    repository: str
    tag: str
    digest: str
    image: Image
    layer_names: tuple[str, ...]
    uncompressed_sizes: tuple[int, ...]

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def name(self) -> str:
        return f"docker.io/library/{self.reference}"

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.image.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(self.uncompressed_sizes)


def _print_progress(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join([_FORMAT, *parts]).encode()).hexdigest()[:24]


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


# --- the project ---------------------------------------------------------------------------------


def project(root: Path = ROOT) -> dict[str, Any]:
    """``[project]`` of ``root/pyproject.toml``; its version must be ``imagewarm.__version__``."""
    from imagewarm import __version__

    table_ = dict(tomllib.loads((root / "pyproject.toml").read_text())["project"])
    if table_["version"] != __version__:
        raise ProductImageError(
            f"pyproject.toml says version {table_['version']} but imagewarm.__version__ is "
            f"{__version__}: make them the same"
        )
    return table_


def revision(root: Path = ROOT) -> str:
    """The git commit of ``root`` (``-dirty`` when the packaged sources differ from it), or
    ``unknown`` outside a git checkout."""
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *SOURCE_PATHS],
                            capture_output=True, text=True)  # fmt: skip
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def image_config(version: str, revision: str) -> dict[str, Any]:
    """The image config (``config`` of the OCI config blob): what the Containerfile declares."""
    return {
        "User": USER,
        "Entrypoint": list(ENTRYPOINT),
        "Cmd": list(CMD),
        "Env": list(ENV),
        "WorkingDir": "/",
        "ExposedPorts": {port: {} for port in PORTS},
        "Labels": {
            "org.opencontainers.image.title": REPOSITORY,
            "org.opencontainers.image.description": "imagewarm: the node proxy, admission webhook and "
            "controller (one image, one command per component)",
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.revision": revision,
            "org.opencontainers.image.licenses": LICENSE,
            "org.opencontainers.image.source": "https://github.com/imagewarm/imagewarm",
        },
    }


def source_files(root: Path = ROOT) -> list[str]:
    """The files the wheel is built from: tracked or new (not ignored) under SOURCE_PATHS."""
    proc = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
         *SOURCE_PATHS], capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode == 0:
        names = proc.stdout.split("\0")
    else:  # not a git checkout: everything under the paths but caches
        names = [str(p.relative_to(root)) for s in SOURCE_PATHS for p in (root / s).rglob("*")]
        names += [s for s in SOURCE_PATHS if (root / s).is_file()]
    return sorted({n for n in names if n and "__pycache__" not in n and (root / n).is_file()})


# --- trees and layers ----------------------------------------------------------------------------


def stage(entries: Sequence[pythonruntime.Entry], root: Path) -> None:
    """Write ``entries`` below ``root``: files copied, data written, symlinks made."""
    for entry in entries:
        path = root / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if entry.directory:
            path.mkdir(exist_ok=True)
        elif entry.link is not None:
            path.symlink_to(entry.link)
        elif entry.data is not None:
            path.write_bytes(entry.data)
        else:
            assert entry.source is not None
            shutil.copyfile(entry.source, path)
            path.chmod(0o755 if entry.source.stat().st_mode & 0o111 else 0o644)


def compile_tree(root: Path, directory: str) -> None:
    """Compile every ``.py`` under ``root/directory`` with the image's interpreter to unchecked-hash
    ``.pyc`` recording its image path. Deterministic (PYTHONHASHSEED=0, no timestamps)."""
    script = (
        "import compileall, py_compile, sys\n"
        "ok = compileall.compile_dir(sys.argv[1], quiet=1, stripdir=sys.argv[2], prependdir='/', workers=0,"
        " invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
        "sys.exit(0 if ok else 1)\n"
    )
    argv = [str(pythonruntime.PYTHON), "-I", "-c", script, str(root / directory), str(root)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin"}
    )
    if proc.returncode != 0:
        raise ProductImageError(f"compiling {directory} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def write_tree(tar: tarfile.TarFile, root: Path) -> None:
    """Add ``root``'s tree to ``tar``: sorted, root-owned (except pythonruntime.SPECIAL_DIRS),
    directories 0755, files 0755 or 0644, mtime 0: the same tree always gives the same bytes."""
    paths = []
    for directory, dirs, files in os.walk(root):
        paths += [Path(directory, name) for name in dirs + files]
    for path in sorted(paths, key=lambda p: str(p.relative_to(root))):
        name = str(path.relative_to(root))
        if path.is_symlink():
            tar.addfile(tar_info(name, tarfile.SYMTYPE, 0o777, link=os.readlink(path)))
        elif path.is_dir():
            mode, uid = pythonruntime.SPECIAL_DIRS.get(name, (0o755, 0))
            info = tar_info(name, tarfile.DIRTYPE, mode)
            if uid:
                info.uid = info.gid = uid
                info.uname = info.gname = "nonroot"
            tar.addfile(info)
        else:
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            with path.open("rb") as file:
                tar.addfile(tar_info(name, tarfile.REGTYPE, mode, path.stat().st_size), file)


def runtime_tree(entries: Sequence[pythonruntime.Entry], tree: Path) -> None:
    """Layer 1 below ``tree``: the runtime ``entries``, the standard library compiled."""
    stage(entries, tree)
    compile_tree(tree, "usr/lib/python3.11")


def dependencies_tree(wheels: Sequence[Path], tree: Path) -> None:
    """Layer 2 below ``tree``: ``wheels`` installed and compiled."""
    for wheel in wheels:
        install_wheel(wheel, tree)
    compile_tree(tree, pythonruntime.SITE_PACKAGES)


def imagewarm_tree(root: Path, files: Sequence[str], tree: Path) -> None:
    """Layer 3 below ``tree``: the wheel of ``files`` of ``root`` installed, with its console script,
    and compiled."""
    with tempfile.TemporaryDirectory(prefix="iw-wheel-") as out:
        install_wheel(build_wheel(root, files, Path(out)), tree, console_scripts=True)
    compile_tree(tree, pythonruntime.SITE_PACKAGES)


def _tree_layer(builder: ImageBuilder, key: str, fill: Callable[[Path], None]) -> Layer:
    def write(tar: tarfile.TarFile) -> None:
        with tempfile.TemporaryDirectory(prefix="iw-layer-") as tmp:
            fill(Path(tmp))
            write_tree(tar, Path(tmp))

    return builder.layer(key, write, level=_GZIP_LEVEL)


def _extension_modules(wheels: Sequence[Path], directory: Path) -> list[Path]:
    """Extract the shared objects of ``wheels`` below ``directory`` (for ``ldd``); their paths."""
    found = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.endswith(".so") or ".so." in name.rsplit("/", 1)[-1]:
                    found.append(Path(archive.extract(name, directory / wheel.stem)))
    return found


# --- the image -----------------------------------------------------------------------------------


def build_product_image(
    output: Path | None = None,
    *,
    progress: Progress | None = None,
    workdir: Path | None = None,
    root: Path = ROOT,
) -> ProductImage:
    """Build (or reuse) the product image and return it; its archive is ``output`` when given, else
    a file in the cache. ``workdir``: the image builder's cache (default
    ``~/.cache/imagewarm/images``). Raises ProductImageError, WheelError or RuntimeFilesError saying
    what failed and what to do."""
    report = progress or _print_progress
    started = time.monotonic()
    builder = ImageBuilder(workdir or binaries.cache_root() / "images")
    info = project(root)
    version = str(info["version"])
    pins = pinned_dependencies(list(info.get("dependencies", [])))
    wheels = dependency_wheels(pins, builder.workdir / "wheels", report)
    layers: list[Layer] = []

    def make(name: str, key: str, what: str, fill: Callable[[Path], None]) -> None:
        begun = time.monotonic()
        built = not builder.has_layer(key)
        if built:
            report(f"layer {len(layers) + 1}/3 {name}: building from {what}")
        layer = _tree_layer(builder, key, fill)
        how = f"built in {time.monotonic() - begun:.1f}s" if built else "cached"
        sizes = f"{_mib(layer.size)} ({_mib(layer.tar_size)} uncompressed)"
        report(f"layer {len(layers) + 1}/3 {name}: {sizes}, {how}")
        layers.append(layer)

    with tempfile.TemporaryDirectory(prefix="iw-so-") as tmp:
        entries = pythonruntime.runtime_entries(_extension_modules(wheels, Path(tmp)), provided=[Path(tmp)])

    runtime_key = f"product-runtime-{_digest(e.signature() for e in entries)}"
    runtime = functools.partial(runtime_tree, entries)
    make("runtime", runtime_key, f"{pythonruntime.PYTHON} and {len(entries)} files", runtime)
    wheel_hashes = [f"{w.name} {hashlib.sha256(w.read_bytes()).hexdigest()}" for w in wheels]
    dependencies = functools.partial(dependencies_tree, wheels)
    make("dependencies", f"product-deps-{_digest(wheel_hashes)}", f"{len(wheels)} wheels", dependencies)
    files = source_files(root)
    source_hashes = [f"{n} {hashlib.sha256((root / n).read_bytes()).hexdigest()}" for n in files]
    app = functools.partial(imagewarm_tree, root, files)
    make("imagewarm", f"product-app-{_digest(source_hashes)}", f"its wheel ({len(files)} files)", app)
    image = builder.assemble(layers, image_config(version, revision(root)))
    archive = builder.workdir / "product" / f"imagewarm-{version}-{image.digest[7:19]}.tar"
    product = ProductImage(archive=archive, repository=REPOSITORY, tag=version, digest=image.digest,
                           image=image, layer_names=("runtime", "dependencies", "imagewarm"),
                           uncompressed_sizes=tuple(layer.tar_size for layer in layers))  # fmt: skip
    if not archive.exists():
        write_oci_archive(image, archive, product.name)
        _prune_archives(archive.parent, keep=archive)
    if output is not None:
        target = Path(output).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, target)
        product = dataclasses.replace(product, archive=target)
    report(f"{product.reference} {product.digest} in {time.monotonic() - started:.1f}s: {product.archive}")
    return product


def _prune_archives(directory: Path, keep: Path, newest: int = 4, older_than: float = 3600) -> None:
    """Delete cached archives but the ``newest`` few (each commit makes one: its revision label),
    sparing any written in the last ``older_than`` seconds (another build may be importing it)."""
    archives = sorted(directory.glob("imagewarm-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    cutoff = time.time() - older_than
    for old in archives[newest:]:
        if old != keep and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)


def import_into(cluster: Cluster, image: ProductImage) -> None:
    """Import ``image`` into the ``k8s.io`` namespace of every node's containerd (all nodes at once;
    unpacked for the native snapshotter, about 7 s each here), so pods with
    ``image: <image.reference>`` and ``imagePullPolicy: IfNotPresent`` (or Never) start without a
    pull. Raises ContainerdError when a node refuses it, ProductImageError when it is not listed."""

    def one(node: Node) -> None:
        node.containerd.ctr(
            "images", "import", "--snapshotter", "native", str(image.archive), namespace="k8s.io"
        )
        listed = node.containerd.ctr("images", "ls", "-q", namespace="k8s.io").stdout.split()
        if image.name not in listed:
            raise ProductImageError(f"{node.name}: {image.name} not listed after the import: {listed}")

    with ThreadPoolExecutor(max_workers=len(cluster.nodes) or 1) as pool:
        for done in [pool.submit(one, node) for node in cluster.nodes]:
            done.result()


def summary(image: ProductImage) -> str:
    rows = [
        [name, _mib(layer.size), _mib(size), layer.digest[:19]]
        for name, layer, size in zip(
            image.layer_names, image.image.layers, image.uncompressed_sizes, strict=True
        )
    ]
    rows.append(["total", _mib(image.compressed_size), _mib(image.uncompressed_size), ""])
    details = [
        ["reference", image.reference],
        ["containerd name", image.name],
        ["manifest digest", image.digest],
        ["archive", str(image.archive)],
        ["import it", f"ctr -n k8s.io images import --snapshotter native {image.archive}"],
    ]
    return (table("layers", ["layer", "compressed", "uncompressed", "digest"], rows) + "\n\n"
            + table("image", ["what", "value"], details))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./dev.sh image", description="Build the product image as an OCI archive."
    )
    parser.add_argument(
        "--output", type=Path, help="where to write the archive (default dist/imagewarm-<version>.tar)"
    )
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="only fetch (once) the wheels the image is built from, so later builds, and the tests, "
        "need no network: ./dev.sh setup does this",
    )
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            wheelhouse = default_wheelhouse()
            pins = pinned_dependencies(list(project()["dependencies"]))
            dependency_wheels(pins, wheelhouse, _print_progress)
            backend_wheels(backend_requirements(ROOT), wheelhouse, _print_progress)
            return 0
        output = args.output or ROOT / "dist" / f"imagewarm-{project()['version']}.tar"
        image = build_product_image(output)
    except (ProductImageError, WheelError, pythonruntime.RuntimeFilesError) as exc:
        print(f"./dev.sh image: {exc}", file=sys.stderr)
        return 1
    print(summary(image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
