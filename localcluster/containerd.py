"""A standalone containerd 2.2 with its own root, state, sockets and registry hosts directory.

Used on its own (the proxy's tests pull through it) and once per node by the local cluster. The
config follows what works on this machine kind: the native snapshotter (overlayfs does not load),
no NRI (its socket path is fixed), runc state and pod network namespaces under our own directory.
Stopping also kills the shims and their containers, which outlive containerd otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imagewarm import containerd_hosts
from imagewarm.errors import ImagewarmError
from localcluster import binaries, host
from localcluster.processes import Daemon

CNI_BIN_DIR = "/usr/lib/cni"
RUNC = "/usr/sbin/runc"
# overlayfs does not load on this machine kind; snapshots are named by ChainID either way.
SNAPSHOTTER = "native"
# The kernel limits unix socket paths (sun_path) to 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class ContainerdError(ImagewarmError, RuntimeError):
    """containerd did not start or a ``ctr`` command failed; the message carries its output."""


_toml_string = containerd_hosts.toml_string


def render_config(base: Path, certs_dir: Path, sandbox_image: str | None, cni_conf_dir: Path) -> str:
    """The config.toml (version 3) of a containerd whose every path is below ``base``."""

    def q(path: Path) -> str:
        return _toml_string(str(path))

    sandbox = f"    sandbox = {_toml_string(sandbox_image)}\n" if sandbox_image else ""
    return f"""version = 3
root = {q(base / "root")}
state = {q(base / "state")}
temp = {q(base / "tmp")}

[grpc]
  address = {q(base / "containerd.sock")}
[ttrpc]
  address = {q(base / "containerd.sock.ttrpc")}

[plugins."io.containerd.internal.v1.opt"]
  path = {q(base / "opt")}
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "{SNAPSHOTTER}"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{SNAPSHOTTER}"
  [plugins."io.containerd.cri.v1.images".pinned_images]
{sandbox}  [plugins."io.containerd.cri.v1.images".registry]
    config_path = {q(certs_dir)}
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{_toml_string(CNI_BIN_DIR)}]
    conf_dir = {q(cni_conf_dir)}
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      snapshotter = "{SNAPSHOTTER}"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {q(base / "runc")}
        BinaryName = {_toml_string(RUNC)}
"""


def render_hosts(server_url: str, mirrors: Sequence[str] = ()) -> str:
    """A ``hosts.toml``: try each mirror (pull, resolve) in order, then ``server_url``."""
    return containerd_hosts.render(server_url, mirrors)


@dataclass
class Containerd:
    """One running containerd. Make it with :meth:`start`; :meth:`stop` leaves nothing behind."""

    base: Path
    certs_dir: Path
    namespace: str
    daemon: Daemon
    owns_base: bool = False
    _known_ids: set[str] = field(default_factory=set)

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def log_path(self) -> Path:
        return self.daemon.log_path

    @classmethod
    def start(
        cls,
        base: Path | None = None,
        *,
        certs_dir: Path | None = None,
        sandbox_image: str | None = None,
        cni_conf_dir: Path | None = None,
        namespace: str = "default",
        timeout: float = 30,
    ) -> Containerd:
        """Start containerd with every path under ``base`` (default: a new short ``/tmp/iwc-*``).

        ``certs_dir`` is its registry hosts directory (default ``base/certs.d``); ``sandbox_image``
        the pause image the CRI plugin uses. Raises ContainerdError with the log tail when it does
        not answer within ``timeout`` seconds, or ValueError when ``base`` is too long for sockets."""
        owns_base = base is None
        base = Path(base or tempfile.mkdtemp(prefix="iwc-", dir="/tmp")).resolve()
        longest = f"{base}/containerd.sock.ttrpc"
        if len(longest.encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"containerd base directory {base} is too long for unix sockets: use a shorter one"
            )
        binaries.ensure((binaries.CONTAINERD,))
        certs_dir = certs_dir or base / "certs.d"
        for sub in ("root", "state", "tmp", "opt", "runc"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        certs_dir.mkdir(parents=True, exist_ok=True)
        config = base / "config.toml"
        config.write_text(render_config(base, certs_dir, sandbox_image, cni_conf_dir or base / "cni-conf"))
        env = {**os.environ, "PATH": f"{binaries.CONTAINERD.directory}:/usr/sbin:/usr/bin:/sbin:/bin"}
        argv = [str(binaries.CONTAINERD.path("containerd")), "--config", str(config)]
        daemon = Daemon("containerd", argv, base / "containerd.log", env=env, marker=str(config)).start()
        self = cls(base=base, certs_dir=certs_dir, namespace=namespace, daemon=daemon, owns_base=owns_base)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.daemon.running:
                break
            if Path(self.address).exists() and self._ctr(["version"]).returncode == 0:
                return
            time.sleep(0.1)
        tail = self.daemon.log_tail()
        self.stop()
        raise ContainerdError(f"containerd at {self.address} did not become ready; log tail:\n{tail}")

    def _ctr(self, args: Sequence[str], namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(binaries.CONTAINERD.path("ctr")), "--address", self.address]
        argv += ["--namespace", namespace or self.namespace, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    def ctr(
        self, *args: str, namespace: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd (in ``namespace``, default this one's).

        Raises ContainerdError with stderr when it fails and ``check`` is set."""
        proc = self._ctr(args, namespace)
        if check and proc.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def pull(self, ref: str, *, plain_http: bool = True, namespace: str | None = None) -> str:
        """Pull and unpack ``ref`` through this containerd's hosts directory; returns ctr's output."""
        args = ["images", "pull", "--hosts-dir", str(self.certs_dir)]
        if plain_http:
            args.append("--plain-http")
        return self.ctr(*args, ref, namespace=namespace).stdout

    def set_hosts(self, upstream_host: str, server_url: str, mirrors: Sequence[str] = ()) -> Path:
        """Write ``<certs.d>/<upstream_host>/hosts.toml``: pulls of ``upstream_host`` images try
        ``mirrors`` first, then ``server_url``. containerd re-reads it on every pull."""
        directory = self.certs_dir / upstream_host
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "hosts.toml"
        path.write_text(render_hosts(server_url, mirrors))
        return path

    def container_ids(self) -> list[str]:
        """IDs of every container this containerd knows, in all namespaces (pod sandboxes included)."""
        if not self.daemon.running:
            return []
        namespaces = self._ctr(["namespaces", "ls", "-q"]).stdout.split()
        return [i for ns in namespaces for i in self._ctr(["containers", "ls", "-q"], ns).stdout.split()]

    def kill_containers(self) -> None:
        """Kill every container (all namespaces) and the shims that run them."""
        self._known_ids.update(self.container_ids())
        host.kill_shims(self.address)

    def stop(self) -> None:
        """Kill the containers and shims, stop containerd, unmount everything under ``base``
        (and remove ``base`` when start() made it)."""
        self.kill_containers()
        self.daemon.stop()
        # A shim may have been starting while containerd stopped.
        host.kill_shims(self.address)
        host.unmount_all(self.base)
        host.remove_dead_shim_sockets()
        # The CNI result cache is machine-wide (/var/lib/cni/results), keyed by sandbox ID.
        host.remove_cni_results(self._known_ids)
        if self.owns_base and not host.mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)
