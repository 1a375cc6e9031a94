"""Host-level cleanup of what runtimes leave behind: mounts, shim process trees, stale sockets.

containerd shims run in their own process group and outlive containerd; the native snapshotter
and kubelet leave bind and tmpfs mounts under their directories; shim sockets stay in
``/run/containerd/s``. These helpers find what belongs to one directory or socket and remove it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

SHIM_SOCKET_DIR = Path("/run/containerd/s")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(roots: Iterable[int]) -> list[int]:
    """Every live process below ``roots`` (children first-level and deeper), not the roots."""
    parents = _parents()
    found: list[int] = []
    frontier = set(roots)
    while frontier:
        children = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += sorted(children)
        frontier = children
    return found


def pids_matching(*needles: str) -> list[int]:
    """Live processes whose command line contains every one of ``needles``."""
    own = os.getpid()
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and int(p) != own and all(n in _cmdline(int(p)) for n in needles)
    ]


def kill_trees(roots: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Signal ``roots`` and all their descendants (descendants first, so nothing is re-parented)."""
    roots = list(roots)
    for pid in [*reversed(descendants(roots)), *roots]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """True once no pid of ``pids`` is alive (zombies of other parents count as gone)."""
    deadline = time.monotonic() + timeout
    pids = list(pids)
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def kill_shims(containerd_address: str) -> None:
    """Kill every containerd shim serving ``containerd_address`` and the containers below them."""
    shims = pids_matching("containerd-shim", containerd_address)
    kill_trees(shims)
    wait_gone(shims, 5)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first."""
    prefix = str(directory).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and such octal-escaped.
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(directory: Path) -> None:
    """Unmount everything at or below ``directory``, deepest first (lazily when busy)."""
    for _ in range(3):
        points = mounts_under(directory)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)


def remove_dead_shim_sockets() -> None:
    """Delete shim sockets in ``/run/containerd/s`` that no process listens on any more."""
    if not SHIM_SOCKET_DIR.is_dir():
        return
    try:
        listening = Path("/proc/net/unix").read_text()
    except OSError:
        return
    for sock in SHIM_SOCKET_DIR.iterdir():
        if str(sock) not in listening:
            with contextlib.suppress(OSError):
                sock.unlink()


CNI_RESULTS_DIR = Path("/var/lib/cni/results")


def remove_cni_results(sandbox_ids: Iterable[str]) -> None:
    """Delete the CNI result cache entries (``<network>-<sandbox id>-<interface>``) of these sandboxes."""
    ids = set(sandbox_ids)
    if not ids or not CNI_RESULTS_DIR.is_dir():
        return
    for entry in CNI_RESULTS_DIR.iterdir():
        if any(f"-{i}-" in entry.name for i in ids):
            with contextlib.suppress(OSError):
                entry.unlink()
