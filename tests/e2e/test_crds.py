"""The CRDs against a real kube-apiserver: they install and become Established, the manifests in
examples/ apply as written (OpenKruise's use cases, in our group), the server fills the defaults, rejects
invalid objects with a message that says what to fix, serves the status subresource, and prints
the columns users expect from OpenKruise."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagewarm import api
from localcluster.cluster import Cluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "imagewarm" / "crds"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    """The cluster with every CRD applied from the chart's crds/ directory and Established."""
    cluster.kubectl("apply", "-f", str(CRD_DIR))
    names = [r.crd_name for r in api.RESOURCES]
    cluster.kubectl(
        "wait", "--for", "condition=Established", "--timeout", "60s", *(f"crd/{n}" for n in names)
    )
    return cluster


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)  # type: ignore[no-any-return]


def create(cluster: Cluster, obj: dict[str, Any], *args: str) -> dict[str, Any]:
    out = cluster.kubectl("create", "-o", "json", *args, "-f", "-", input=json.dumps(obj)).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def rejected(cluster: Cluster, obj: dict[str, Any], *args: str) -> str:
    """The API server's error for `obj` (a server-side dry run); fails the test if it is accepted."""
    proc = cluster.kubectl("create", "--dry-run=server", *args, "-f", "-", input=json.dumps(obj), check=False)
    assert proc.returncode != 0, f"the API server accepted an invalid object: {obj}"
    return proc.stderr


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": api.api_version(), "kind": "ImagePullJob", "metadata": {"name": name}, "spec": spec}


def table(cluster: Cluster, *args: str) -> list[dict[str, str]]:
    """`kubectl get` output as one dict per row, keyed by column header."""
    lines = cluster.kubectl("get", *args).stdout.splitlines()
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


# --- installation ---------------------------------------------------------------------------------


def test_every_crd_is_established_and_structural(crds: Cluster) -> None:
    for resource in api.RESOURCES:
        conditions = {
            c["type"]: c["status"] for c in get(crds, "crd", resource.crd_name)["status"]["conditions"]
        }
        assert conditions.get("Established") == "True", conditions
        assert conditions.get("NamesAccepted") == "True", conditions
        assert "NonStructuralSchema" not in conditions, conditions
    # Short names and the category resolve through discovery.
    crds.kubectl("get", "ipj,ilpj,ni,sidecars,cachedimg", "-A")
    crds.kubectl("get", "imagewarm", "-A")


def test_resource_paths_match_the_server(crds: Cluster, namespace: str) -> None:
    for resource in api.RESOURCES:
        path = resource.path(namespace=namespace) if resource.namespaced else resource.path()
        listing = json.loads(crds.kubectl("get", "--raw", path).stdout)
        assert listing["kind"] == f"{resource.kind}List"
        assert listing["apiVersion"] == api.api_version()


# --- the examples in examples/ ---------------------------------------------------------------------

# A merge patch of a NodeImage, not an object (see the file's comment).
NODEIMAGE_PATCH = EXAMPLES / "nodeimage-task.yaml"
OBJECT_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if p != NODEIMAGE_PATCH)


def example_objects() -> list[dict[str, Any]]:
    return [d for p in OBJECT_EXAMPLES for d in yaml.safe_load_all(p.read_text()) if d]


def missing(source: Any, stored: Any, path: str = "") -> Iterator[str]:
    """Where `stored` lacks or changed what `source` set (defaults the server added are fine)."""
    if isinstance(source, dict) and isinstance(stored, dict):
        for key, value in source.items():
            if key not in stored:
                yield f"{path}.{key}: pruned"
            else:
                yield from missing(value, stored[key], f"{path}.{key}")
    elif isinstance(source, list) and isinstance(stored, list) and len(source) == len(stored):
        for i, (a, b) in enumerate(zip(source, stored, strict=True)):
            yield from missing(a, b, f"{path}[{i}]")
    elif source != stored:
        yield f"{path}: {source!r} stored as {stored!r}"


