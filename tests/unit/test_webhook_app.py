"""The /mutate view through Flask's test client: answers, bad input, dry run, and a fuzz (never 5xx)."""

from __future__ import annotations

import base64
import json
import os
import threading
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from webhook.app import create_app
from webhook.config import WebhookConfig

CONFIG = WebhookConfig(max_body_bytes=64 * 1024, sync_wait=0.05)


class FakeStore:
    """The `Store` shape of an informer, for unit tests of the view."""

    def __init__(self, objects: list[dict[str, Any]], synced: bool = True) -> None:
        self.objects = objects
        self._synced = synced
        self.waits = 0

    @property
    def synced(self) -> bool:
        return self._synced

    def items(self) -> list[dict[str, Any]]:
        return list(self.objects)

    def get(self, key: str) -> dict[str, Any] | None:
        return next((o for o in self.objects if o["metadata"]["name"] == key), None)

    def wait_synced(self, timeout: float) -> bool:
        self.waits += 1
        threading.Event().wait(timeout)
        return self._synced

    def state(self) -> dict[str, Any]:
        return {"synced": self._synced, "objects": len(self.objects)}


SIDECARSET = {
    "metadata": {"name": "agent", "resourceVersion": "7"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "containers": [{"name": "agent", "image": "agent:1"}],
    },
}


def review(
    pod: Any,
    *,
    operation: str = "CREATE",
    kind: str = "Pod",
    sub: str | None = None,
    old: Any = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "uid": "0d6e6d0a-1",
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {
            "group": "",
            "version": "v1",
            "resource": "pods" if kind == "Pod" else kind.lower() + "s",
        },
        "operation": operation,
        "namespace": "default",
        "name": "p",
        "object": pod,
        "dryRun": dry_run,
    }
    if sub:
        request["subResource"] = sub
    if old is not None:
        request["oldObject"] = old
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def web_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "main", "image": "nginx:1"}]},
    }


@pytest.fixture
def client() -> Any:
    return create_app(CONFIG, sidecarsets=FakeStore([SIDECARSET]), namespaces=FakeStore([])).test_client()


def patched(answer: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    assert answer["response"]["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(answer["response"]["patch"])))


def test_create_is_answered_with_a_patch_that_injects_and_rewrites(client: Any) -> None:
    reply = client.post("/mutate", json=review(web_pod()))
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    assert body["response"]["uid"] == "0d6e6d0a-1" and body["response"]["allowed"] is True
    result = patched(body, web_pod())
    assert [c["image"] for c in result["spec"]["containers"]] == [
        "localhost:7439/docker.io/library/agent:1",
        "localhost:7439/docker.io/library/nginx:1",
    ]


def test_dry_run_gets_the_same_answer(client: Any) -> None:
    wet = client.post("/mutate", json=review(web_pod())).get_json()
    dry = client.post("/mutate", json=review(web_pod(), dry_run=True)).get_json()
    assert wet == dry


@pytest.mark.parametrize(
    ("operation", "kind", "sub"),
    [
        ("DELETE", "Pod", None),
        ("CONNECT", "Pod", "exec"),
        ("CREATE", "Deployment", None),
        ("UPDATE", "Pod", None),
        ("CREATE", "Pod", "binding"),
    ],
)
def test_other_kinds_and_operations_are_allowed_without_patch(
    client: Any, operation: str, kind: str, sub: str | None
) -> None:
    body = client.post("/mutate", json=review(web_pod(), operation=operation, kind=kind, sub=sub)).get_json()
    assert body["response"] == {"uid": "0d6e6d0a-1", "allowed": True}


def test_ephemeral_container_update(client: Any) -> None:
    old = web_pod()
    new = web_pod()
    new["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox:1"}]
    body = client.post(
        "/mutate", json=review(new, operation="UPDATE", sub="ephemeralcontainers", old=old)
    ).get_json()
    assert (
        patched(body, new)["spec"]["ephemeralContainers"][0]["image"]
        == "localhost:7439/docker.io/library/busybox:1"
    )


def test_cache_not_synced_rewrites_without_injection_and_warns_waiting_only_once() -> None:
    store = FakeStore([], synced=False)
    client = create_app(CONFIG, sidecarsets=store).test_client()
    for _ in range(2):
        body = client.post("/mutate", json=review(web_pod())).get_json()
        result = patched(body, web_pod())
        assert [c["name"] for c in result["spec"]["containers"]] == ["main"]
        assert any("not synced" in w for w in body["response"]["warnings"])
    assert store.waits == 1
    store.objects, store._synced = [SIDECARSET], True
    body = client.post("/mutate", json=review(web_pod())).get_json()
    assert "warnings" not in body["response"] and len(patched(body, web_pod())["spec"]["containers"]) == 2


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[]", 400, "JSON object"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
            400,
            "v1",
        ),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            400,
            "no request",
        ),
        (json.dumps(review(web_pod()) | {"kind": "Pod"}).encode(), 400, "AdmissionReview"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "not JSON"),
        (b"x" * (64 * 1024 + 1), 413, "Too Large"),
    ],
)
def test_bad_bodies_get_a_4xx_with_a_message(client: Any, body: bytes, status: int, words: str) -> None:
    reply = client.post("/mutate", data=body, content_type="application/json")
    assert reply.status_code == status and words in reply.get_json()["error"]


