"""How `imagewarm demo` reports a failure: a step's error (the harness's own types) in one line, any
other exception (a bug) with its traceback."""

from __future__ import annotations

import io
import subprocess

import pytest

from imagewarm.warmup import ManifestUnknown, ProxyUnreachable
from localcluster import demo
from localcluster.binaries import BuildError
from localcluster.cluster import ClusterError, KubectlError
from localcluster.containerd import ContainerdError
from localcluster.images import PushError
from localcluster.processes import DaemonError, MissingTool
from localcluster.stack import StackError

STEP_ERRORS = [
    BuildError("go build k8s.io/kubernetes/cmd/kubelet failed"),
    ClusterError("kubelet iw-node-2 exited"),
    KubectlError(1, ["kubectl", "--kubeconfig", "k", "wait", "pod/x"], "", "timed out"),
    ContainerdError("ctr images rm failed"),
    DaemonError("registry did not start"),
    demo.StepError("hosts.toml does not list the peer proxy"),
    MissingTool("docker-registry not found: install the Debian package docker-registry"),
    PushError("PUT /v2/demo/app/manifests/1 answered 500"),
    StackError("imagewarm proxy did not start"),
    ProxyUnreachable("nothing answers at http://127.0.0.1:7439"),
    ManifestUnknown("demo/app:1 does not exist upstream"),
    subprocess.CalledProcessError(2, ["ip", "link", "add"]),
]


def raised(exc: Exception) -> Exception:
    """`exc` as raised (with a traceback), from a frame whose name the report must show."""

    def a_step_of_the_demo() -> None:
        raise exc

    try:
        a_step_of_the_demo()
    except Exception as caught:
        return caught
    raise AssertionError("unreachable")


@pytest.mark.parametrize("exc", STEP_ERRORS, ids=lambda e: type(e).__name__)
def test_a_steps_error_is_one_line_without_a_traceback(exc):
    out = io.StringIO()
    assert demo.failed(raised(exc), out) == 1
    assert out.getvalue() == f"imagewarm demo failed: {exc}\n"


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("status"),
        TypeError("'NoneType' object is not subscriptable"),
        AttributeError("'Stack' object has no attribute 'peer'"),
        RuntimeError("a plain RuntimeError is not a step's error"),
        NotImplementedError("a RuntimeError too"),
        RecursionError("maximum recursion depth exceeded"),
        ValueError("x"),
        AssertionError("unreachable"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_any_other_exception_is_a_bug_shown_with_its_traceback(exc):
    out = io.StringIO()
    assert demo.failed(raised(exc), out) == 1
    text = out.getvalue()
    assert text.startswith(
        "imagewarm demo failed unexpectedly (a bug: please report it with this traceback):"
    )
    assert "Traceback (most recent call last):" in text and "in a_step_of_the_demo" in text
    assert f"{type(exc).__name__}: " in text
