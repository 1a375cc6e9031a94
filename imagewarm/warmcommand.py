"""`imagewarm warm IMAGE...`: warm images into the node proxies' caches, in one of two modes.

Cluster mode (`--kubeconfig PATH`, or in a pod with a service account, and no `--proxy`): create an
ImagePullJob (one image) or an ImageListPullJob (several) in `--namespace`, targeting `--nodes` or
the nodes matching `--selector` (all nodes without either), `--parallelism` at a time, with
`--pull-secret NAME` (Secrets in the job's namespace), and follow it: a progress line per node on
stderr, a summary table per node on stdout (`imagewarm.warmjob`). Ctrl-C leaves the job running.

Direct mode (`--proxy URL`, or no cluster access): pull through that one proxy, as a runtime would
(`imagewarm.warmup`). Credentials come from pull secrets in the cluster (`--pull-secret
NAMESPACE/NAME`, as a pod names them in `imagePullSecrets`; read through `--kubeconfig`) and from a
Docker config file: `--docker-config`, else `$DOCKER_CONFIG/config.json` or
`~/.docker/config.json` when it exists, as docker and skopeo look for them. For each image the
first matching entry wins, pull secrets first.

Exit 0 when every image was warmed (on every target node), 1 when any failed (each failure
explained), 2 for bad arguments (the CLI's rule for configuration errors), 130 on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imagewarm import dockerconfig, platforms, warmjob
from imagewarm.command import Command, table
from imagewarm.config import setting
from imagewarm.platforms import Platform
from imagewarm.reference import DEFAULT_PROXY_PREFIX, Reference, parse


def parse_secret_name(text: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` (direct mode) or `NAME` (cluster mode: in --namespace) of a pull secret, as
    (namespace or "", name). Raises ValueError otherwise."""
    namespace, sep, name = text.strip().rpartition("/")
    if (sep and not namespace) or not name or "/" in namespace:
        raise ValueError(
            "expected NAME or NAMESPACE/NAME of a pull secret, e.g. registry-cred or shop/registry-cred"
        )
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
        "",
        help=f"direct mode: pull through the node proxy at this URL (without it and without cluster access: "
        f"http://{DEFAULT_PROXY_PREFIX})",
        parse=parse_proxy_url,
        metavar="URL",
    )
    docker_config: str = setting(
        "",
        help="Docker config file (or its directory) with registry credentials; without it "
        "$DOCKER_CONFIG/config.json or ~/.docker/config.json is read when it exists",
        metavar="FILE",
    )
    pull_secret: tuple[tuple[str, str], ...] = setting(
        help="a pull secret (kubernetes.io/dockerconfigjson). Cluster mode: NAME of a Secret in --namespace, "
        "listed in the job's pullSecrets for the node agents. Direct mode: NAMESPACE/NAME, read here for "
        "its credentials (the first matching entry wins, before --docker-config)",
        parse=parse_secret_name,
        repeated=True,
        metavar="NAME|NAMESPACE/NAME",
    )
    kubeconfig: str = setting(
        "",
        help="kubeconfig: selects cluster mode (unless --proxy is given); in direct mode it reads "
        "--pull-secret; empty: in-cluster, else (direct mode) $KUBECONFIG or ~/.kube/config",
        metavar="PATH",
    )
    namespace: str = setting("default", help="cluster mode: the namespace of the job", metavar="NAMESPACE")
    nodes: tuple[str, ...] = setting(
        help="cluster mode: warm only on this node (selector.names)", repeated=True, metavar="NODE"
    )
    selector: dict[str, str] | None = setting(
        None,
        help="cluster mode: warm on the nodes with these labels (selector.matchLabels): key=value[,...]",
        parse=warmjob.parse_selector,
        metavar="LABELS",
    )
    parallelism: int | str | None = setting(
        None,
        help="cluster mode: how many nodes pull at once, a number or a percentage of the targets "
        "(the CRD's default: 1)",
        parse=warmjob.parse_parallelism,
        metavar="N|PERCENT",
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
        if self.nodes and self.selector:
            raise ValueError(
                "give --nodes or --selector, not both (a job selects nodes by names or by labels)"
            )

    @property
    def cluster_mode(self) -> bool:
        """Whether to create a job: cluster access (--kubeconfig, or in a pod) and no --proxy."""
        from imagewarm import kube

        in_cluster = (
            bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (kube.SERVICE_ACCOUNT_DIR / "token").exists()
        )
        return not self.proxy and bool(self.kubeconfig or in_cluster)


class CredentialsFileError(ValueError):
    """The Docker config file cannot be read or is not Docker configuration."""


@dataclass(frozen=True)
class Credentials:
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


def load_credentials(path: Path | None) -> Credentials:
    """Read `path` (None: no credentials). Raises CredentialsFileError naming the file and the fault."""
    if path is None:
        return Credentials(None, {})
    try:
        text = path.read_text()
        entries = dockerconfig.parse_config(text)
    except OSError as exc:
        raise CredentialsFileError(f"cannot read the docker config {path}: {exc.strerror or exc}") from None
    except dockerconfig.DockerConfigError as exc:
        raise CredentialsFileError(f"{path}: {exc}") from None
    document = json.loads(text)
    helpers = isinstance(document, dict) and bool(document.get("credsStore") or document.get("credHelpers"))
    return Credentials(path, entries, helpers)


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
    return run_job(config) if config.cluster_mode else run_direct(config)


def _direct_mode_errors(config: WarmConfig) -> str:
    if config.nodes or config.selector or config.parallelism is not None:
        return (
            "--nodes, --selector and --parallelism are for cluster mode: drop --proxy and give --kubeconfig"
        )
    bare = [name for namespace, name in config.pull_secret if not namespace]
    if bare:
        return (
            f"--pull-secret {bare[0]}: direct mode reads the secret here and needs NAMESPACE/NAME "
            "(cluster mode, without --proxy, takes the NAME of a Secret in --namespace)"
        )
    return ""


def _cluster_mode_errors(config: WarmConfig) -> str:
    if config.docker_config:
        return (
            "--docker-config is for direct mode (--proxy URL): in cluster mode the node agents take "
            "credentials from --pull-secret NAME (Secrets in --namespace)"
        )
    elsewhere = [f"{ns}/{name}" for ns, name in config.pull_secret if ns and ns != config.namespace]
    if elsewhere:
        return (
            f"--pull-secret {elsewhere[0]}: a job's pull secrets are Secrets in its own namespace "
            f"({config.namespace}); give --namespace or copy the Secret there"
        )
    return ""


def run_job(config: WarmConfig) -> int:
    """Cluster mode: create the job, follow it, print the summary."""
    from imagewarm import kube

    problem = _cluster_mode_errors(config)
    if problem:
        print(f"imagewarm warm: {problem}", file=sys.stderr)
        return 2
    try:
        client = kube.Kube.load(config.kubeconfig or None)
    except kube.KubeError as exc:
        print(f"imagewarm warm: {exc}", file=sys.stderr)
        return 2
    job = warmjob.job_object(
        config.images,
        namespace=config.namespace,
        parallelism=config.parallelism,
        selector=config.selector,
        nodes=config.nodes,
        pull_secrets=[name for _, name in config.pull_secret],
    )
    follower = warmjob.Follower(client, config.images)
    try:
        follower.start()  # before the job exists: no status of its nodes goes unseen
        created = warmjob.create(client, job)
    except warmjob.JobError as exc:
        follower.stop()
        print(f"imagewarm warm: {exc}", file=sys.stderr)
        return 2
    follower.job = created
    kind, name = created["kind"].lower(), created["metadata"]["name"]
    try:  # from here on, Ctrl-C says how to find the job it leaves running
        print(
            f"created {follower.label}; following it (Ctrl-C stops following, not the job)", file=sys.stderr
        )
        jobs, rows = follower.follow()
    except KeyboardInterrupt:
        print(
            f"\nimagewarm warm: {follower.label} keeps running. Follow it with "
            f"`kubectl -n {config.namespace} get {kind} {name} -w` or `imagewarm status`; "
            f"delete it with `kubectl -n {config.namespace} delete {kind} {name}`",
            file=sys.stderr,
        )
        return 130
    except warmjob.JobError as exc:
        print(f"imagewarm warm: {exc}", file=sys.stderr)
        return 1
    finally:
        follower.stop()
    several = len(config.images) > 1
    header = ("node", "image", "phase", "digest", "seconds", "message") if several else (
        "node", "phase", "digest", "seconds", "message")  # fmt: skip
    print(table("summary", header, warmjob.summary_rows(rows, several)), flush=True)
    if warmjob.succeeded(jobs, rows):
        return 0
    messages = [str((j.get("status") or {}).get("message") or "") for j in jobs]
    detail = "; ".join(m for m in messages if m) or "see the summary"
    if not rows:
        detail = "no node was targeted (check --nodes / --selector)" + (f"; {detail}" if messages else "")
    print(f"imagewarm warm: {follower.label} did not succeed on every node: {detail}", file=sys.stderr)
    return 1


def run_direct(config: WarmConfig) -> int:
    """Direct mode: pull each image through one proxy."""
    # Imported here: `imagewarm --help` must not pay for requests.
    from imagewarm import warmup

    problem = _direct_mode_errors(config)
    if problem:
        print(f"imagewarm warm: {problem}", file=sys.stderr)
        return 2
    proxy = config.proxy or f"http://{DEFAULT_PROXY_PREFIX}"

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
                image, proxy, platform=config.platform, authorization=authorization, progress=report
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
    help="warm images on the cluster's nodes (an ImagePullJob, followed) or into one node proxy (--proxy)",
    config=WarmConfig,
    run=run,
    description="Cluster mode (--kubeconfig or in a pod, no --proxy): create an ImagePullJob (one IMAGE) or "
    "an ImageListPullJob (several) in --namespace for --nodes or --selector (all nodes without them), "
    "--parallelism at a time, --pull-secret NAME of Secrets in --namespace; follow it with a progress line "
    "per node and print a summary per node; Ctrl-C leaves the job running. Direct mode (--proxy URL): pull "
    "the IMAGEs through that proxy so it caches them, for this machine's platform (or --platform), with "
    "--pull-secret NAMESPACE/NAME or --docker-config credentials. Exit 0 when all are warmed everywhere, "
    "1 when any failed.",
)
