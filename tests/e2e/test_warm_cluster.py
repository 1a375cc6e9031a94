"""`imagewarm warm` in cluster mode against the real API server: the job it creates passes the CRD's
validation with the flags mapped to its fields, Ctrl-C leaves it running and says how to follow and
delete it, `imagewarm status` lists it among the jobs in progress; with the real controller and
simulated node agents it follows the job to the end, a progress bar per node and a summary, exit 0
only when every node succeeded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imagewarm import api
from localcluster.agentsim import AgentSim, fake_digest
from localcluster.cluster import Cluster
from tests.fixtures.controller import ControllerProcess, Held, unique_image

pytestmark = pytest.mark.e2e

CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "imagewarm" / "crds"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEWARM_", "PROMETHEUS_"))}


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "-f", str(CRD_DIR))
    names = [r.crd_name for r in api.RESOURCES]
    cluster.kubectl(
        "wait", "--for", "condition=Established", "--timeout", "60s", *(f"crd/{n}" for n in names)
    )
    return cluster


def _jobs(cluster: Cluster, kind: str, namespace: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("-n", namespace, "get", kind, "-o", "json").stdout
    return json.loads(out)["items"]  # type: ignore[no-any-return]


def _interrupted(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `imagewarm warm ARGS` in cluster mode, Ctrl-C it once it follows its job."""
    argv = [sys.executable, "-m", "imagewarm", "warm", "--kubeconfig", str(cluster.kubeconfig), *args]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in process.stderr:
        seen.append(line)
        if line.startswith("created ") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, process.returncode, out, "".join(seen) + err)


def test_ctrl_c_leaves_the_image_pull_job_running_and_status_lists_it(crds: Cluster, namespace: str) -> None:
    node = crds.nodes[0].name
    warmed = _interrupted(
        crds, "nginx:1.27", "--namespace", namespace, "--nodes", node, "--parallelism", "50%",
        "--pull-secret", "registry-cred",
    )  # fmt: skip
    assert warmed.returncode == 130, warmed.stderr
    (job,) = _jobs(crds, "imagepulljobs", namespace)
    name = job["metadata"]["name"]
    assert name.startswith("warm-")
    assert f"created ImagePullJob {namespace}/{name}" in warmed.stderr
    assert f"kubectl -n {namespace} delete imagepulljob {name}" in warmed.stderr
    assert job["spec"]["image"] == "docker.io/library/nginx:1.27"
    assert job["spec"]["selector"] == {"names": [node]} and job["spec"]["parallelism"] == "50%"
    assert job["spec"]["pullSecrets"] == ["registry-cred"]
    assert job["spec"]["completionPolicy"]["type"] == "Always"

    shown = subprocess.run(
        [sys.executable, "-m", "imagewarm", "status", "--kubeconfig", str(crds.kubeconfig), "--proxy",
         "http://127.0.0.1:9"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    jobs_at = lines.index("pull jobs in progress")
    assert any(line.split()[:2] == [f"{namespace}/{name}", "nginx:1.27"] for line in lines[jobs_at:])
    assert any(line.startswith("http://127.0.0.1:9") and "unreachable" in line for line in lines)


def test_several_images_make_one_image_list_pull_job(crds: Cluster, namespace: str) -> None:
    warmed = _interrupted(crds, "nginx:1.27", "redis:7", "--namespace", namespace, "--selector", "pool=none")
    assert warmed.returncode == 130, warmed.stderr
    (job,) = _jobs(crds, "imagelistpulljobs", namespace)
    assert job["spec"]["images"] == ["docker.io/library/nginx:1.27", "docker.io/library/redis:7"]
    assert job["spec"]["selector"] == {"matchLabels": {"pool": "none"}}
    assert f"kubectl -n {namespace} delete imagelistpulljob {job['metadata']['name']}" in warmed.stderr


def test_a_missing_namespace_is_a_clear_error(crds: Cluster) -> None:
    warmed = subprocess.run(
        [sys.executable, "-m", "imagewarm", "warm", "nginx", "--kubeconfig", str(crds.kubeconfig),
         "--namespace", "no-such-namespace"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert warmed.returncode == 2
    assert "namespace no-such-namespace does not exist" in warmed.stderr


# --- followed to the end: the real controller and the simulated node agents (localcluster/agentsim.py;
# the real agent lands with the proxy). Last in the module: from here on, tasks on every node complete.


def _warm(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagewarm", "warm", "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True, text=True, env=_env(), timeout=180,
    )  # fmt: skip


def _summary(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = lines.index("summary")
    return [line.split(None, 5) for line in lines[start + 3 :]]


def test_a_warm_followed_to_the_end_succeeds_on_every_node(
    crds: Cluster, namespace: str, controller: ControllerProcess, agents: tuple[AgentSim, Held]
) -> None:
    image, name = unique_image("warm")
    nodes = [n.name for n in crds.nodes]
    warmed = _warm(crds, image, "--namespace", namespace, *(a for n in nodes for a in ("--nodes", n)))
    assert warmed.returncode == 0, warmed.stderr
    for node in nodes:
        assert f"{node}  {image}  [{'#' * 20}] 100%  Succeeded" in warmed.stderr
    rows = _summary(warmed.stdout)
    assert [r[:3] for r in rows] == [[n, "Succeeded", fake_digest(name, "1")] for n in nodes]


def test_a_list_warm_with_a_failing_node_exits_1_saying_why(
    crds: Cluster, namespace: str, controller: ControllerProcess, agents: tuple[AgentSim, Held]
) -> None:
    (first, _), (second, second_name) = unique_image("ok"), unique_image("denied")
    failing = crds.nodes[1].name
    _, rules = agents
    with rules.lock:
        rules.failures[f"{failing}/{second_name}"] = "401 unauthorized: give the job pullSecrets"
    warmed = _warm(crds, first, second, "--namespace", namespace, "--selector", "kubernetes.io/os=linux")
    assert warmed.returncode == 1, warmed.stderr
    rows = {(r[0], r[1]): r for r in _summary(warmed.stdout)}
    for node in (n.name for n in crds.nodes):
        assert rows[(node, first)][2] == "Succeeded"
    assert rows[(failing, second)][2] == "Failed"
    assert rows[(failing, second)][5] == "401 unauthorized: give the job pullSecrets"
    assert "did not succeed on every node" in warmed.stderr
