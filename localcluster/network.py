"""The local cluster's host network: one bridge per node, its CNI config, and their removal.

Node ``i`` (from 1) gets bridge ``iwbr<i>`` with ``10.244.<i>.1/24``; that address is the node's
InternalIP and the gateway of its pods. Pods get only routes to the pod and service CIDRs, so they
cannot reach beyond the machine. The host routes between bridges (``ip_forward``, restored after).
Bridge names, subnets and ``KUBE-*`` iptables chains are machine-wide: a cluster holds the
machine lock (see ``cluster.py``) while it uses them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shlex
import subprocess
from pathlib import Path

BRIDGE_PREFIX = "iwbr"
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def bridge_name(index: int) -> str:
    return f"{BRIDGE_PREFIX}{index}"


def node_ip(index: int) -> str:
    return f"10.244.{index}.1"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()} (the cluster needs root)")
    return proc


def create_bridge(index: int) -> None:
    """Create and bring up ``iwbr<index>`` with the node's address (replacing a stale one)."""
    name = bridge_name(index)
    delete_bridge(name)
    _ip("link", "add", name, "type", "bridge")
    _ip("addr", "add", f"{node_ip(index)}/24", "dev", name)
    _ip("link", "set", name, "up")


def delete_bridge(name: str) -> None:
    _ip("link", "delete", name, check=False)


def our_bridges() -> list[str]:
    """Every bridge on the machine named like ours (a killed run may have left some)."""
    out = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(BRIDGE_PREFIX) and n[len(BRIDGE_PREFIX) :].isdigit()]


def write_cni_config(conf_dir: Path, ipam_dir: Path, index: int, node_name: str) -> Path:
    """The node's CNI conflist: bridge + host-local IPAM with its state under ``ipam_dir``."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    ipam_dir.mkdir(parents=True, exist_ok=True)
    subnet = f"10.244.{index}.0/24"
    config = {
        "cniVersion": "1.0.0",
        "name": f"iw-{node_name}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge_name(index),
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [
                        [{"subnet": subnet, "rangeStart": f"10.244.{index}.10", "gateway": node_ip(index)}]
                    ],
                    "routes": [{"dst": POD_CIDR}, {"dst": SERVICE_CIDR}],
                },
            }
        ],
    }
    path = conf_dir / "10-imagewarm.conflist"
    path.write_text(json.dumps(config, indent=2))
    return path


def read_ip_forward() -> str:
    return _IP_FORWARD.read_text().strip()


def restore_ip_forward(value: str) -> None:
    with contextlib.suppress(OSError):
        _IP_FORWARD.write_text(value + "\n")


def _iptables(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True)


def delete_kube_chains() -> None:
    """Remove every ``KUBE-*`` chain and every rule jumping into one, in every table.

    kubelet and kube-proxy create them and never delete them; they are machine-wide."""
    for binary, table in itertools.product(("iptables", "ip6tables"), ("filter", "nat", "mangle")):
        rules = _iptables(binary, "-t", table, "-S").stdout.splitlines()
        # Rules of built-in chains that jump into ours: delete them (-A ... -> -D ...).
        for rule in rules:
            if rule.startswith("-A ") and " -j KUBE-" in rule and not rule.split()[1].startswith("KUBE-"):
                _iptables(binary, "-t", table, *shlex.split("-D" + rule[2:]))
        chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
        for chain in chains:
            _iptables(binary, "-t", table, "-F", chain)
        for chain in chains:
            _iptables(binary, "-t", table, "-X", chain)


def delete_cni_results(network_prefix: str = "iw-") -> None:
    """Remove the CNI result cache entries of our networks (``/var/lib/cni/results``)."""
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        for entry in results.glob(f"{network_prefix}*"):
            with contextlib.suppress(OSError):
                entry.unlink()
