"""The webhook's pure decision: pods in, patches applied with `jsonpatch`, resulting pods checked."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from webhook.admission import check_pod
from webhook.mutation import ORIGINAL_IMAGES, Decision, on_create, on_ephemeral_update
from webhook.patch import pointer
from webhook.rewrite import Rule

RULE = Rule(
    proxy_prefix="localhost:7439",
    excluded_registries=frozenset({"localhost", "quay.io"}),
    excluded_images=("docker.io/library/pause*", "*/internal/*"),
)
DIGEST = "sha256:" + "ab" * 32


def pod(
    *images: str, init: tuple[str, ...] = (), annotations: dict[str, str] | None = None, metadata: bool = True
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "spec": {"containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]},
    }
    if init:
        result["spec"]["initContainers"] = [{"name": f"i{i}", "image": img} for i, img in enumerate(init)]
    if metadata:
        result["metadata"] = {"name": "p", "namespace": "default"}
        if annotations is not None:
            result["metadata"]["annotations"] = annotations
    return result


def apply(original: dict[str, Any], decision: Decision) -> dict[str, Any]:
    return jsonpatch.apply_patch(original, decision.patch)


def images(result: dict[str, Any], field: str = "containers") -> list[str]:
    return [c["image"] for c in result["spec"].get(field, [])]


def originals(result: dict[str, Any]) -> dict[str, str]:
    return json.loads(result["metadata"]["annotations"][ORIGINAL_IMAGES])


REWRITES = [
    ("nginx", "localhost:7439/docker.io/library/nginx"),
    ("nginx:1.27", "localhost:7439/docker.io/library/nginx:1.27"),
    (f"nginx:1.27@{DIGEST}", f"localhost:7439/docker.io/library/nginx:1.27@{DIGEST}"),
    (f"ghcr.io/org/app@{DIGEST}", f"localhost:7439/ghcr.io/org/app@{DIGEST}"),
    ("registry.corp:5000/team/app:1", "localhost:7439/registry.corp_5000/team/app:1"),
    ("Registry.Corp/app:1", "localhost:7439/registry.corp/app:1"),
    ("docker.io/bitnami/redis:7", "localhost:7439/docker.io/bitnami/redis:7"),
]


@pytest.mark.parametrize(("image", "expected"), REWRITES)
def test_rewrites_keep_tag_and_digest_and_record_the_original(image: str, expected: str) -> None:
    original = pod(image)
    decision = on_create(original, RULE)
    result = apply(original, decision)
    assert images(result) == [expected]
    assert originals(result) == {"c0": image}
    assert decision.rewrites == 1 and decision.reason == "patched"


UNCHANGED = [
    "localhost:7439/docker.io/library/nginx:1",  # already proxied
    "localhost:5000/app:1",  # localhost registry
    "localhost/app:1",
    "quay.io/prometheus/node-exporter:v1",  # excluded registry
    "pause:3.10",  # excluded pattern against the canonical form docker.io/library/pause:3.10
    "ghcr.io/org/internal/tool:1",  # excluded pattern
]


@pytest.mark.parametrize("image", UNCHANGED)
def test_images_left_alone_give_no_patch_and_no_warning(image: str) -> None:
    decision = on_create(pod(image), RULE)
    assert decision.patch == [] and decision.warnings == [] and decision.reason == "unchanged"


@pytest.mark.parametrize("image", ["UPPER/case:1", "[::1]:5000/app:1", "nginx:bad tag", "", "a" * 300])
def test_invalid_or_unproxiable_reference_is_unchanged_with_a_warning(image: str) -> None:
    original = pod(image, "busybox:1")
    decision = on_create(original, RULE)
    result = apply(original, decision)
    assert result["spec"]["containers"][0]["image"] == image
    assert result["spec"]["containers"][1]["image"] == "localhost:7439/docker.io/library/busybox:1"
    assert len(decision.warnings) == 1 and "'c0'" in decision.warnings[0]


def test_init_and_app_containers_rewritten_patch_applies_without_annotations() -> None:
    original = pod("nginx:1", "redis:7", init=("busybox:1",), annotations=None)
    assert "annotations" not in original["metadata"]
    result = apply(original, on_create(original, RULE))
    assert images(result) == [
        "localhost:7439/docker.io/library/nginx:1",
        "localhost:7439/docker.io/library/redis:7",
    ]
    assert images(result, "initContainers") == ["localhost:7439/docker.io/library/busybox:1"]
    assert originals(result) == {"c0": "nginx:1", "c1": "redis:7", "i0": "busybox:1"}


def test_patch_applies_when_metadata_is_absent() -> None:
    original = pod("nginx:1", metadata=False)
    result = apply(original, on_create(original, RULE))
    assert originals(result) == {"c0": "nginx:1"}


def test_existing_annotations_are_kept_and_slash_keys_escaped() -> None:
    original = pod("nginx:1", annotations={"a/b": "1", "x~y": "2"})
    decision = on_create(original, RULE)
    assert {
        "op": "add",
        "path": pointer("metadata", "annotations", ORIGINAL_IMAGES),
        "value": json.dumps({"c0": "nginx:1"}, separators=(",", ":")),
    } in decision.patch
    assert (
        pointer("metadata", "annotations", ORIGINAL_IMAGES)
        == "/metadata/annotations/imagewarm.io~1original-images"
    )
    result = apply(original, decision)
    assert result["metadata"]["annotations"]["a/b"] == "1" and result["metadata"]["annotations"]["x~y"] == "2"


def test_idempotent_reinvocation_gives_no_patch() -> None:
    original = pod("nginx:1", "registry.corp:5000/app:1", init=("busybox",))
    once = apply(original, on_create(original, RULE))
    again = on_create(once, RULE)
    assert again.patch == [] and again.warnings == []


def test_reinvocation_after_another_webhook_added_a_container_merges_the_annotation() -> None:
    original = pod("nginx:1")
    once = apply(original, on_create(original, RULE))
    once["spec"]["containers"].append({"name": "added", "image": "envoy:1"})
    twice = apply(once, on_create(once, RULE))
    assert originals(twice) == {"c0": "nginx:1", "added": "envoy:1"}
    assert images(twice)[1] == "localhost:7439/docker.io/library/envoy:1"


def test_skip_annotation_means_no_patch() -> None:
    decision = on_create(pod("nginx:1", annotations={"imagewarm.io/skip": "true"}), RULE)
    assert decision == Decision(reason="skipped")


def test_skip_annotation_other_values_do_not_skip() -> None:
    assert on_create(pod("nginx:1", annotations={"imagewarm.io/skip": "false"}), RULE).rewrites == 1


def test_a_corrupt_original_images_annotation_is_replaced_with_a_warning() -> None:
    original = pod("nginx:1", annotations={ORIGINAL_IMAGES: "not json"})
    decision = on_create(original, RULE)
    assert originals(apply(original, decision)) == {"c0": "nginx:1"}
    assert any(ORIGINAL_IMAGES in w for w in decision.warnings)


def test_ephemeral_update_rewrites_only_new_ephemeral_containers() -> None:
    old = apply(pod("nginx:1"), on_create(pod("nginx:1"), RULE))
    old["spec"]["ephemeralContainers"] = [
        {"name": "debug-old", "image": "busybox:1"}
    ]  # added with webhook down
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"].append({"name": "debug", "image": f"busybox@{DIGEST}"})
    decision = on_ephemeral_update(new, old, RULE)
    result = apply(new, decision)
    assert images(result, "ephemeralContainers") == [
        "busybox:1",
        f"localhost:7439/docker.io/library/busybox@{DIGEST}",
    ]
    assert originals(result) == {"c0": "nginx:1", "debug": f"busybox@{DIGEST}"}
    assert all(op["path"].startswith(("/spec/ephemeralContainers/1", "/metadata")) for op in decision.patch)
    assert on_ephemeral_update(result, old, RULE).patch == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "the object must be an object, not null"),
        ([], "the object must be an object, not a list"),
        ("pod", "the object must be an object, not a string"),
        ({"spec": []}, "spec must be an object, not a list"),
        ({"spec": {"containers": "x"}}, "spec.containers must be a list, not a string"),
        ({"spec": {"containers": ["x"]}}, "spec.containers[0] must be an object, not a string"),
        ({"metadata": {"annotations": []}}, "metadata.annotations must be an object, not a list"),
        ({"metadata": {"annotations": {"a": 1}}}, "metadata.annotations['a'] must be a string, not a number"),
        ({"metadata": {"labels": {"app": None}}}, "metadata.labels['app'] must be a string, not null"),
        ({"metadata": {"namespace": ["x"]}}, "metadata.namespace must be a string, not a list"),
        (
            {"spec": {"containers": [{"name": {"a": 1}}]}},
            "spec.containers[0].name must be a string, not an object",
        ),
        (
            {"spec": {"initContainers": [{"name": ["a"]}]}},
            "spec.initContainers[0].name must be a string, not a list",
        ),
        (
            {"spec": {"containers": [{"name": "a", "env": 5}]}},
            "spec.containers[0].env must be a list, not a number",
        ),
        (
            {"spec": {"containers": [{"name": "a", "volumeMounts": [{"name": "v", "mountPath": []}]}]}},
            "spec.containers[0].volumeMounts[0].mountPath must be a string, not a list",
        ),
        ({"spec": {"volumes": [{"name": 1}]}}, "spec.volumes[0].name must be a string, not a number"),
        (
            {"spec": {"imagePullSecrets": {"name": "s"}}},
            "spec.imagePullSecrets must be a list, not an object",
        ),
    ],
)
def test_objects_not_shaped_like_pods_are_named_by_the_check(bad: Any, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        check_pod(bad)
    assert str(raised.value) == message


def test_nulls_count_as_absent_as_in_kubernetes() -> None:
    pod = {"metadata": None, "spec": {"containers": [{"name": None, "image": "nginx:1", "env": None}]}}
    decision = on_create(check_pod(pod), RULE)
    result = apply(pod, decision)
    assert result["spec"]["containers"][0]["image"] == "localhost:7439/docker.io/library/nginx:1"
    assert json.loads(result["metadata"]["annotations"][ORIGINAL_IMAGES]) == {"None": "nginx:1"}


def test_non_string_image_is_left_with_a_warning() -> None:
    original = {"spec": {"containers": [{"name": "a", "image": 5}, {"name": "b"}]}}
    decision = on_create(original, RULE)
    assert decision.patch == [] and len(decision.warnings) == 2


def test_list_insertions_are_add_operations_after_the_edits() -> None:
    from webhook.patch import diff_pod

    old = {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}
    new = {
        "spec": {
            "containers": [
                {"name": "s", "image": "s"},
                {"name": "a", "image": "X"},
                {"name": "b", "image": "y"},
                {"name": "t", "image": "t"},
            ]
        }
    }
    ops = diff_pod(old, new)
    assert ops == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": "X"},
        {"op": "add", "path": "/spec/containers/0", "value": {"name": "s", "image": "s"}},
        {"op": "add", "path": "/spec/containers/-", "value": {"name": "t", "image": "t"}},
    ]
    assert jsonpatch.apply_patch(old, ops) == new
    reordered = {"spec": {"containers": [{"name": "b", "image": "y"}, {"name": "a", "image": "x"}]}}
    assert diff_pod(old, reordered) == [
        {"op": "replace", "path": "/spec/containers", "value": reordered["spec"]["containers"]}
    ]


def test_an_image_already_on_the_proxy_in_another_spelling_is_not_prefixed_again() -> None:
    from webhook.rewrite import Rule, decide

    rule = Rule(proxy_prefix="proxy.internal:7439", excluded_registries=frozenset())
    for spelling in ("PROXY.INTERNAL:7439/docker.io/library/nginx:1.27", "proxy.internal:7439/nginx"):
        outcome = decide(spelling, rule)
        assert (outcome.image, outcome.warning) == (None, None), spelling
    assert decide("nginx:1.27", rule).image == "proxy.internal:7439/docker.io/library/nginx:1.27"


def test_warnings_quote_at_most_the_start_of_a_long_image_and_long_images_are_not_remembered() -> None:
    from webhook import rewrite

    rewrite._decide.cache_clear()
    image = "Bad/" + "x" * 1_000_000
    [warning] = on_create(pod(image), RULE).warnings
    assert len(warning) < 400, warning[:400]
    assert f"{image[:100]!r}...(1000004 characters)" in warning
    assert rewrite._decide.cache_info().currsize == 0
    short = "Bad/app:1"
    assert repr(short) in on_create(pod(short), RULE).warnings[0]
    assert rewrite._decide.cache_info().currsize == 1


def test_with_only_registries_the_others_stay_as_written() -> None:
    # The proxy refuses a registry it was not given: rewriting its images would fail their pulls.
    rule = Rule(proxy_prefix="localhost:7439", excluded_registries=frozenset(),
                only_registries=frozenset({"docker.io", "registry.corp:5000"}))  # fmt: skip
    decision = on_create(pod("nginx:1.27", "registry.corp:5000/app:1", "ghcr.io/org/tool:2"), rule)
    patched = jsonpatch.apply_patch(pod("nginx:1.27", "registry.corp:5000/app:1", "ghcr.io/org/tool:2"),
                                    decision.patch)  # fmt: skip
    assert [c["image"] for c in patched["spec"]["containers"]] == [
        "localhost:7439/docker.io/library/nginx:1.27",
        "localhost:7439/registry.corp_5000/app:1",
        "ghcr.io/org/tool:2",
    ]
