"""SidecarSet injection (OpenKruise semantics), checked on the pods that result from the patch."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from imagewarm.api import SIDECARSET_HASH_ANNOTATION as HASH_ANNOTATION
from imagewarm.selectors import InvalidSelector, LabelSelector
from imagewarm.sidecarset import InvalidSidecarSet, SidecarSet
from webhook.mutation import ORIGINAL_IMAGES, on_create
from webhook.rewrite import Rule
from webhook.sidecarset import INJECTED_LIST_ANNOTATION

RULE = Rule(proxy_prefix="localhost:7439", excluded_registries=frozenset({"localhost"}))


def sidecarset(name: str = "log-agent", **spec: Any) -> SidecarSet:
    body: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}},
        "containers": [{"name": "log-agent", "image": "registry.example.com/log-agent:2.3"}],
    }
    body.update(spec)
    return SidecarSet.from_object({"metadata": {"name": name, "resourceVersion": "1"}, "spec": body})


def web_pod(**extra_spec: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "nginx:1",
                "env": [{"name": "APP_NAME", "value": "shop"}],
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data"},
                    {"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/sa"},
                ],
            },
        ],
        "volumes": [
            {"name": "data", "emptyDir": {}},
            {"name": "kube-api-access-x", "projected": {"sources": []}},
        ],
    }
    spec.update(extra_spec)
    return {"metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}}, "spec": spec}


def create(
    pod: dict[str, Any],
    sets: list[SidecarSet],
    namespace: str = "default",
    ns_labels: dict[str, str] | None = None,
) -> tuple[dict[str, Any], Any]:
    decision = on_create(pod, RULE, sidecarsets=sets, namespace=namespace, namespace_labels=ns_labels)
    return jsonpatch.apply_patch(pod, decision.patch), decision


def names(pod: dict[str, Any], field: str = "containers") -> list[str]:
    return [c["name"] for c in pod["spec"].get(field, [])]


def test_the_documented_example_is_injected_before_the_app_with_shared_volumes_and_env() -> None:
    example = sidecarset(
        namespace="default",
        containers=[
            {
                "name": "log-agent",
                "image": "registry.example.com/log-agent:2.3",
                "podInjectPolicy": "BeforeAppContainer",
                "shareVolumePolicy": {"type": "enabled"},
                "transferEnv": [{"sourceContainerName": "main", "envName": "APP_NAME"}],
                "volumeMounts": [{"name": "logs", "mountPath": "/var/log/app"}],
            }
        ],
        volumes=[{"name": "logs", "emptyDir": {}}],
        imagePullSecrets=[{"name": "registry-cred"}],
    )
    result, decision = create(web_pod(), [example])
    assert names(result) == ["log-agent", "main"]
    sidecar = result["spec"]["containers"][0]
    assert sidecar["image"] == "localhost:7439/registry.example.com/log-agent:2.3"
    assert not {"podInjectPolicy", "shareVolumePolicy", "transferEnv"} & set(sidecar)
    assert [m["name"] for m in sidecar["volumeMounts"]] == ["logs", "data", "kube-api-access-x"]
    assert {"name": "APP_NAME", "value": "shop"} in sidecar["env"]
    assert {"name": "IS_INJECTED", "value": "true"} in sidecar["env"]
    assert [v["name"] for v in result["spec"]["volumes"]] == ["data", "kube-api-access-x", "logs"]
    assert result["spec"]["imagePullSecrets"] == [{"name": "registry-cred"}]
    annotations = result["metadata"]["annotations"]
    assert json.loads(annotations[HASH_ANNOTATION]) == {
        "log-agent": {"hash": example.revision, "sidecarSetName": "log-agent"}
    }
    assert annotations[INJECTED_LIST_ANNOTATION] == "log-agent"
    assert json.loads(annotations[ORIGINAL_IMAGES]) == {
        "log-agent": "registry.example.com/log-agent:2.3",
        "main": "nginx:1",
    }
    assert decision.injected == ("log-agent",)


def test_after_app_container_and_init_containers() -> None:
    sets = [
        sidecarset(
            containers=[
                {"name": "after", "image": "busybox:1", "podInjectPolicy": "AfterAppContainer"},
                {"name": "before", "image": "busybox:1"},
            ],
            initContainers=[{"name": "setup", "image": "busybox:1"}],
        )
    ]
    result, _ = create(web_pod(initContainers=[{"name": "own-init", "image": "alpine:3"}]), sets)
    assert names(result) == ["before", "main", "after"]
    assert names(result, "initContainers") == ["own-init", "setup"]
    assert all(c["image"].startswith("localhost:7439/") for c in result["spec"]["initContainers"])


def test_pod_volumes_and_secrets_are_not_duplicated_and_sidecar_mounts_win_by_name_and_path() -> None:
    sets = [
        sidecarset(
            containers=[
                {
                    "name": "s",
                    "image": "busybox:1",
                    "shareVolumePolicy": {"type": "Enabled"},
                    "volumeMounts": [{"name": "other", "mountPath": "/data"}],
                }
            ],
            volumes=[{"name": "data", "hostPath": {"path": "/x"}}, {"name": "other", "emptyDir": {}}],
            imagePullSecrets=[{"name": "a"}],
        )
    ]
    result, _ = create(web_pod(imagePullSecrets=[{"name": "a"}]), sets)
    assert result["spec"]["volumes"][0] == {"name": "data", "emptyDir": {}}
    assert [v["name"] for v in result["spec"]["volumes"]] == ["data", "kube-api-access-x", "other"]
    assert result["spec"]["imagePullSecrets"] == [{"name": "a"}]
    mounts = result["spec"]["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts] == ["/data", "/var/run/secrets/kubernetes.io/sa"]


@pytest.mark.parametrize(
    ("spec", "labels", "namespace", "ns_labels", "injected"),
    [
        ({}, {"app": "web"}, "default", None, True),
        ({}, {"app": "db"}, "default", None, False),
        ({"selector": {}}, {"app": "web"}, "default", None, False),  # empty selector: no pod (kruise)
        ({"namespace": "other"}, {"app": "web"}, "default", None, False),
        (
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
            {"app": "web"},
            "default",
            {"team": "a"},
            True,
        ),
        (
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
            {"app": "web"},
            "default",
            {"team": "b"},
            False,
        ),
        ({"namespaceSelector": {"matchLabels": {"team": "a"}}}, {"app": "web"}, "default", None, False),
        ({"injectionStrategy": {"paused": True}}, {"app": "web"}, "default", None, False),
        ({}, {"app": "web"}, "kube-system", None, False),
        (
            {"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}},
            {"app": "web"},
            "default",
            None,
            True,
        ),
        (
            {"selector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}},
            {"app": "web"},
            "default",
            None,
            True,
        ),
    ],
)
def test_matching(
    spec: dict[str, Any],
    labels: dict[str, str],
    namespace: str,
    ns_labels: dict[str, str] | None,
    injected: bool,
) -> None:
    pod = web_pod()
    pod["metadata"]["labels"] = labels
    result, _ = create(pod, [sidecarset(**spec)], namespace=namespace, ns_labels=ns_labels)
    assert ("log-agent" in names(result)) is injected


def test_unknown_namespace_labels_warn() -> None:
    _, decision = create(web_pod(), [sidecarset(namespaceSelector={"matchLabels": {"t": "a"}})])
    assert decision.injected == () and any("not known" in w for w in decision.warnings)


def test_reinvocation_injects_nothing_twice_and_gives_no_patch() -> None:
    sets = [sidecarset(initContainers=[{"name": "setup", "image": "busybox:1"}], volumes=[{"name": "v"}])]
    once, _ = create(web_pod(), sets)
    again = on_create(once, RULE, sidecarsets=sets, namespace="default", namespace_labels=None)
    assert again.patch == []


def test_two_sidecarsets_in_name_order_and_a_container_name_conflict_keeps_the_first() -> None:
    first = sidecarset("a-set", containers=[{"name": "shared", "image": "one:1"}])
    second = sidecarset(
        "b-set", containers=[{"name": "shared", "image": "two:1"}, {"name": "b", "image": "b:1"}]
    )
    result, decision = create(web_pod(), [second, first])
    assert names(result) == ["shared", "b", "main"]
    assert result["spec"]["containers"][0]["image"] == "localhost:7439/docker.io/library/one:1"
    assert decision.injected == ("a-set", "b-set")
    assert result["metadata"]["annotations"][INJECTED_LIST_ANNOTATION] == "a-set,b-set"


def test_missing_transfer_env_warns() -> None:
    sets = [
        sidecarset(
            containers=[
                {
                    "name": "s",
                    "image": "x:1",
                    "transferEnv": [{"sourceContainerName": "main", "envName": "NOPE"}],
                }
            ]
        )
    ]
    _, decision = create(web_pod(), sets)
    assert any("NOPE" in w for w in decision.warnings)


def test_revision_follows_the_containers_unless_annotated() -> None:
    a, b = sidecarset(), sidecarset(containers=[{"name": "log-agent", "image": "x:2"}])
    assert a.revision != b.revision and a.revision == sidecarset().revision
    annotated = SidecarSet.from_object(
        {
            "metadata": {"name": "n", "annotations": {HASH_ANNOTATION: "abc"}},
            "spec": {"selector": {"matchLabels": {"a": "b"}}},
        }
    )
    assert annotated.revision == "abc"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {},
        {"metadata": {"name": "x"}, "spec": {"containers": "no"}},
        {"metadata": {"name": "x"}, "spec": {"containers": [{"image": "no-name"}]}},
        {
            "metadata": {"name": "x"},
            "spec": {"selector": {"matchExpressions": [{"key": "a", "operator": "Bad"}]}},
        },
    ],
)
def test_invalid_sidecarsets_raise(bad: Any) -> None:
    with pytest.raises(InvalidSidecarSet):
        SidecarSet.from_object(bad)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert LabelSelector.parse(selector).matches(labels) is expected


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        {"matchLabels": []},
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["1"]}]},
    ],
)
def test_label_selector_rejects(bad: Any) -> None:
    with pytest.raises(InvalidSelector):
        LabelSelector.parse(bad)


def test_the_request_pod_is_never_modified() -> None:
    sets = [
        sidecarset(
            containers=[
                {
                    "name": "s",
                    "image": "x:1",
                    "shareVolumePolicy": {"type": "enabled"},
                    "transferEnv": [{"sourceContainerName": "main", "envName": "APP_NAME"}],
                }
            ],
            initContainers=[{"name": "setup", "image": "busybox:1"}],
            volumes=[{"name": "v"}],
            imagePullSecrets=[{"name": "s"}],
        )
    ]
    original = web_pod(initContainers=[{"name": "own", "image": "alpine:3"}])
    original["metadata"]["annotations"] = {"a": "b"}
    before = copy.deepcopy(original)
    decision = on_create(original, RULE, sidecarsets=sets, namespace="default", namespace_labels=None)
    assert decision.patch and original == before
