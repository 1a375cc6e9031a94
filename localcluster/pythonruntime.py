"""The product image's runtime root filesystem, taken from this Debian 12 machine without pulling.

The interpreter is Debian's own python3.11 (``/usr/bin/python3.11``): Debian builds it with PGO and
LTO and links libpython statically into it (on this machine it runs pure-Python code ~20% faster
than pyenv's plain ``-O3 --enable-shared`` build), and it is exactly what the Containerfile's base,
``gcr.io/distroless/python3-debian12``, is made of. Its files are the ones dpkg lists for the Debian
packages below (minus tests, GUI and terminal modules), plus every shared library that the
interpreter, the standard library's and the dependency wheels' extension modules load (``ldd``),
with the host's symlink chains (merged ``/usr``: ``/lib64`` -> ``usr/lib64`` ...) reproduced, and
the dpkg records of the packages they come from plus ``/etc/os-release``, so image scanners see the
Debian versions inside.

The CA bundle is made from the Mozilla certificates of Debian's ``ca-certificates`` package, not
copied from ``/etc/ssl/certs``: that file may hold certificates added on this machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PYTHON = Path("/usr/bin/python3.11")
PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
OS_RELEASE = Path("/etc/os-release")
CA_CERTIFICATES = Path("/usr/share/ca-certificates/mozilla")
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path, like pip's target
NONROOT_UID = 65532
# Debian's package database: one ``<package>[:<arch>].list`` of installed paths per package.
DPKG_INFO = Path("/var/lib/dpkg/info")

# Parts of the packages a server never loads: tests, docs, GUI, terminal UI, dbm/nis bindings.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "curses",
                  "pydoc_data", "lib2to3", "ensurepip"}  # fmt: skip
_EXCLUDED_PREFIXES = ("usr/share/", "usr/lib/binfmt.d/")
_EXCLUDED_MODULES = re.compile(
    r"^(_test\w*|_ctypes_test|_xxtestfuzz|xxlimited\w*|_curses\w*|readline|_dbm|_gdbm|nis|ossaudiodev"
    r"|_tkinter)\.cpython-"
)

_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\n"
    f"nonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    "etc/group": f"root:x:0:\nnonroot:x:{NONROOT_UID}:\nnobody:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    "networks: files\nprotocols: files\nservices: files\n",
}
# Where OpenSSL (OPENSSLDIR /usr/lib/ssl on Debian) looks for the bundle, as Debian links it.
_SYMLINKS = {"usr/lib/ssl/cert.pem": "/" + CA_BUNDLE, "usr/lib/ssl/certs": "/etc/ssl/certs",
             "usr/bin/python3": "python3.11"}  # fmt: skip
# Directories with a mode or owner of their own: (mode, uid).
SPECIAL_DIRS = {"tmp": (0o1777, 0), "root": (0o700, 0), "home/nonroot": (0o700, NONROOT_UID)}


class RuntimeFilesError(RuntimeError):
    """The runtime cannot be assembled from this machine; the message says what to install."""


@dataclass(frozen=True)
class Entry:
    """One path of the image (relative, no leading ``/``): a host file to copy, literal ``data``, a
    symlink to ``link``, or a directory."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    directory: bool = False

    def signature(self) -> str:
        """What identifies this entry's content, for cache keys: host file size and mtime, or data."""
        if self.source is not None:
            stat = self.source.stat()
            return f"f {self.path} {self.source} {stat.st_size} {stat.st_mtime_ns} {stat.st_mode:o}"
        if self.data is not None:
            return f"d {self.path} {hashlib.sha256(self.data).hexdigest()}"
        return f"l {self.path} {self.link}" if self.link is not None else f"D {self.path}"


def package_files(package: str) -> list[Path]:
    """Paths dpkg installed for ``package``; raises RuntimeFilesError when it is not installed."""
    for name in (f"{package}:amd64.list", f"{package}.list", f"{package}:arm64.list"):
        listing = DPKG_INFO / name
        if listing.is_file():
            return [Path(line) for line in listing.read_text().splitlines() if line not in ("", "/.")]
    raise RuntimeFilesError(
        f"Debian package {package} is not installed: the image's runtime is taken from it "
        f"(apt-get install python3.11 ca-certificates)"
    )


def _excluded(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return (
        path.startswith(_EXCLUDED_PREFIXES)
        or any(part in _EXCLUDED_DIRS for part in parts[:-1])
        or bool(_EXCLUDED_MODULES.match(parts[-1]))
    )


def host_entries(path: Path) -> list[Entry]:
    """``path`` as the image must hold it: every symlink on the way (``/lib`` -> ``usr/lib``, a
    library's soname -> its file) as a symlink entry, then the file it resolves to."""
    entries: list[Entry] = []
    current = PurePosixPath("/")
    pending = list(PurePosixPath(path).parts[1:])
    hops = 0
    while pending:
        current = current / pending.pop(0)
        if os.path.islink(current):
            hops += 1
            if hops > 40:
                raise RuntimeFilesError(f"too many symlinks resolving {path}")
            target = os.readlink(current)
            entries.append(Entry(str(current)[1:], link=target))
            base = PurePosixPath("/") if target.startswith("/") else current.parent
            resolved = PurePosixPath(os.path.normpath(base / target))
            pending = list(resolved.parts[1:]) + pending
            current = PurePosixPath("/")
    if not os.path.isdir(current):
        entries.append(Entry(str(current)[1:], source=Path(current)))
    return entries


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+|not found)(?: \(0x[0-9a-f]+\))?$")