@pytest.fixture
def applied(crds: Cluster, namespace: str) -> Iterator[dict[str, dict[str, Any]]]:
    """Every object example applied as a user would (`kubectl apply -n NS -f FILE`), as stored."""
    args = [a for p in OBJECT_EXAMPLES for a in ("-f", str(p))]
    assert len(OBJECT_EXAMPLES) >= 10, f"the examples are missing from {EXAMPLES}"
    crds.kubectl("apply", "-n", namespace, *args)
    try:
        stored = {}
        for obj in example_objects():
            scope = ("-n", namespace) if obj["kind"] in ("ImagePullJob", "ImageListPullJob") else ()
            stored[obj["metadata"]["name"]] = get(crds, obj["kind"].lower(), obj["metadata"]["name"], *scope)
        yield stored
    finally:
        crds.kubectl("delete", "-n", namespace, "--ignore-not-found", "--wait=false", *args)


def test_every_example_is_accepted_and_stored_as_written(applied: dict[str, dict[str, Any]]) -> None:
    for obj in example_objects():
        stored = applied[obj["metadata"]["name"]]
        assert list(missing(obj["spec"], stored["spec"])) == [], obj["metadata"]["name"]
        for key, value in (obj["metadata"].get("annotations") or {}).items():
            assert stored["metadata"]["annotations"][key] == value


def test_examples_get_the_documented_defaults(applied: dict[str, dict[str, Any]]) -> None:
    where_pods_run = applied["warm-payments-api-3"]["spec"]
    assert where_pods_run["parallelism"] == 1
    assert where_pods_run["completionPolicy"] == {"type": "Always"}
    assert where_pods_run["pullPolicy"] == {"backoffLimit": 3, "timeoutSeconds": 600}
    assert where_pods_run["imagePullPolicy"] == "IfNotPresent"
    base = applied["keep-base-image"]["spec"]
    assert base["completionPolicy"] == {"type": "Never"}
    assert base["pullPolicy"] == {"backoffLimit": 3, "timeoutSeconds": 300}
    assert applied["warm-frontend"]["spec"]["parallelism"] == "25%"
    sidecarset = applied["log-shipper"]
    assert sidecarset["metadata"]["annotations"][api.PREDOWNLOAD_PARALLELISM_ANNOTATION] == "10"
    cached = applied[api.cached_image_name("registry.example.com/ops/recovery-toolbox:3.1")]
    assert cached["spec"]["retain"] is True


def test_nodeimage_task_example_patches_a_nodeimage(crds: Cluster) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    create(
        crds, {"apiVersion": api.api_version(), "kind": "NodeImage", "metadata": {"name": name}, "spec": {}}
    )
    try:
        crds.kubectl("patch", "nodeimage", name, "--type=merge", "--patch-file", str(NODEIMAGE_PATCH))
        stored = get(crds, "nodeimage", name)
        assert stored["spec"] == yaml.safe_load(NODEIMAGE_PATCH.read_text())["spec"]
        # A task without pullPolicy numbers gets the documented defaults.
        crds.kubectl(
            "patch", "nodeimage", name, "--type=merge", "-p",
            json.dumps({"spec": {"images": {"busybox": {"tags": [{"tag": "1.36", "pullPolicy": {}}]}}}}),
        )  # fmt: skip
        tag = get(crds, "nodeimage", name)["spec"]["images"]["busybox"]["tags"][0]
        assert tag["pullPolicy"] == {"backoffLimit": 3, "timeoutSeconds": 600}
    finally:
        crds.kubectl("delete", "nodeimage", name, "--ignore-not-found")


def test_image_list_pull_job_defaults(crds: Cluster, namespace: str) -> None:
    stored = create(
        crds,
        {
            "apiVersion": api.api_version(),
            "kind": "ImageListPullJob",
            "metadata": {"name": "list"},
            "spec": {
                "images": ["nginx:1.27", "registry.example.com/app@sha256:" + "b" * 64],
                "parallelism": "50%",
            },
        },
        "-n",
        namespace,
    )
    assert stored["spec"]["parallelism"] == "50%"
    assert stored["spec"]["completionPolicy"] == {"type": "Always"}
    assert stored["spec"]["pullPolicy"] == {"backoffLimit": 3, "timeoutSeconds": 600}


# --- validation -----------------------------------------------------------------------------------


