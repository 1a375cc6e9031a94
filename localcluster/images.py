"""Container images built locally, byte for byte deterministic, and pushed with the registry API.

``ImageBuilder(workdir)`` writes every blob once into ``<workdir>/blobs/sha256/<hex>`` (streamed,
never held in memory, so 1 GiB layers are fine) and remembers what it built under
``<workdir>/refs``, so asking again for the same image costs nothing, even from another process.
The same parameters give the same digests on every machine. ``push()`` uploads an image or index
to a registry the way a client does: HEAD to skip blobs it has, upload the rest, manifests last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform as host_platform
import random
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin

import requests

from imagewarm.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from localcluster.processes import MissingTool
from localcluster.registryauth import RegistryAuth

BUSYBOX = Path("/bin/busybox")
PAUSE_ENTRYPOINT = ("/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done")
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
CHUNK_SIZE = 4 << 20
# Bump when the bytes a given set of parameters produces change, so stale caches are not reused.
_FORMAT = "1"
# Synthetic layers are random bytes that deflate cannot shrink; "stored" deflate blocks give a
# valid gzip of the same size at disk speed instead of ~25 MB/s.
_SYNTHETIC_GZIP_LEVEL = 0
_BUSYBOX_GZIP_LEVEL = 6


@dataclass(frozen=True)
class Blob:
    """A content-addressed file: ``digest`` ("sha256:<hex>"), ``size`` in bytes, ``path`` on disk."""

    digest: str
    size: int
    media_type: str
    path: Path

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class Image:
    """A single-platform image: its exact ``manifest`` bytes, their ``digest``, config and layers."""

    manifest: bytes
    media_type: str
    digest: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def size(self) -> int:
        """Bytes a pull transfers: manifest, config and layers."""
        return len(self.manifest) + sum(b.size for b in self.blobs)

    def config_json(self) -> dict[str, Any]:
        return dict(json.loads(self.config.read_bytes()))


@dataclass(frozen=True)
class Index:
    """A multi-platform image: the index ``manifest`` bytes and the image for each platform."""

    manifest: bytes
    media_type: str
    digest: str
    images: Mapping[str, Image]

    @property
    def size(self) -> int:
        return len(self.manifest) + sum(image.size for image in self.images.values())


def host_platform_name() -> str:
    """``linux/<arch>`` of this machine, in OCI architecture names."""
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return f"linux/{arch}"


def _platform_fields(name: str) -> dict[str, str]:
    parts = name.split("/")
    if len(parts) not in (2, 3):
        raise ValueError(f"platform {name!r} must be os/arch or os/arch/variant, like linux/amd64")
    fields = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        fields["variant"] = parts[2]
    return fields


def _canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``target``."""

    def __init__(self, target: BinaryIO | None) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _SeededBytes(io.RawIOBase):
    """``size`` pseudo-random bytes from ``seed``, generated as they are read."""

    def __init__(self, seed: str, size: int) -> None:
        self.random = random.Random(seed)
        self.remaining = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        self.remaining -= n
        return self.random.randbytes(n)


@dataclass(frozen=True)
class Layer:
    """A built layer blob: ``digest`` and ``size`` of the blob as stored, ``diff_id`` and
    ``tar_size`` of its uncompressed tar (0 when recorded by an older build)."""

    digest: str
    size: int
    diff_id: str
    tar_size: int = 0


def tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    """A tar header with everything that could vary between machines pinned (mtime 0, root)."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    return info


class ImageBuilder:
    """Builds images into ``workdir`` and caches them there; safe to share between processes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.blob_dir = self.workdir / "blobs" / "sha256"
        self._tmp = self.workdir / "tmp"
        for directory in (self.blob_dir, self._tmp, self.workdir / "refs", self.workdir / "layers"):
            directory.mkdir(parents=True, exist_ok=True)
        self._memo: dict[str, Image] = {}
        self._remove_abandoned_temporaries()

    def _remove_abandoned_temporaries(self, older_than: float = 3600) -> None:
        """Delete partial files a killed build left behind (old enough not to be in progress)."""
        cutoff = time.time() - older_than
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()

    # --- public builders -----------------------------------------------------------------------

    def synthetic(
        self,
        layers: int = 2,
        layer_size: int = 1 << 20,
        compressed: bool = True,
        seed: int = 0,
        oci: bool = True,
        *,
        platform: str | None = None,
    ) -> Image:
        """An image of ``layers`` layers, each a tar holding one file of ``layer_size`` seeded random
        bytes (incompressible). ``compressed``: gzip layers; ``oci``: OCI media types, else Docker
        schema2. Not runnable (no binaries); for transfer and cache tests and benchmarks.
        """
        if layers < 0 or layer_size < 0:
            raise ValueError("layers and layer_size must be >= 0")
        platform = platform or host_platform_name()
        key = f"synthetic-l{layers}-b{layer_size}-{'gz' if compressed else 'tar'}-s{seed}"
        key += f"-{'oci' if oci else 'docker'}-{platform.replace('/', '_')}"

        def build() -> Image:
            built = [self._synthetic_layer(seed, i, layer_size, compressed) for i in range(layers)]
            return self._image(built, compressed, oci, platform, {"Env": list(DEFAULT_ENV)})

        return self._cached(key, build)

    def busybox(
        self,
        entrypoint: Sequence[str] | None = None,
        cmd: Sequence[str] | None = None,
        *,
        platform: str | None = None,
        data_size: int = 0,
    ) -> Image:
        """A runnable Docker schema2 image: static busybox with every applet linked in ``/bin``.

        Without ``entrypoint``/``cmd`` it runs ``sh``. Built for the host's architecture (it is
        the host's ``/bin/busybox``); ``platform`` only relabels it, for index tests. ``data_size``
        adds a second layer of that many seeded random bytes (a realistically heavy image).
        """
        if not BUSYBOX.is_file():
            raise MissingTool(f"{BUSYBOX} not found: install the Debian package busybox-static")
        platform = platform or host_platform_name()
        stat = BUSYBOX.stat()
        source = f"{stat.st_size}-{stat.st_mtime_ns}"
        config: dict[str, Any] = {"Env": list(DEFAULT_ENV), "WorkingDir": "/"}
        config["Entrypoint"] = list(entrypoint) if entrypoint is not None else None
        config["Cmd"] = list(cmd) if cmd is not None else (["sh"] if entrypoint is None else None)
        config = {k: v for k, v in config.items() if v is not None}
        identity = {"s": source, "c": config, "p": platform, "d": data_size}
        key = "busybox-" + _sha256(_canonical_json(identity))[7:23]

        def build() -> Image:
            layers = [self._layer(f"busybox-{source}", self._write_busybox_tree, True, _BUSYBOX_GZIP_LEVEL)]
            if data_size:
                layers.append(self._synthetic_layer(0, 0, data_size, True))
            return self._image(layers, True, False, platform, config)

        return self._cached(key, build)

    def pause(self) -> Image:
        """The sandbox ("pause") image: busybox whose shell sleeps until TERM/INT, then exits 0."""
        return self.busybox(entrypoint=PAUSE_ENTRYPOINT)

    def index(self, images: Mapping[str, Image], *, oci: bool = True) -> Index:
        """A multi-platform index, ``{"linux/amd64": image, ...}``; OCI index or Docker manifest list."""
        if not images:
            raise ValueError("an index needs at least one platform image")
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX if oci else DOCKER_MANIFEST_LIST,
            "manifests": [
                {
                    "mediaType": image.media_type,
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": _platform_fields(name),
                }
                for name, image in images.items()
            ],
        }
        manifest = _canonical_json(document)
        self._store_bytes(manifest)
        return Index(manifest, str(document["mediaType"]), _sha256(manifest), dict(images))

    def _layer_record(self, key: str, compressed: bool) -> Path:
        return self.workdir / "layers" / f"v{_FORMAT}-{key}-{'gz' if compressed else 'tar'}.json"

    def has_layer(self, key: str) -> bool:
        """Whether :meth:`layer` has built ``key`` already (so asking again costs nothing)."""
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            return self.blob_path(json.loads(self._layer_record(key, True).read_text())["digest"]).is_file()
        return False

    def layer(self, key: str, write_tree: Callable[[tarfile.TarFile], None], *, level: int = 6) -> Layer:
        """A gzipped layer whose tar ``write_tree`` writes (entries made with :func:`tar_info`), built
        once per ``key``: the key must change whenever the tree would."""
        return self._layer(key, write_tree, True, level)

    def assemble(
        self, layers: Sequence[Layer], config: dict[str, Any], *, platform: str | None = None
    ) -> Image:
        """An OCI image of gzipped ``layers`` (bottom first) with this image ``config`` (Entrypoint,
        Env, User, Labels, ...)."""
        return self._image(list(layers), True, True, platform or host_platform_name(), config)

    # --- caching ---------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_digest = digest.partition(":")
        if algorithm != "sha256" or len(hex_digest) != 64:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blob_dir / hex_digest

    def _cached(self, key: str, build: Callable[[], Image]) -> Image:
        key = f"v{_FORMAT}-{key}"
        if key in self._memo:
            return self._memo[key]
        ref = self.workdir / "refs" / key
        image = None
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            image = self.load(ref.read_text().strip())
        if image is None:
            image = build()
            self._atomic_write(ref, image.digest.encode())
        self._memo[key] = image
        return image

    def load(self, manifest_digest: str) -> Image:
        """The image whose manifest is stored under ``manifest_digest``.

        Raises FileNotFoundError if the manifest or any of its blobs is missing.
        """
        manifest = self.blob_path(manifest_digest).read_bytes()
        document = json.loads(manifest)

        def blob(descriptor: Mapping[str, Any]) -> Blob:
            path = self.blob_path(descriptor["digest"])
            if not path.is_file():
                raise FileNotFoundError(path)
            return Blob(descriptor["digest"], descriptor["size"], descriptor["mediaType"], path)

        return Image(
            manifest=manifest,
            media_type=document["mediaType"],
            digest=manifest_digest,
            config=blob(document["config"]),
            layers=tuple(blob(d) for d in document["layers"]),
        )

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)

    def _store_bytes(self, data: bytes) -> str:
        digest = _sha256(data)
        path = self.blob_path(digest)
        if not path.is_file():
            self._atomic_write(path, data)
        return digest

    # --- layers ----------------------------------------------------------------------------------

    def _layer(
        self, key: str, write_tree: Callable[[tarfile.TarFile], None], compressed: bool, level: int
    ) -> Layer:
        """Build (or reuse) one layer blob: a tar written by ``write_tree``, gzipped if asked."""
        record = self._layer_record(key, compressed)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            cached = json.loads(record.read_text())
            layer = Layer(cached["digest"], cached["size"], cached["diff_id"], cached.get("tar_size", 0))
            if self.blob_path(layer.digest).is_file():
                return layer
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as file:
                blob = _Hashing(file)
                if compressed:
                    # gzip by hand: GzipFile would stamp a file name; mtime 0 keeps it deterministic.
                    gzipped = _GzipWriter(blob, level)
                    tar_stream = _Hashing(gzipped)  # type: ignore[arg-type]
                else:
                    gzipped, tar_stream = None, blob
                with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    write_tree(tar)
                if gzipped is not None:
                    gzipped.close()
                file.flush()
                os.fsync(file.fileno())
            layer = Layer(blob.digest, blob.size, tar_stream.digest, tar_stream.size)
            os.replace(tmp, self.blob_path(layer.digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._atomic_write(record, _canonical_json(layer.__dict__))
        return layer

    def _synthetic_layer(self, seed: int, index: int, size: int, compressed: bool) -> Layer:
        name = f"imagewarm/synthetic-{seed}-{index}.bin"

        def write_tree(tar: tarfile.TarFile) -> None:
            tar.addfile(tar_info("imagewarm", tarfile.DIRTYPE, 0o755))
            stream = _SeededBytes(f"imagewarm/{seed}/{index}/{size}", size)
            tar.addfile(tar_info(name, tarfile.REGTYPE, 0o644, size), stream)

        level = _SYNTHETIC_GZIP_LEVEL
        return self._layer(f"synthetic-s{seed}-i{index}-b{size}", write_tree, compressed, level)

    @staticmethod
    def _write_busybox_tree(tar: tarfile.TarFile) -> None:
        listing = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
        applets = sorted({a for a in listing.stdout.split() if a and a != "busybox"})
        for directory, mode in sorted(
            {
                "bin": 0o755,
                "dev": 0o755,
                "etc": 0o755,
                "proc": 0o555,
                "root": 0o700,
                "sys": 0o555,
                "tmp": 0o1777,
                "var": 0o755,
            }.items()
        ):
            tar.addfile(tar_info(directory, tarfile.DIRTYPE, mode))
        with BUSYBOX.open("rb") as binary:
            size = BUSYBOX.stat().st_size
            tar.addfile(tar_info("bin/busybox", tarfile.REGTYPE, 0o755, size), binary)
        for applet in applets:
            tar.addfile(tar_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox"))
        files = {
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            "etc/group": b"root:x:0:\nnobody:x:65534:\n",
        }
        for name, content in files.items():
            tar.addfile(tar_info(name, tarfile.REGTYPE, 0o644, len(content)), io.BytesIO(content))

    # --- config and manifest ---------------------------------------------------------------------

    def _image(
        self, layers: list[Layer], compressed: bool, oci: bool, platform: str, config: dict[str, Any]
    ) -> Image:
        document = {
            **_platform_fields(platform),
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
        config_bytes = _canonical_json(document)
        config_blob = Blob(
            self._store_bytes(config_bytes),
            len(config_bytes),
            OCI_CONFIG if oci else DOCKER_CONFIG,
            self.blob_path(_sha256(config_bytes)),
        )
        if oci:
            layer_type = OCI_LAYER_GZIP if compressed else OCI_LAYER
        else:
            layer_type = DOCKER_LAYER_GZIP if compressed else DOCKER_LAYER
        layer_blobs = tuple(
            Blob(layer.digest, layer.size, layer_type, self.blob_path(layer.digest)) for layer in layers
        )
        media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
        manifest = _canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": config_blob.descriptor(),
                "layers": [blob.descriptor() for blob in layer_blobs],
            }
        )
        digest = self._store_bytes(manifest)
        return Image(manifest, media_type, digest, config_blob, layer_blobs)


class _GzipWriter:
    """A gzip member (RFC 1952) with mtime 0 and no file name, streamed into ``target``."""

    def __init__(self, target: _Hashing, level: int) -> None:
        self.target = target
        self.compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.crc = 0
        self.size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS "unknown"
        target.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.target.write(self.compressor.compress(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.target.write(self.compressor.flush())
        self.target.write(self.crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little"))


# --- push ----------------------------------------------------------------------------------------


class PushError(RuntimeError):
    """The registry refused part of a push; the message names the request and its answer."""


class PushTarget(Protocol):
    """What ``push`` needs of a registry: its base URL and, for basic auth, credentials."""

    @property
    def url(self) -> str: ...


def _check(response: requests.Response, expected: Sequence[int], what: str) -> requests.Response:
    if response.status_code not in expected:
        raise PushError(
            f"{what}: {response.request.method} {response.url} answered {response.status_code} "
            f"{response.text[:500]!r}; is the registry up, writable and given the right credentials?"
        )
    return response


def _file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(chunk_size):
            yield chunk


def _upload_blob(session: requests.Session, base: str, blob: Blob, chunked: bool, chunk_size: int) -> None:
    if session.head(f"{base}/blobs/{blob.digest}").status_code == 200:
        return
    response = _check(session.post(f"{base}/blobs/uploads/"), (202,), f"start upload of {blob.digest}")
    location = urljoin(base, response.headers["Location"])
    octets = {"Content-Type": "application/octet-stream"}
    if chunked:
        offset = 0
        for chunk in _file_chunks(blob.path, chunk_size):
            headers = {**octets, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
            response = session.patch(location, data=chunk, headers=headers)
            _check(response, (202,), f"upload chunk at {offset} of {blob.digest}")
            location = urljoin(base, response.headers["Location"])
            offset += len(chunk)
        response = session.put(location, params={"digest": blob.digest}, headers=octets)
    else:
        with blob.path.open("rb") as file:
            headers = {**octets, "Content-Length": str(blob.size)}
            response = session.put(location, params={"digest": blob.digest}, data=file, headers=headers)
    _check(response, (201,), f"finish upload of {blob.digest}")


def _put_manifest(
    session: requests.Session, base: str, reference: str, manifest: bytes, media_type: str
) -> str:
    response = session.put(
        f"{base}/manifests/{reference}", data=manifest, headers={"Content-Type": media_type}
    )
    _check(response, (201,), f"put manifest {reference}")
    digest = _sha256(manifest)
    answered = response.headers.get("Docker-Content-Digest", digest)
    if answered != digest:
        raise PushError(f"registry stored manifest {reference} as {answered}, expected {digest}")
    return digest


def push(
    registry: PushTarget,
    repository: str,
    tag: str | None,
    image: Image | Index,
    *,
    chunked: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> str:
    """Push ``image`` to ``registry`` as ``repository:tag`` (by digest only when ``tag`` is None).

    Blobs the registry already has are skipped; an index's platform manifests are pushed by
    digest before the index. ``chunked`` uploads blobs in PATCH requests of ``chunk_size``
    bytes, else in one PUT. Uses the registry's ``username``/``password`` if set, as Basic credentials
    or for bearer tokens, as its challenge asks.
    Returns the manifest digest; raises PushError naming the request the registry refused.
    """
    session = requests.Session()
    username, password = getattr(registry, "username", None), getattr(registry, "password", None)
    # Basic up front as before; a token registry's Bearer challenge is answered with a token.
    session.auth = RegistryAuth(username, password)
    base = f"{registry.url}/v2/{repository}"
    with session:
        children = list(image.images.values()) if isinstance(image, Index) else [image]
        for child in children:
            for blob in child.blobs:
                _upload_blob(session, base, blob, chunked, chunk_size)
            if isinstance(image, Index):
                _put_manifest(session, base, child.digest, child.manifest, child.media_type)
        return _put_manifest(session, base, tag or image.digest, image.manifest, image.media_type)


# --- OCI image layout archives -------------------------------------------------------------------


def write_oci_archive(image: Image, path: Path, name: str) -> None:
    """Write ``image`` to ``path`` as an OCI image layout tar, named ``name`` (a full reference such as
    ``docker.io/library/imagewarm:0.1.0``) in its index the way containerd's own export does:
    ``io.containerd.image.name`` = ``name`` (what ``ctr images import`` names the image; a bare tag
    would be prefixed with ``import-<date>``) and ``org.opencontainers.image.ref.name`` = its tag.
    Deterministic (mtime 0, fixed order); written to a temporary file and renamed into place."""
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                **{"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with (
            os.fdopen(fd, "wb") as file,
            tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            small = {
                "oci-layout": _canonical_json({"imageLayoutVersion": "1.0.0"}),
                "index.json": _canonical_json(index),
            }
            for entry, data in small.items():
                tar.addfile(tar_info(entry, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
            for directory in ("blobs", "blobs/sha256"):
                tar.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
            blobs = {image.digest: image.manifest} | {blob.digest: blob for blob in image.blobs}
            for digest, blob in sorted(blobs.items()):
                entry = f"blobs/sha256/{digest.partition(':')[2]}"
                if isinstance(blob, bytes):
                    tar.addfile(tar_info(entry, tarfile.REGTYPE, 0o644, len(blob)), io.BytesIO(blob))
                else:
                    with blob.path.open("rb") as content:
                        tar.addfile(tar_info(entry, tarfile.REGTYPE, 0o644, blob.size), content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