def test_missing_uid_is_a_400(client: Any) -> None:
    bad = review(web_pod())
    del bad["request"]["uid"]
    reply = client.post("/mutate", json=bad)
    assert reply.status_code == 400 and "uid" in reply.get_json()["error"]


@pytest.mark.parametrize(
    "pod",
    [
        {"spec": {"containers": []}},
        {"spec": {}},
        "pod",
        None,
        {"spec": {"containers": [{"name": "a", "image": "x"}], "initContainers": 5}},
    ],
)
def test_pods_without_containers_or_with_wrong_types_are_allowed_unchanged(client: Any, pod: Any) -> None:
    body = client.post("/mutate", json=review(pod)).get_json()
    assert body["response"]["allowed"] is True and "patch" not in body["response"]
    assert "left unchanged" in body["response"]["warnings"][0]


def test_healthz_and_metrics(client: Any) -> None:
    client.post("/mutate", json=review(web_pod()))
    assert client.get("/healthz").get_json() == {
        "ok": True,
        "sidecarsetsSynced": True,
        "worker": os.getpid(),
        "sidecarsetCache": {"synced": True, "objects": 1},
    }
    text = client.get("/metrics").get_data(as_text=True)
    for name in (
        "imagewarm_webhook_requests_total",
        "imagewarm_webhook_decisions_total",
        "imagewarm_webhook_rewrites_total",
        "imagewarm_webhook_request_duration_seconds_bucket",
    ):
        assert name in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def mutated_review(draw: Any) -> dict[str, Any]:
    base = review(web_pod())
    path = draw(
        st.sampled_from(
            [
                (),
                ("request",),
                ("request", "object"),
                ("request", "object", "spec"),
                ("request", "object", "spec", "containers"),
                ("request", "object", "metadata"),
                ("request", "kind"),
                ("request", "uid"),
                ("request", "dryRun"),
            ]
        )
    )
    target: Any = base
    for key in path[:-1]:
        target = target[key]
    if path:
        target[path[-1]] = draw(json_values)
    else:
        base["request"] = draw(json_values)
    return base


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_never_5xx(client: Any, data: Any) -> None:
    kind = data.draw(st.sampled_from(["bytes", "json", "review"]))
    if kind == "bytes":
        body = data.draw(st.binary(max_size=200))
    elif kind == "json":
        body = json.dumps(data.draw(json_values)).encode()
    else:
        body = json.dumps(mutated_review(data.draw)).encode()
    reply = client.post("/mutate", data=body, content_type="application/json")
    assert reply.status_code in (200, 400, 413), reply.get_data()
    answer = reply.get_json()
    if reply.status_code == 200:
        assert answer["response"]["allowed"] is True
    else:
        assert answer["error"]


# --- junk pods are "invalid" (or decided), never an internal "error" -----------------------------