INVALID_JOBS = {
    "both selectors": (
        {"image": "nginx", "selector": {"names": ["n1"]}, "podSelector": {"matchLabels": {"app": "web"}}},
        "selector and podSelector are mutually exclusive",
    ),
    "names and matchLabels": (
        {"image": "nginx", "selector": {"names": ["n1"], "matchLabels": {"pool": "a"}}},
        "selector.names and selector.matchLabels/matchExpressions are mutually exclusive",
    ),
    "names and matchExpressions": (
        {
            "image": "nginx",
            "selector": {"names": ["n1"], "matchExpressions": [{"key": "k", "operator": "Exists"}]},
        },
        "mutually exclusive",
    ),
    "bad completion type": (
        {"image": "nginx", "completionPolicy": {"type": "Sometimes"}},
        'Unsupported value: "Sometimes": supported values: "Always", "Never"',
    ),
    "bad imagePullPolicy": (
        {"image": "nginx", "imagePullPolicy": "Never"},
        'supported values: "Always", "IfNotPresent"',
    ),
    "negative backoffLimit": (
        {"image": "nginx", "pullPolicy": {"backoffLimit": -1}},
        "spec.pullPolicy.backoffLimit in body should be greater than or equal to 0",
    ),
    "zero timeoutSeconds": (
        {"image": "nginx", "pullPolicy": {"timeoutSeconds": 0}},
        "spec.pullPolicy.timeoutSeconds in body should be greater than or equal to 1",
    ),
    "missing image": ({"parallelism": 2}, "spec.image: Required value"),
    "not an image": ({"image": "https://registry.example.com/app"}, "must be an image reference"),
    "parallelism abc": ({"image": "nginx", "parallelism": "abc"}, "must be a non-negative integer"),
    "parallelism 150%": ({"image": "nginx", "parallelism": "150%"}, "percentage from 0% to 100%"),
    "negative parallelism": ({"image": "nginx", "parallelism": -1}, "must be a non-negative integer"),
    "deadline on Never": (
        {"image": "nginx", "completionPolicy": {"type": "Never", "activeDeadlineSeconds": 60}},
        "only apply to completionPolicy.type Always",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_JOBS))
def test_invalid_image_pull_jobs_are_rejected_with_a_clear_message(
    crds: Cluster, namespace: str, case: str
) -> None:
    spec, message = INVALID_JOBS[case]
    assert message in rejected(crds, job("bad", **spec), "-n", namespace)


def sidecarset(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": api.api_version(), "kind": "SidecarSet", "metadata": {"name": "bad"}, "spec": spec}


SELECT = {"matchLabels": {"app": "web"}}
INVALID_SIDECARSETS = {
    "container without image": (
        {"selector": SELECT, "containers": [{"name": "c"}]},
        "containers[0].image: Required",
    ),
    "bad podInjectPolicy": (
        {"selector": SELECT, "containers": [{"name": "c", "image": "busybox", "podInjectPolicy": "Middle"}]},
        '"BeforeAppContainer", "AfterAppContainer"',
    ),
    "duplicate container": (
        {"selector": SELECT, "containers": [{"name": "c", "image": "a"}, {"name": "c", "image": "b"}]},
        "Duplicate value",
    ),
    "namespace and namespaceSelector": (
        {"selector": SELECT, "namespace": "a", "namespaceSelector": {"namespaces": ["b"]}},
        "namespace and namespaceSelector are mutually exclusive",
    ),
    "no selector": ({"containers": [{"name": "c", "image": "busybox"}]}, "spec.selector: Required value"),
}


@pytest.mark.parametrize("case", sorted(INVALID_SIDECARSETS))
def test_invalid_sidecarsets_are_rejected(crds: Cluster, case: str) -> None:
    spec, message = INVALID_SIDECARSETS[case]
    assert message in rejected(crds, sidecarset(**spec))


def test_sidecar_containers_keep_core_fields(crds: Cluster) -> None:
    """Fields of a core/v1 Container that the schema does not list are preserved, not pruned."""
    container = {"name": "c", "image": "busybox", "command": ["sh"], "resources": {"limits": {"cpu": "100m"}}}
    out = crds.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-",
        input=json.dumps(sidecarset(selector=SELECT, containers=[container])),
    ).stdout  # fmt: skip
    assert json.loads(out)["spec"]["containers"] == [{**container, "podInjectPolicy": "BeforeAppContainer"}]


def test_invalid_cached_image_and_node_image_are_rejected(crds: Cluster) -> None:
    cached = {"apiVersion": api.api_version(), "kind": "CachedImage", "metadata": {"name": "x"}, "spec": {}}
    assert "spec.sourceImage: Required value" in rejected(crds, cached)
    node_image = {
        "apiVersion": api.api_version(),
        "kind": "NodeImage",
        "metadata": {"name": "x"},
        "spec": {"images": {"ubuntu": {"tags": [{"tag": "a"}, {"tag": "a"}]}}},
    }
    assert "Duplicate value" in rejected(crds, node_image)


