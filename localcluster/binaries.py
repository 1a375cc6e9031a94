"""The Go-built binaries of the local cluster: pinned versions, built once, cached by version.

Kubernetes, etcd, containerd and helm are built from their Go modules (the machine reaches the Go
module proxy, not release downloads). Each tool lands in ``<cache>/bin/<tool>-<version>/`` and a
later run finds it there and builds nothing. ``python -m localcluster.binaries`` builds
whatever is missing, with progress on stderr.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from imagewarm.errors import ImagewarmError

# The one place versions are pinned.
KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.5"
CONTAINERD_VERSION = "v2.2.9"
HELM_VERSION = "v3.19.5"
GO_DIRECTIVE = "1.25.0"


def cache_root() -> Path:
    """Where binaries are cached: ``$IMAGEWARM_CACHE_DIR`` or ``~/.cache/imagewarm``."""
    return Path(os.environ.get("IMAGEWARM_CACHE_DIR") or Path.home() / ".cache" / "imagewarm")


@dataclass(frozen=True)
class Tool:
    """One Go build producing ``binaries`` from ``packages`` of a module at ``version``."""

    name: str
    version: str
    binaries: tuple[str, ...]

    @property
    def directory(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.directory / binary

    def is_built(self) -> bool:
        return all(self.path(b).is_file() and os.access(self.path(b), os.X_OK) for b in self.binaries)


KUBERNETES = Tool(
    "kubernetes",
    KUBERNETES_VERSION,
    ("kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler", "kubectl", "kube-proxy"),
)
ETCD = Tool("etcd", ETCD_VERSION, ("etcd", "etcdctl"))
CONTAINERD = Tool("containerd", CONTAINERD_VERSION, ("containerd", "containerd-shim-runc-v2", "ctr"))
HELM = Tool("helm", HELM_VERSION, ("helm",))
ALL_TOOLS = (KUBERNETES, ETCD, CONTAINERD, HELM)


class BuildError(ImagewarmError, RuntimeError):
    """A Go build failed; the message carries the command and the tail of its output."""


def _log(message: str) -> None:
    print(f"[binaries] {message}", file=sys.stderr, flush=True)


def _go(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "GOFLAGS": "-buildvcs=false", "GOTOOLCHAIN": "local", **(env or {})}
    proc = subprocess.run(["go", *args], cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BuildError(f"`go {' '.join(args)}` failed in {cwd}:\n{tail}")
    return proc.stdout


def _staging_replaces(workdir: Path) -> list[str]:
    """The ``k8s.io/<staging> => k8s.io/<staging> v0.x.y`` lines Kubernetes needs to resolve."""
    out = _go(["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], workdir)
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    block = re.search(r"^replace \((.*?)^\)", gomod, re.S | re.M)
    if not block:
        raise BuildError("k8s.io/kubernetes go.mod has no replace block; the pinned version changed shape")
    minor = KUBERNETES_VERSION.removeprefix("v1.")
    modules = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging", block.group(1), re.M)
    return [f"\t{m} => {m} v0.{minor}" for m in modules]


def _module(workdir: Path, requires: list[str], replaces: list[str], imports: list[str]) -> None:
    lines = [f"module imagewarm.local/build\n\ngo {GO_DIRECTIVE}\n"]
    lines.append("require (\n" + "\n".join(f"\t{r}" for r in requires) + "\n)\n")
    if replaces:
        lines.append("replace (\n" + "\n".join(replaces) + "\n)\n")
    (workdir / "go.mod").write_text("\n".join(lines))
    tools = "\n".join(f'\t_ "{i}"' for i in imports)
    (workdir / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{tools}\n)\n")
    _go(["mod", "tidy", "-e"], workdir)


def _build(tool: Tool, workdir: Path, packages: list[str], ldflags: str = "", tags: str = "") -> None:
    staging = Path(tempfile.mkdtemp(dir=tool.directory.parent, prefix=f".{tool.name}-"))
    args = ["build", "-trimpath", "-o", str(staging) + "/"]
    args += ["-ldflags", f"-s -w {ldflags}".strip()]
    if tags:
        args += ["-tags", tags]
    _go(args + packages, workdir, env={"CGO_ENABLED": "0"})
    # Publish the whole directory at once, so a killed build never leaves a partial tool behind.
    if tool.directory.exists():
        shutil.rmtree(tool.directory)
    staging.rename(tool.directory)


def _build_kubernetes(workdir: Path) -> None:
    (workdir / "go.mod").write_text(f"module imagewarm.local/build\n\ngo {GO_DIRECTIVE}\n")
    replaces = _staging_replaces(workdir)
    cmds = ["kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler", "kubectl", "kube-proxy"]
    packages = [f"k8s.io/kubernetes/cmd/{c}" for c in cmds]
    _module(workdir, [f"k8s.io/kubernetes {KUBERNETES_VERSION}"], replaces, packages)
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    ldflags = " ".join(
        f"-X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    )
    _build(KUBERNETES, workdir, packages, ldflags=ldflags)


def _build_etcd(workdir: Path) -> None:
    packages = ["go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/etcdctl/v3"]
    requires = [f"go.etcd.io/etcd/server/v3 {ETCD_VERSION}", f"go.etcd.io/etcd/etcdctl/v3 {ETCD_VERSION}"]
    _module(workdir, requires, [], packages)
    staging = Path(tempfile.mkdtemp(dir=ETCD.directory.parent, prefix=".etcd-"))
    for package, binary in zip(packages, ETCD.binaries, strict=True):
        _go(
            ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(staging / binary), package],
            workdir,
            env={"CGO_ENABLED": "0"},
        )
    if ETCD.directory.exists():
        shutil.rmtree(ETCD.directory)
    staging.rename(ETCD.directory)


def _build_containerd(workdir: Path) -> None:
    cmds = ["containerd", "containerd-shim-runc-v2", "ctr"]
    packages = [f"github.com/containerd/containerd/v2/cmd/{c}" for c in cmds]
    _module(workdir, [f"github.com/containerd/containerd/v2 {CONTAINERD_VERSION}"], [], packages)
    _build(CONTAINERD, workdir, packages, tags="no_btrfs no_devmapper no_zfs no_aufs")


def _build_helm(workdir: Path) -> None:
    packages = ["helm.sh/helm/v3/cmd/helm"]
    _module(workdir, [f"helm.sh/helm/v3 {HELM_VERSION}"], [], packages)
    ldflags = f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"
    _build(HELM, workdir, packages, ldflags=ldflags)


_BUILDERS = {
    "kubernetes": _build_kubernetes,
    "etcd": _build_etcd,
    "containerd": _build_containerd,
    "helm": _build_helm,
}


def ensure(tools: tuple[Tool, ...] = ALL_TOOLS) -> None:
    """Build every tool of ``tools`` that is not cached yet. Raises BuildError naming the failed build.

    Several processes may call this at once (a test run, the demo): a file lock lets one build while
    the others wait and then find the binaries cached."""
    if all(tool.is_built() for tool in tools):
        return
    if shutil.which("go") is None:
        raise BuildError("`go` is not on PATH: install Go 1.25 or newer to build the cluster binaries")
    lock_path = cache_root() / "bin" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        if not _try_lock(lock):
            _log("another process is building the binaries; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for tool in tools:
            if tool.is_built():
                continue
            _log(f"building {tool.name} {tool.version} from Go modules (cold: minutes; cached afterwards)")
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=f"imagewarm-build-{tool.name}-") as workdir:
                _BUILDERS[tool.name](Path(workdir))
            _log(f"built {tool.name} in {time.monotonic() - started:.0f}s -> {tool.directory}")


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def path_entries() -> list[str]:
    """Directories to put on PATH so the cluster finds every cached binary."""
    return [str(t.directory) for t in ALL_TOOLS]


if __name__ == "__main__":
    wanted = tuple(t for t in ALL_TOOLS if not sys.argv[1:] or t.name in sys.argv[1:])
    try:
        ensure(wanted)
    except BuildError as exc:
        _log(str(exc))
        sys.exit(1)
