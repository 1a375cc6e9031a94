"""`imagewarm warm IMAGE...`: warm images into a node proxy's cache (see `imagewarm.warmup`).

Credentials come from pull secrets in the cluster (`--pull-secret NAMESPACE/NAME`, as a pod names
them in `imagePullSecrets`; read through `--kubeconfig`) and from a Docker config file:
`--docker-config`, else `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` when it exists, as
docker and skopeo look for them. For each image the first matching entry wins, pull secrets first.
Progress goes to stderr, a summary table to stdout. Exit 0 when every image was warmed, 1 when any
failed (each failure explained), 2 for bad arguments (the CLI's rule for configuration errors).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imagewarm import dockerconfig, platforms
from imagewarm.command import Command, table
from imagewarm.config import setting
from imagewarm.errors import ImagewarmError
from imagewarm.platforms import Platform
from imagewarm.reference import DEFAULT_PROXY_PREFIX, Reference, parse


def parse_secret_name(text: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` of a pull secret. Raises ValueError otherwise."""
    namespace, sep, name = text.strip().partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError("expected NAMESPACE/NAME of a pull secret, e.g. shop/registry-cred")
    return namespace, name


def parse_proxy_url(text: str) -> str:
    """`http://host:port` (or https), without a trailing slash. Raises ValueError otherwise."""
    url = text.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        raise ValueError("expected the proxy's base URL, e.g. http://localhost:7439")
    return url


@dataclass(frozen=True)
class WarmConfig:
    images: tuple[Reference, ...] = setting(
        help="images to warm, as pods name them: redis:7, registry.corp:5000/team/app:1.4, app@sha256:...",
        parse=parse,
        repeated=True,
        positional=True,
        metavar="IMAGE",
    )
    proxy: str = setting(
        f"http://{DEFAULT_PROXY_PREFIX}", help="the node proxy's URL", parse=parse_proxy_url, metavar="URL"
    )
    docker_config: str = setting(
        "",
        help="Docker config file (or its directory) with registry credentials; without it "
        "$DOCKER_CONFIG/config.json or ~/.docker/config.json is read when it exists",
        metavar="FILE",
    )
    pull_secret: tuple[tuple[str, str], ...] = setting(
        help="a pull secret (kubernetes.io/dockerconfigjson) to take credentials from, as NAMESPACE/NAME; "
        "repeat it for several, the first matching entry wins, before --docker-config",
        parse=parse_secret_name,
        repeated=True,
        metavar="NAMESPACE/NAME",
    )
    kubeconfig: str = setting(
        "",
        help="kubeconfig for --pull-secret; empty: in-cluster, $KUBECONFIG or ~/.kube/config",
        metavar="PATH",
    )
    platform: Platform | str = setting(
        platforms.this_platform(),
        help="which image of a multi-platform image to warm: os/arch[/variant], or all",
        parse=platforms.parse_choice,
        metavar="PLATFORM",
    )

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("give at least one IMAGE to warm, e.g. `imagewarm warm redis:7`")


class CredentialsFileError(ImagewarmError, ValueError):
    """The Docker config file cannot be read or is not Docker configuration."""


@dataclass(frozen=True)
class DockerConfigCredentials:
    """What a Docker config file holds for the proxy: Basic credentials by registry, and whether it
    also names credential helpers, which imagewarm does not run."""

    path: Path | None
    entries: Mapping[str, dockerconfig.RegistryCredentials]
    helpers: bool = False


def docker_config_path(given: str, environ: Mapping[str, str], home: Path) -> Path | None:
    """The config file to read: `given` (a file, or a directory holding config.json); else docker's
    own lookup, `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, when that file exists."""
    if given:
        path = Path(given).expanduser()
        return path / "config.json" if path.is_dir() else path
    directory = Path(environ["DOCKER_CONFIG"]) if environ.get("DOCKER_CONFIG") else home / ".docker"
    found = directory / "config.json"
    return found if found.is_file() else None


def load_credentials(path: Path | None) -> DockerConfigCredentials:
    """Read `path` (None: no credentials). Raises CredentialsFileError naming the file and the fault."""
    if path is None:
        return DockerConfigCredentials(None, {})
    try:
        text = path.read_text()
        entries = dockerconfig.parse_config(text)
    except OSError as exc:
        raise CredentialsFileError(f"cannot read the docker config {path}: {exc.strerror or exc}") from None
    except dockerconfig.DockerConfigError as exc:
        raise CredentialsFileError(f"{path}: {exc}") from None
    document = json.loads(text)
    helpers = isinstance(document, dict) and bool(document.get("credsStore") or document.get("credHelpers"))
    return DockerConfigCredentials(path, entries, helpers)