# --- status subresource and printer columns -------------------------------------------------------


def test_status_subresource_and_printer_columns(crds: Cluster, namespace: str) -> None:
    created = create(crds, job("warm", image="registry.example.com/app:1"), "-n", namespace)
    status = {
        "desired": 4,
        "active": 1,
        "succeeded": 2,
        "failed": 1,
        "failedNodes": ["n4"],
        "message": "1 failed",
    }
    crds.kubectl(
        "patch", "ipj", "warm", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status, "spec": {"image": "ignored:1"}}),
    )  # fmt: skip
    stored = get(crds, "ipj", "warm", "-n", namespace)
    assert stored["status"] == status
    assert stored["spec"]["image"] == "registry.example.com/app:1", (
        "the status subresource must not change spec"
    )
    assert stored["metadata"]["generation"] == created["metadata"]["generation"]
    # ...and the main resource ignores status.
    crds.kubectl(
        "patch", "ipj", "warm", "-n", namespace, "--type=merge", "-p", json.dumps({"status": {"desired": 99}})
    )
    assert get(crds, "ipj", "warm", "-n", namespace)["status"]["desired"] == 4

    [row] = table(crds, "ipj", "-n", namespace)
    assert row["NAME"] == "warm"
    assert (row["TOTAL"], row["ACTIVE"], row["SUCCEED"], row["FAILED"]) == ("4", "1", "2", "1")
    assert row["AGE"]
    [wide] = table(crds, "ipj", "-n", namespace, "-o", "wide")
    assert wide["MESSAGE"] == "1 failed"


def test_nodeimage_and_cachedimage_columns(crds: Cluster) -> None:
    suffix = uuid.uuid4().hex[:8]
    node = f"node-{suffix}"
    image = "docker.io/library/nginx:1.27"
    cached = api.cached_image_name(image + suffix)
    create(crds, {"apiVersion": api.api_version(), "kind": "NodeImage", "metadata": {"name": node}})
    create(
        crds,
        {
            "apiVersion": api.api_version(),
            "kind": "CachedImage",
            "metadata": {"name": cached},
            "spec": {"sourceImage": image, "expiresAt": "2030-01-01T00:00:00Z"},
        },
    )
    try:
        crds.kubectl(
            "patch", "nodeimage", node, "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"desired": 3, "pulling": 1, "succeeded": 1, "failed": 1, "waiting": 0,
                                   "imageStatuses": {"ubuntu": {"tags": [
                                       {"tag": "latest", "phase": "Pulling", "progress": 40}]}}}}),
        )  # fmt: skip
        row = next(r for r in table(crds, "nodeimages") if r["NAME"] == node)
        assert (row["DESIRED"], row["PULLING"], row["SUCCEED"], row["FAILED"]) == ("3", "1", "1", "1")

        bad_phase = {"status": {"imageStatuses": {"u": {"tags": [{"tag": "t", "phase": "Done"}]}}}}
        proc = crds.kubectl(
            "patch", "nodeimage", node, "--subresource=status", "--type=merge", "-p", json.dumps(bad_phase),
            check=False,
        )  # fmt: skip
        assert proc.returncode != 0
        assert '"Waiting", "Pulling", "Succeeded", "Failed"' in proc.stderr

        crds.kubectl(
            "patch", "cachedimage", cached, "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Cached", "size": 123456, "nodes": ["iw-node-1", "iw-node-2"],
                                   "usedBy": {"pods": ["default/web-1"], "count": 1}}}),
        )  # fmt: skip
        row = next(r for r in table(crds, "cachedimg") if r["NAME"] == cached)
        assert row["SOURCE"] == image
        assert row["PHASE"] == "Cached"
        assert row["SIZE"] == "123456"
        assert "iw-node-1" in row["NODES"] and "iw-node-2" in row["NODES"]
        assert row["USED-BY"] == "1"
        assert row["EXPIRES"] == "2030-01-01T00:00:00Z"
        stored = get(crds, "cachedimg", cached)
        assert stored["spec"]["retain"] is False
    finally:
        crds.kubectl("delete", "nodeimage", node, "--ignore-not-found")
        crds.kubectl("delete", "cachedimage", cached, "--ignore-not-found")