NAMES = st.sampled_from(["main", "agent", "side", ""]) | json_values
MOUNTS = st.lists(
    st.fixed_dictionaries({}, optional={"name": NAMES, "mountPath": json_values, "subPathExpr": json_values})
    | json_values,
    max_size=3,
)
ENV = st.lists(
    st.fixed_dictionaries({}, optional={"name": NAMES, "value": json_values}) | json_values, max_size=3
)
CONTAINER = st.fixed_dictionaries(
    {},
    optional={
        "name": NAMES,
        "image": st.sampled_from(["nginx:1", "localhost:7439/docker.io/library/x:1", "Bad Image"])
        | json_values,
        "env": ENV | json_values,
        "volumeMounts": MOUNTS | json_values,
    },
)
CONTAINERS = st.lists(CONTAINER | json_values, min_size=1, max_size=3) | json_values
ANNOTATIONS = st.dictionaries(
    st.sampled_from(
        [
            "imagewarm.io/skip",
            "imagewarm.io/original-images",
            "imagewarm.io/sidecarset-hash",
            "imagewarm.io/sidecarset-injected-list",
            "other",
        ]
    ),
    st.sampled_from(["true", "{}", '{"main":"nginx:1"}', "[1]", "agent"]) | json_values,
    max_size=4,
)
METADATA = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "namespace": json_values,
        "labels": st.just({"app": "web"}) | st.dictionaries(st.text(max_size=5), json_values) | json_values,
        "annotations": ANNOTATIONS | json_values,
    },
)
SPEC = st.fixed_dictionaries(
    {"containers": CONTAINERS},
    optional={
        "initContainers": CONTAINERS,
        "ephemeralContainers": CONTAINERS,
        "volumes": st.lists(st.fixed_dictionaries({}, optional={"name": NAMES}) | json_values, max_size=2)
        | json_values,
        "imagePullSecrets": st.lists(json_values, max_size=2) | json_values,
    },
)
FUZZED_POD = st.fixed_dictionaries(
    {}, optional={"metadata": METADATA | json_values, "spec": SPEC | json_values}
)
# Injection reads more of the SidecarSet's templates: give it one that uses everything.
RICH_SIDECARSET = {
    "metadata": {"name": "agent", "resourceVersion": "7"},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "containers": [
            {
                "name": "agent",
                "image": "agent:1",
                "shareVolumePolicy": {"type": "enabled"},
                "transferEnv": [{"sourceContainerName": "main", "envNames": ["A", "B"]}],
            }
        ],
        "initContainers": [{"name": "init-agent", "image": "agent:1"}],
        "volumes": [{"name": "v", "emptyDir": {}}],
        "imagePullSecrets": [{"name": "s"}],
    },
}


def decisions(reason: str) -> float:
    return REGISTRY.get_sample_value("imagewarm_webhook_decisions_total", {"decision": reason}) or 0.0


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pod=FUZZED_POD, old=FUZZED_POD, ephemeral=st.booleans())
def test_fuzzed_pods_are_never_an_internal_error(pod: Any, old: Any, ephemeral: bool) -> None:
    """Any JSON shapes in a pod's containers, annotations or metadata: allowed, unchanged or patched,
    counted as a decision or as "invalid", never as "error" (that alert is for bugs)."""
    client = create_app(
        CONFIG, sidecarsets=FakeStore([RICH_SIDECARSET]), namespaces=FakeStore([])
    ).test_client()
    errors = decisions("error")
    body = review(pod, operation="UPDATE", sub="ephemeralcontainers", old=old) if ephemeral else review(pod)
    reply = client.post("/mutate", json=body)
    assert reply.status_code == 200
    assert reply.get_json()["response"]["allowed"] is True
    assert decisions("error") == errors, "a junk pod was counted as an internal error"


def test_a_junk_pod_is_counted_invalid_and_told_what_is_wrong(client: Any) -> None:
    pod = web_pod()
    pod["spec"]["containers"][0]["name"] = ["main"]
    invalid, errors = decisions("invalid"), decisions("error")
    body = client.post("/mutate", json=review(pod)).get_json()
    assert body["response"]["allowed"] is True and "patch" not in body["response"]
    assert body["response"]["warnings"] == [
        "imagewarm: pod left unchanged: spec.containers[0].name must be a string, not a list"
    ]
    assert (decisions("invalid"), decisions("error")) == (invalid + 1, errors)


def test_cache_progress_is_exported_by_cache(client: Any) -> None:
    from webhook import metrics

    state = {"lists": 2, "objects": 3, "resourceVersion": "4711", "watches": 5}
    metrics.cache_progressed("sidecarsets", state, 1700000000.0)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'imagewarm_webhook_cache_lists{cache="sidecarsets"} 2.0' in text
    assert 'imagewarm_webhook_cache_objects{cache="sidecarsets"} 3.0' in text
    assert 'imagewarm_webhook_cache_resource_version{cache="sidecarsets"} 4711.0' in text
    assert 'imagewarm_webhook_cache_progress_timestamp_seconds{cache="sidecarsets"} 1.7e+09' in text
