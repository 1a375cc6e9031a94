"""Python wheels for the product image: the runtime dependencies pinned to the versions installed
here, their wheels fetched from PyPI once (``pip wheel``), the imagewarm wheel built from the source
tree (setuptools, as ``python -m build``), and wheels installed into an image tree as pip would
(every file checked against the wheel's RECORD)."""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from imagewarm.errors import ImagewarmError
from localcluster import pythonruntime

Progress = Callable[[str], None]


class WheelError(ImagewarmError, RuntimeError):
    """A wheel cannot be resolved, fetched, built or installed; the message says what to do."""


def pinned_dependencies(requires: Sequence[str]) -> dict[str, str]:
    """``{name: version}`` of every distribution ``requires`` needs at run time, as installed here
    (the versions the tests use), markers evaluated for this interpreter (the image's is the same
    CPython 3.11 on the same platform). Raises WheelError for a missing or wrong version."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(Requirement(r), "") for r in requires]
    while queue:
        requirement, parent_extra = queue.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": parent_extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise WheelError(
                f"{requirement} is needed at run time but not installed here: run ./dev.sh setup"
            ) from None
        if not requirement.specifier.contains(dist.version, prereleases=True):
            raise WheelError(f"installed {name} {dist.version} does not satisfy {requirement}")
        pins[name] = dist.version
        extras = frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for text in dist.requires or []:
            child = Requirement(text)
            contexts = ["", *sorted(extras)]
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in contexts):
                child.marker = None  # evaluated here, in its parent's extras
                queue.append((child, ""))
    return dict(sorted(pins.items()))


def _best_wheel(wheelhouse: Path, name: str, version: str) -> Path | None:
    """The wheel of ``name==version`` in ``wheelhouse`` that pip would prefer on this interpreter."""
    rank = {tag: i for i, tag in enumerate(sys_tags())}
    best: tuple[int, str, Path] | None = None
    for path in wheelhouse.glob("*.whl"):
        wheel_name, wheel_version, _, tags = parse_wheel_filename(path.name)
        if wheel_name != name or wheel_version != Version(version):
            continue
        ranks = [rank[t] for t in tags if t in rank]
        if ranks and (best is None or (min(ranks), path.name) < best[:2]):
            best = (min(ranks), path.name, path)
    return best[2] if best else None


def _fetch(pip_args: Sequence[str], specs: Sequence[str], wheelhouse: Path) -> None:
    """`pip <pip_args> <dir> <specs>` into a temporary directory, then its wheels moved into
    ``wheelhouse`` (a fetch cut short leaves nothing half there). Raises WheelError."""
    with tempfile.TemporaryDirectory(dir=wheelhouse, prefix=".fetch-") as tmp:
        argv = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *pip_args[:1],
                "--progress-bar", "off", *pip_args[1:], tmp, *specs]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WheelError(
                f"pip could not fetch {' '.join(specs)} (is PyPI reachable?):\n{proc.stderr[-3000:]}"
            )
        for fetched in Path(tmp).glob("*.whl"):
            os.replace(fetched, wheelhouse / fetched.name)


def dependency_wheels(pins: dict[str, str], wheelhouse: Path, progress: Progress) -> list[Path]:
    """A wheel for each pin, fetched from PyPI (``pip wheel --no-deps``: PyPI's wheel as published,
    or built from its sdist) into ``wheelhouse`` when missing there."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    missing = [f"{n}=={v}" for n, v in pins.items() if _best_wheel(wheelhouse, n, v) is None]
    if missing:
        progress(f"fetching {len(missing)} wheel(s) from PyPI: {' '.join(missing)}")
        _fetch(["wheel", "--no-deps", "-w"], missing, wheelhouse)
    wheels = []
    for name, version in pins.items():
        wheel = _best_wheel(wheelhouse, name, version)
        if wheel is None:
            raise WheelError(f"no wheel of {name}=={version} for this platform in {wheelhouse}")
        wheels.append(wheel)
    return wheels


