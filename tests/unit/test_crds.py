"""The CRDs in charts/imagewarm/crds/ are well formed, structural and agree with imagewarm.api; the
manifests in examples/ are valid against them and use only declared fields (an undeclared field
would be pruned silently by the API server). The API server's own verdict is in tests/e2e/test_crds.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from imagewarm import api

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "imagewarm" / "crds"
EXAMPLES = REPO / "examples"

CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one CRD per file, found {len(docs)} documents"
    return docs[0]  # type: ignore[no-any-return]


CRDS = {path.stem: load(path) for path in CRD_FILES}


def crd_for(kind: str) -> dict[str, Any]:
    return next(c for c in CRDS.values() if c["spec"]["names"]["kind"] == kind)


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``.spec.images[*]``, ``.spec.images.*``)."""
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from walk(node["items"], f"{path}[*]")


def at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The schema node of a simple JSON path like ``.spec.pullPolicy.backoffLimit``."""
    node = schema
    for name in dotted.strip(".").split("."):
        node = node["properties"][name]
    return node


def test_there_is_one_file_per_kind_named_after_it() -> None:
    assert {c["spec"]["names"]["kind"] for c in CRDS.values()} == {r.kind for r in api.RESOURCES}
    for stem, crd in CRDS.items():
        assert stem == crd["spec"]["names"]["singular"], f"{stem}.yaml should be named <singular>.yaml"


@pytest.mark.parametrize("resource", api.RESOURCES, ids=lambda r: r.kind)
def test_names_agree_with_the_api_module(resource: api.Resource) -> None:
    crd = crd_for(resource.kind)
    names = crd["spec"]["names"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == resource.crd_name == f"{names['plural']}.{api.GROUP}"
    assert crd["spec"]["group"] == api.GROUP
    assert names["plural"] == resource.plural
    assert names["singular"] == resource.singular
    assert names["listKind"] == resource.kind + "List"
    assert tuple(names["shortNames"]) == resource.short_names
    assert "imagewarm" in names["categories"]
    assert crd["spec"]["scope"] == ("Namespaced" if resource.namespaced else "Cluster")
    [version] = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == (api.VERSION, True, True)
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("stem", sorted(CRDS))
def test_schema_is_structural(stem: str) -> None:
    """Every node has a type (int-or-string nodes excepted), as apiextensions/v1 requires."""
    schema = schema_of(CRDS[stem])
    assert schema["type"] == "object"
    for path, node in walk(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, f"{stem}{path}: int-or-string takes no type"
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, (
            f"{stem}{path} has no type"
        )
        if node["type"] == "array":
            assert "items" in node, f"{stem}{path}: an array needs items"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), (
                f"{stem}{path}: map keys must be required"
            )
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("rule") and rule.get("message"), f"{stem}{path}: every CEL rule says what to do"


@pytest.mark.parametrize("stem", sorted(CRDS))
def test_printer_columns_point_at_declared_fields(stem: str) -> None:
    version = CRDS[stem]["spec"]["versions"][0]
    declared = {path for path, _ in walk(schema_of(CRDS[stem]))}
    columns = version["additionalPrinterColumns"]
    for column in columns:
        path = column["jsonPath"]
        assert path == ".metadata.creationTimestamp" or path in declared, (
            f"{stem}: {path} is not in the schema"
        )
        node_type = (
            "date" if path == ".metadata.creationTimestamp" else at(schema_of(CRDS[stem]), path)["type"]
        )
        if column["type"] in {"integer", "boolean"}:
            assert node_type == column["type"], f"{stem}: column {column['name']} is {column['type']}"


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("ImagePullJob", ["TOTAL", "ACTIVE", "SUCCEED", "FAILED", "AGE"]),
        ("ImageListPullJob", ["TOTAL", "SUCCEEDED", "COMPLETED", "AGE"]),
        ("NodeImage", ["DESIRED", "PULLING", "SUCCEED", "FAILED", "AGE"]),
        ("SidecarSet", ["MATCHED", "UPDATED", "READY", "AGE"]),
        ("CachedImage", ["SOURCE", "PHASE", "SIZE", "NODES", "USED-BY", "EXPIRES"]),
    ],
)
def test_default_printer_columns_are_openkruises(kind: str, names: list[str]) -> None:
    columns = crd_for(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == names


@pytest.mark.parametrize("kind", ["ImagePullJob", "ImageListPullJob"])
@pytest.mark.parametrize(
    ("path", "default"),
    [
        (".spec.parallelism", 1),
        (".spec.completionPolicy", {}),
        (".spec.completionPolicy.type", "Always"),
        (".spec.pullPolicy", {}),
        (".spec.pullPolicy.backoffLimit", 3),
        (".spec.pullPolicy.timeoutSeconds", 600),
        (".spec.imagePullPolicy", "IfNotPresent"),
    ],
)
def test_job_defaults(kind: str, path: str, default: object) -> None:
    assert at(schema_of(crd_for(kind)), path)["default"] == default


def test_defaults_match_the_api_constants() -> None:
    schema = schema_of(crd_for("ImagePullJob"))
    assert at(schema, ".spec.parallelism")["default"] == api.DEFAULT_PARALLELISM
    assert at(schema, ".spec.pullPolicy.backoffLimit")["default"] == api.DEFAULT_BACKOFF_LIMIT
    assert at(schema, ".spec.pullPolicy.timeoutSeconds")["default"] == api.DEFAULT_TIMEOUT_SECONDS


def test_enums() -> None:
    job = schema_of(crd_for("ImagePullJob"))
    assert at(job, ".spec.completionPolicy.type")["enum"] == ["Always", "Never"]
    assert at(job, ".spec.imagePullPolicy")["enum"] == ["Always", "IfNotPresent"]
    tag_status = at(schema_of(crd_for("NodeImage")), ".status.imageStatuses")["additionalProperties"]
    assert tag_status["properties"]["tags"]["items"]["properties"]["phase"]["enum"] == [
        "Waiting",
        "Pulling",
        "Succeeded",
        "Failed",
    ]
    container = at(schema_of(crd_for("SidecarSet")), ".spec.containers")["items"]
    assert container["properties"]["podInjectPolicy"]["enum"] == ["BeforeAppContainer", "AfterAppContainer"]
    assert container["required"] == ["name", "image"]
    assert container["x-kubernetes-preserve-unknown-fields"] is True


# --- the CEL rules, evaluated here with Python's re (RE2 and re agree on this regex subset) ------


def image_rules() -> list[tuple[str, str]]:
    found = []
    for stem, crd in CRDS.items():
        for path, node in walk(schema_of(crd)):
            for rule in node.get("x-kubernetes-validations", []):
                if rule["rule"].startswith("self.matches(r'"):
                    found.append((f"{stem}{path}", rule["rule"]))
    return found


def image_pattern() -> re.Pattern[str]:
    rules = {rule for _, rule in image_rules()}
    assert len(rules) == 1, f"every image field should share one rule, found {len(rules)}"
    [rule] = rules
    return re.compile(rule.removeprefix("self.matches(r'").removesuffix("')"))


def test_every_image_field_is_checked() -> None:
    checked = {path.split(".", 1)[1] for path, _ in image_rules()}
    assert checked == {
        "spec.image",
        "spec.images[*]",
        "spec.containers[*].image",
        "spec.initContainers[*].image",
        "spec.sourceImage",
    }


DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "image",
    [
        "nginx",
        "nginx:1.9.1",
        "registry.example.com/base-image:latest",
        "registry.corp:5000/team/app:1",
        f"nginx@{DIGEST}",
        f"docker.io/library/nginx:1.27@{DIGEST}",
        "localhost:7439/registry.corp_5000/app:1",
        "[::1]:5000/app:v1",
        "Registry.Example.com/app",
    ],
)
def test_image_rule_accepts_references(image: str) -> None:
    assert image_pattern().match(image)


@pytest.mark.parametrize(
    "image",
    [
        "",
        "nginx 1.9",
        "https://registry.example.com/app",
        "registry/App:1",
        "nginx:",
        "app@sha256:short",
        "-app",
    ],
)
def test_image_rule_rejects_non_references(image: str) -> None:
    assert not image_pattern().match(image)


def percent_pattern() -> re.Pattern[str]:
    [rule] = at(schema_of(crd_for("ImagePullJob")), ".spec.parallelism")["x-kubernetes-validations"]
    return re.compile(re.search(r"matches\('(.*)'\)", rule["rule"]).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "ok"),
    [("0%", True), ("50%", True), ("100%", True), ("101%", False), ("abc", False), ("5", False)],
)
def test_parallelism_percent_rule(text: str, ok: bool) -> None:
    assert bool(percent_pattern().match(text)) is ok
    if ok:
        assert api.resolve_parallelism(text, 10) >= 0
    else:
        with pytest.raises(ValueError):
            api.resolve_parallelism(text, 10)


# --- the examples in examples/ are valid against the schemas, and declare nothing they would prune


def undeclared(value: Any, node: dict[str, Any], path: str = "") -> Iterator[str]:
    if node.get("x-kubernetes-preserve-unknown-fields") and not node.get("properties"):
        return
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, child in value.items():
            if key in props:
                yield from undeclared(child, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from undeclared(child, extra, f"{path}.{key}")
            elif not node.get("x-kubernetes-preserve-unknown-fields"):
                yield f"{path}.{key}"
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from undeclared(item, node["items"], f"{path}[{i}]")


JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def in_bounds(value: int, node: dict[str, Any]) -> bool:
    return bool(node.get("minimum", value) <= value <= node.get("maximum", value))


def violations(value: Any, node: dict[str, Any], path: str = "") -> Iterator[str]:
    """What the API server's schema validation would reject in `value` (the subset of OpenAPI our
    CRDs use: type, required, enum, bounds, lengths, item counts, list-map keys, and the image and
    percentage CEL rules, evaluated with re); the CEL rules across fields are checked in e2e."""
    if node.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            yield f"{path}: must be an integer or a string"
    elif "type" in node:
        kind = JSON_TYPES[node["type"]]
        if not isinstance(value, kind) or (node["type"] != "boolean" and isinstance(value, bool)):
            yield f"{path}: must be {node['type']}, not {type(value).__name__}"
            return
    if "enum" in node and value not in node["enum"]:
        yield f"{path}: {value!r} is not one of {node['enum']}"
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            yield f"{path}: length {len(value)} is out of bounds"
        for rule in node.get("x-kubernetes-validations", []):
            if rule["rule"].startswith("self.matches(r'") and not image_pattern().match(value):
                yield f"{path}: {rule['message']}"
    if isinstance(value, int) and not in_bounds(value, node):
        yield f"{path}: {value} is out of bounds"
    if node.get("x-kubernetes-int-or-string") and node.get("x-kubernetes-validations"):
        # parallelism's rule: a non-negative count or a percentage
        ok = value >= 0 if isinstance(value, int) else bool(percent_pattern().match(str(value)))
        if not ok:
            yield f"{path}: {value!r} is neither a non-negative count nor a percentage"
    if isinstance(value, dict):
        for key in node.get("required", []):
            if key not in value:
                yield f"{path}.{key}: required"
        if len(value) > node.get("maxProperties", len(value)):
            yield f"{path}: more than {node['maxProperties']} properties"
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, child in value.items():
            if key in props:
                yield from violations(child, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from violations(child, extra, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0) or len(value) > node.get("maxItems", len(value)):
            yield f"{path}: {len(value)} items is out of bounds"
        if node.get("x-kubernetes-list-type") == "set" and len(set(map(repr, value))) != len(value):
            yield f"{path}: duplicate items in a set"
        if node.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in node["x-kubernetes-list-map-keys"]) for item in value]
            if len(set(keys)) != len(keys):
                yield f"{path}: duplicate map keys"
        for i, item in enumerate(value):
            yield from violations(item, node["items"], f"{path}[{i}]")


EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
# A merge patch, not an object: `kubectl patch nodeimage NODE --type=merge --patch-file ...`.
PATCHES = {"nodeimage-task.yaml": "NodeImage"}


def example_documents() -> list[tuple[str, str, dict[str, Any]]]:
    """(file#index, kind, document) for every document in examples/."""
    docs = []
    for path in EXAMPLE_FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{i}", PATCHES.get(path.name) or doc.get("kind", ""), doc))
    return docs


def test_the_examples_cover_every_kind_and_the_documented_uses() -> None:
    docs = example_documents()
    assert {kind for _, kind, _ in docs} == {r.kind for r in api.RESOURCES}
    jobs = [d["spec"] for _, kind, d in docs if kind == "ImagePullJob"]
    assert any(j.get("completionPolicy", {}).get("type") == "Never" for j in jobs)
    assert any(
        {"activeDeadlineSeconds", "ttlSecondsAfterFinished"} <= set(j.get("completionPolicy", {}))
        for j in jobs
    )
    assert any("matchLabels" in j.get("selector", {}) for j in jobs)
    assert any("names" in j.get("selector", {}) for j in jobs)
    assert any("podSelector" in j for j in jobs)
    assert any(j.get("pullSecrets") for j in jobs)
    assert any(str(j.get("parallelism", "")).endswith("%") for j in jobs)
    [sidecarset] = [d for _, kind, d in docs if kind == "SidecarSet"]
    assert api.PREDOWNLOAD_PARALLELISM_ANNOTATION in sidecarset["metadata"]["annotations"]
    assert api.PREDOWNLOAD_TIMEOUT_ANNOTATION in sidecarset["metadata"]["annotations"]
    [cached] = [d for _, kind, d in docs if kind == "CachedImage"]
    assert cached["spec"]["retain"] is True


def test_every_example_file_is_listed_in_the_index_and_says_how_to_apply_it() -> None:
    index = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLE_FILES:
        assert f"]({path.name})" in index, f"examples/README.md does not list {path.name}"
        text = path.read_text()
        assert text.startswith("# "), f"{path.name}: say what it does in a comment at the top"
        assert f"examples/{path.name}" in text, f"{path.name}: show the kubectl command that applies it"


@pytest.mark.parametrize(
    ("name", "kind", "doc"), example_documents(), ids=[n for n, _, _ in example_documents()]
)
def test_examples_are_valid_and_use_only_declared_fields(name: str, kind: str, doc: dict[str, Any]) -> None:
    schema = schema_of(crd_for(kind))
    body = {k: v for k, v in doc.items() if k != "metadata"}
    if kind not in PATCHES.values():
        assert doc["apiVersion"] == api.api_version()
        assert DNS_SUBDOMAIN.match(doc["metadata"]["name"]), doc["metadata"]["name"]
        assert "namespace" not in doc["metadata"], "pick the namespace with kubectl -n, not in the file"
    assert list(undeclared(body, schema)) == []
    assert list(violations(body, schema)) == []


def test_the_validator_finds_what_the_api_server_would_reject() -> None:
    """violations() is what the examples test relies on: it must see each kind of mistake."""
    schema = schema_of(crd_for("ImagePullJob"))
    bad = {
        "spec": {
            "image": "https://registry.example.com/app",
            "parallelism": "150%",
            "completionPolicy": {"type": "Sometimes"},
            "pullPolicy": {"backoffLimit": -1, "timeoutSeconds": "10"},
            "pullSecrets": [""],
        }
    }
    found = "\n".join(violations(bad, schema))
    for path in [
        ".spec.image",
        ".spec.parallelism",
        ".spec.completionPolicy.type",
        ".spec.pullPolicy.backoffLimit",
        ".spec.pullPolicy.timeoutSeconds",
        ".spec.pullSecrets[0]",
    ]:
        assert f"{path}:" in found, f"{path} not reported in:\n{found}"
    assert list(violations({"spec": {}}, schema)) == [".spec.image: required"]
    sidecars = schema_of(crd_for("SidecarSet"))
    twice = {
        "spec": {"selector": {}, "containers": [{"name": "a", "image": "a"}, {"name": "a", "image": "b"}]}
    }
    assert list(violations(twice, sidecars)) == [".spec.containers: duplicate map keys"]


# --- imagewarm.api helpers ------------------------------------------------------------------------


def test_api_version() -> None:
    assert api.api_version() == "imagewarm.io/v1alpha1"


def test_resource_paths() -> None:
    assert (
        api.IMAGE_PULL_JOB.path(namespace="ns") == "/apis/imagewarm.io/v1alpha1/namespaces/ns/imagepulljobs"
    )
    assert (
        api.NODE_IMAGE.path("node-1", subresource="status")
        == "/apis/imagewarm.io/v1alpha1/nodeimages/node-1/status"
    )
    with pytest.raises(ValueError, match="cluster-scoped"):
        api.NODE_IMAGE.path("n", namespace="ns")
    with pytest.raises(ValueError, match="name"):
        api.IMAGE_PULL_JOB.path(namespace="ns", subresource="status")


@pytest.mark.parametrize(
    ("parallelism", "nodes", "expected"),
    [(None, 5, 1), (0, 5, 0), (10, 3, 10), ("50%", 4, 2), ("10%", 3, 1), ("0%", 9, 0), ("100%", 7, 7)],
)
def test_resolve_parallelism(parallelism: int | str | None, nodes: int, expected: int) -> None:
    assert api.resolve_parallelism(parallelism, nodes) == expected


@pytest.mark.parametrize("bad", [-1, True, "-5%", "50"])
def test_resolve_parallelism_rejects_what_the_crd_rejects(bad: int | str) -> None:
    with pytest.raises(ValueError, match="parallelism"):
        api.resolve_parallelism(bad, 3)


@given(st.text(min_size=1, max_size=600))
def test_cached_image_name_is_always_a_valid_object_name(image: str) -> None:
    name = api.cached_image_name(image)
    assert len(name) <= 253
    assert DNS_SUBDOMAIN.match(name), name
    assert api.cached_image_name(image) == name


def test_cached_image_name_is_readable_and_distinct() -> None:
    name = api.cached_image_name("docker.io/library/nginx:1.27")
    assert name.startswith("docker.io-library-nginx-1.27-")
    assert api.cached_image_name("a/b:c") != api.cached_image_name("a/b-c")
    with pytest.raises(ValueError):
        api.cached_image_name("")


def test_image_pull_job_builder() -> None:
    owner = api.owner_reference(
        {
            "apiVersion": api.api_version(),
            "kind": "SidecarSet",
            "metadata": {"name": "log-agent", "uid": "u1"},
        }
    )
    job = api.image_pull_job(
        "log-agent-1",
        "registry.example.com/log-agent:2.3",
        namespace="imagewarm",
        template={"parallelism": "10%", "podSelector": {"matchLabels": {"app": "web"}}},
        owner=owner,
    )
    assert job["apiVersion"] == "imagewarm.io/v1alpha1"
    assert job["spec"] == {
        "image": "registry.example.com/log-agent:2.3",
        "parallelism": "10%",
        "podSelector": {"matchLabels": {"app": "web"}},
    }
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "imagewarm.io/v1alpha1",
            "kind": "SidecarSet",
            "name": "log-agent",
            "uid": "u1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert list(undeclared(dict(job["spec"]), at(schema_of(crd_for("ImagePullJob")), ".spec"))) == []
    with pytest.raises(ValueError, match="uid"):
        api.owner_reference({"apiVersion": "v1", "kind": "X", "metadata": {"name": "x"}})
