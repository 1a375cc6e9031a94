"""`imagewarm warm` in cluster mode against the real API server: the job it creates passes the CRD's
validation with the flags mapped to its fields, Ctrl-C leaves it running and says how to follow and
delete it, and `imagewarm status` lists it among the jobs in progress."""

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
from localcluster.cluster import Cluster

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