def shared_libraries(elf_files: Iterable[Path], *, provided: Sequence[Path] = ()) -> list[Path]:
    """Host paths of the shared libraries ``elf_files`` load (their transitive closure, as ``ldd``
    resolves it), leaving out those under a directory in ``provided`` (a wheel's vendored
    libraries). Raises RuntimeFilesError naming a library that cannot be found."""
    found: set[Path] = set()
    for elf in sorted(set(elf_files)):
        proc = subprocess.run(["ldd", str(elf)], capture_output=True, text=True)
        if proc.returncode != 0:
            if "not a dynamic executable" in proc.stdout + proc.stderr:
                continue  # statically linked
            raise RuntimeFilesError(f"ldd {elf} failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            match = _LDD_LINE.match(line)
            if not match or "vdso" in line:
                continue
            soname, where = match.groups()
            if where == "not found":
                raise RuntimeFilesError(f"{elf} needs {soname}, which this machine does not have")
            if where.startswith("/") and not any(Path(where).is_relative_to(p) for p in provided):
                found.add(Path(where))
    return sorted(found)


def _ca_bundle() -> bytes:
    certificates = sorted(CA_CERTIFICATES.glob("*.crt"))
    if not certificates:
        raise RuntimeFilesError(f"no certificates in {CA_CERTIFICATES}: apt-get install ca-certificates")
    return b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certificates)


def package_records(paths: Iterable[Path]) -> dict[str, bytes]:
    """dpkg's status record of each Debian package owning one of ``paths``, by package name: the
    image keeps them in ``var/lib/dpkg/status.d/`` (as distroless does), so image scanners know
    which Debian versions it holds. Merged ``/usr``: dpkg records ``/lib/...`` for ``/usr/lib/...``."""
    queries = sorted({str(p) for p in paths} | {str(p)[4:] for p in paths if str(p).startswith("/usr/lib/")})
    # Exits 1 when some path is unowned (the /usr/lib or /lib spelling dpkg does not record): fine.
    listing = subprocess.run(["dpkg-query", "-S", *queries], capture_output=True, text=True).stdout
    owners: set[str] = set()
    for line in listing.splitlines():
        packages, sep, _ = line.partition(": ")
        if sep and not line.startswith("diversion "):
            owners.update(p.strip().split(":")[0] for p in packages.split(","))
    records = {}
    for name in sorted(owners):
        proc = subprocess.run(["dpkg-query", "-s", name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeFilesError(f"dpkg-query -s {name} failed: {proc.stderr.strip()}")
        records[name] = proc.stdout.encode()
    return records


def runtime_entries(extension_modules: Sequence[Path] = (), *, provided: Sequence[Path] = ()) -> list[Entry]:
    """Every path of the runtime layer: the interpreter and its standard library, the shared
    libraries it and ``extension_modules`` (the dependency wheels', whose own vendored libraries
    lie under ``provided``) need, their packages' dpkg records, a minimal ``/etc``, ``/tmp``,
    ``/root`` and ``/home/nonroot``.
    Sorted by path; no ``.pyc`` (compiled when the layer is built)."""
    if not PYTHON.is_file():
        raise RuntimeFilesError(f"{PYTHON} not found: apt-get install python3.11")
    entries: dict[str, Entry] = {}
    elf_files = [PYTHON]
    for package in PACKAGES:
        for path in package_files(package):
            relative = str(path)[1:]
            if _excluded(relative) or path.suffix == ".pyc" or (path.is_dir() and not path.is_symlink()):
                continue
            for entry in host_entries(path):
                entries.setdefault(entry.path, entry)
            if path.suffix == ".so":
                elf_files.append(path)
    for library in shared_libraries([*elf_files, *extension_modules], provided=provided):
        for entry in host_entries(library):
            entries.setdefault(entry.path, entry)
    for entry in host_entries(OS_RELEASE):  # which distribution this is, for scanners
        entries.setdefault(entry.path, entry)
    sources = [e.source for e in entries.values() if e.source is not None]
    for package, record in package_records(sources).items():
        name = f"var/lib/dpkg/status.d/{package}"
        entries[name] = Entry(name, data=record)
    for name, text in _FILES.items():
        entries[name] = Entry(name, data=text.encode())
    entries[CA_BUNDLE] = Entry(CA_BUNDLE, data=_ca_bundle())
    for name, target in _SYMLINKS.items():
        entries[name] = Entry(name, link=target)
    for name in SPECIAL_DIRS:
        entries[name] = Entry(name, directory=True)
    return [entries[name] for name in sorted(entries)]