def install_wheel(wheel: Path, root: Path, *, console_scripts: bool = False) -> None:
    """Install ``wheel`` below ``root`` (an image tree) as pip would into the image's site-packages,
    checking every file against the wheel's RECORD; with ``console_scripts``, its console scripts go
    to ``usr/local/bin`` (dependencies' scripts are left out: the image has one command)."""
    site = root / pythonruntime.SITE_PACKAGES
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        rows = csv.reader(archive.read(f"{dist_info}/RECORD").decode().splitlines())
        record = {row[0]: row[1] for row in rows if len(row) >= 2}
        for info in archive.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.startswith("/") or ".." in name.split("/"):
                raise WheelError(f"{wheel.name} holds an unsafe path {name!r}")
            top, _, inner = name.partition("/")
            if top.endswith(".data"):
                kind, _, inner = inner.partition("/")
                if kind == "scripts":
                    continue
                if kind not in ("purelib", "platlib"):
                    raise WheelError(f"{wheel.name} installs {kind} files: the image has no place for them")
                target = site / inner
            else:
                target = site / name
            data = archive.read(info)
            algorithm, _, expected = record.get(name, "").partition("=")
            if expected:
                actual = hashlib.new(algorithm, data).digest()
                if base64.urlsafe_b64encode(actual).rstrip(b"=").decode() != expected:
                    raise WheelError(f"{wheel.name}: {name} does not match its RECORD hash")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
    (site / dist_info / "INSTALLER").write_text("imagewarm-image\n")
    if console_scripts:
        bin_dir = root / "usr/local/bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for entry in metadata.PathDistribution(site / dist_info).entry_points.select(group="console_scripts"):
            function = entry.attr.split(".")[0]
            script = bin_dir / entry.name
            body = f"import sys\nfrom {entry.module} import {function}\nsys.exit({entry.attr}())\n"
            script.write_text(f"#!{pythonruntime.PYTHON}\n{body}")
            script.chmod(0o755)


def default_wheelhouse() -> Path:
    """Where fetched wheels are kept between runs (``~/.cache/imagewarm/images/wheels``)."""
    from localcluster import binaries

    return binaries.cache_root() / "images" / "wheels"


def backend_requirements(root: Path) -> list[str]:
    """The build backend's requirements of the project at ``root`` (pyproject ``build-system``)."""
    with (root / "pyproject.toml").open("rb") as file:
        return list(tomllib.load(file)["build-system"]["requires"])


def backend_wheels(requirements: Sequence[str], wheelhouse: Path, progress: Progress) -> None:
    """Make sure ``wheelhouse`` holds a wheel satisfying each of ``requirements`` (the build
    backend), fetching from PyPI what is missing: the wheel is then built offline from it."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    missing = []
    for text in requirements:
        wanted = Requirement(text)
        have = [parse_wheel_filename(p.name) for p in wheelhouse.glob("*.whl")]
        if not any(
            n == canonicalize_name(wanted.name) and wanted.specifier.contains(v) for n, v, _, _ in have
        ):
            missing.append(text)
    if not missing:
        return
    progress(f"fetching the build backend from PyPI: {' '.join(missing)}")
    _fetch(["download", "--only-binary=:all:", "--no-deps", "-d"], missing, wheelhouse)


def build_wheel(root: Path, files: Sequence[str], out: Path, wheelhouse: Path | None = None) -> Path:
    """The imagewarm wheel, built by setuptools in an isolated build environment (``pip wheel``, the
    same backend and requirements as ``python -m build``) from a copy of ``files``, offline: the
    backend comes from ``wheelhouse`` (``backend_wheels`` put it there)."""
    wheelhouse = wheelhouse or default_wheelhouse()
    backend_wheels(backend_requirements(root), wheelhouse, lambda _: None)
    with tempfile.TemporaryDirectory(prefix="iw-src-") as tmp:
        for name in files:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, Path(tmp) / name)
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                "--no-index", "--find-links", str(wheelhouse), "-w", str(out), tmp]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True)
    wheels = sorted(out.glob("imagewarm-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise WheelError(f"building the imagewarm wheel failed:\n{proc.stderr[-3000:]}")
    return wheels[0]