def load_pull_secrets(
    names: tuple[tuple[str, str], ...], kubeconfig: str
) -> dict[str, dockerconfig.RegistryCredentials]:
    """The credentials of the pull secrets `names`, in order (the first entry for a registry wins).
    Raises CredentialsFileError saying which secret failed and what to do."""
    if not names:
        return {}
    from imagewarm import kube  # only when asked: the API client is not needed otherwise

    try:
        client = kube.Kube.load(kubeconfig or None)
    except kube.KubeError as exc:
        raise CredentialsFileError(f"--pull-secret needs cluster access: {exc}") from None
    configs = []
    for namespace, name in names:
        try:
            secret = client.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except kube.NotFound:
            raise CredentialsFileError(f"pull secret {namespace}/{name} not found") from None
        except kube.Forbidden as exc:
            raise CredentialsFileError(
                f"cannot read pull secret {namespace}/{name}: {exc} (needs `get` on secrets in {namespace})"
            ) from None
        except kube.KubeError as exc:
            raise CredentialsFileError(f"cannot read pull secret {namespace}/{name}: {exc}") from None
        try:
            configs.append(dockerconfig.from_secret(secret))
        except dockerconfig.DockerConfigError as exc:
            raise CredentialsFileError(f"pull secret {namespace}/{name}: {exc}") from None
    return dockerconfig.merge(*configs)


def run(config: WarmConfig) -> int:
    # Imported here: `imagewarm --help` must not pay for requests.
    from imagewarm import warmup

    try:
        from_secrets = load_pull_secrets(config.pull_secret, config.kubeconfig)
        credentials = load_credentials(docker_config_path(config.docker_config, os.environ, Path.home()))
    except CredentialsFileError as exc:
        print(f"imagewarm warm: {exc}", file=sys.stderr)
        return 2
    entries = dockerconfig.merge(from_secrets, credentials.entries)

    def report(progress: warmup.Progress) -> None:
        print(warmup.describe(progress), file=sys.stderr, flush=True)

    rows: list[tuple[str, ...]] = []
    failed = 0
    for image in config.images:
        authorization = dockerconfig.authorization_for(entries, image)
        try:
            result = warmup.warm(
                image, config.proxy, platform=config.platform, authorization=authorization, progress=report
            )
        except warmup.WarmError as exc:
            failed += 1
            message = str(exc)
            if isinstance(exc, warmup.CredentialsRefused) and authorization is None and credentials.helpers:
                message += (
                    f"; {credentials.path} keeps credentials in a credential helper, which imagewarm does "
                    "not run: give a file with `auths` entries"
                )
            print(f"imagewarm warm: {image.familiar} failed: {message}", file=sys.stderr, flush=True)
            rows.append((image.familiar, "failed", "-", "-", "-", "-"))
            continue
        mib = result.bytes / 2**20
        print(
            f"warmed {image.familiar} ({result.digest}): {mib:.1f} MiB in {result.blobs} blobs "
            f"({result.cached} already cached), {result.seconds:.2f}s",
            file=sys.stderr,
            flush=True,
        )
        rows.append(
            (
                image.familiar,
                result.digest,
                f"{mib:.1f}",
                f"{result.cached}/{result.blobs}",
                f"{result.seconds:.2f}",
                f"{result.mib_per_second:.1f}",
            )
        )
    header = ("image", "digest", "MiB", "cached", "seconds", "MiB/s")  # cached: blobs it had before
    print(table("summary", header, rows), flush=True)
    if failed:
        print(f"imagewarm warm: {failed} of {len(config.images)} images failed", file=sys.stderr)
    return 1 if failed else 0


command = Command(
    help="warm images into a node proxy's cache (credentials from pull secrets or Docker config)",
    config=WarmConfig,
    run=run,
    description="Pull IMAGEs through the node proxy so it caches them: manifest, config and every "
    "layer, for this machine's platform (or --platform). Exit 0 when all are warmed, 1 when any failed.",
)
