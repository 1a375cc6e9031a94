"""`imagewarm status` rendering and `imagewarm warm` cluster mode's pure parts: the job built from
the flags, the per-node rows read from NodeImages, progress bars, the summary and the exit rule."""

from __future__ import annotations

import argparse

import pytest

from imagewarm import api, cli, statuscommand, warmcommand, warmjob
from imagewarm.config import ConfigError, from_arguments
from imagewarm.reference import parse

DIGEST = "sha256:" + "0123456789ab" + "f" * 52


def cached(source: str, **status: object) -> dict[str, object]:
    return {"spec": {"sourceImage": source}, "status": status}


def test_status_renders_every_cached_image_with_short_digest_size_nodes_and_expiry() -> None:
    items = [
        cached("docker.io/library/nginx:1.27", phase="Cached", digest=DIGEST, size=3 * 2**20 + 2**19,
               nodes=["n1", "n2", "n3", "n4"], usedBy={"count": 12, "pods": []}),
        {"spec": {"sourceImage": "registry.corp:5000/app:1", "expiresAt": "2026-12-04T00:00:00Z"},
         "status": {"phase": "Pending", "usedBy": {"count": 0}}},
        {"spec": {"sourceImage": "docker.io/library/redis:7", "retain": True}, "status": {}},
    ]  # fmt: skip
    rows = statuscommand.cached_image_rows(items)
    assert rows == [
        ("nginx:1.27", "Cached", "sha256:0123456789ab", "3.5 MiB", "4: n1,n2,n3,…", "12", "-"),
        ("redis:7", "-", "-", "-", "-", "0", "never (retain)"),
        ("registry.corp:5000/app:1", "Pending", "-", "-", "-", "0", "2026-12-04T00:00:00Z"),
    ]


def test_status_lists_only_jobs_in_progress_and_sums_node_tasks() -> None:
    jobs = [
        {"metadata": {"namespace": "d", "name": "done"}, "spec": {"image": "nginx"},
         "status": {"completionTime": "2026-12-03T00:00:00Z"}},
        {"metadata": {"namespace": "d", "name": "warm-1"}, "spec": {"image": "nginx:1.27"},
         "status": {"desired": 5, "succeeded": 2, "active": 1, "failed": 1}},
    ]  # fmt: skip
    assert statuscommand.job_rows(jobs) == [("d/warm-1", "nginx:1.27", "2/5", "1", "1")]
    nodeimage = {
        "metadata": {"name": "n1"},
        "spec": {"images": {"docker.io/library/nginx": {"tags": [{"tag": "1.27"}, {"tag": "1.28"}]}}},
        "status": {"imageStatuses": {"docker.io/library/nginx": {"tags": [
            {"tag": "1.27", "phase": "Succeeded"}, {"tag": "1.28", "phase": "Pulling"}]}}},
    }  # fmt: skip
    assert statuscommand.node_rows([nodeimage]) == [("n1", "2", "1", "1", "0", "0")]


def test_hit_ratio_from_a_proxys_metrics_and_unreachable_proxies_said_so() -> None:
    text = (
        "# HELP imagewarm_proxy_cache_hit_bytes_total Bytes served from the cache\n"
        "# TYPE imagewarm_proxy_cache_hit_bytes_total counter\n"
        'imagewarm_proxy_cache_hit_bytes_total{kind="blob"} 300.0\n'
        'imagewarm_proxy_cache_hit_bytes_total{kind="manifest"} 100.0\n'
        "# TYPE imagewarm_proxy_cache_miss_bytes_total counter\n"
        'imagewarm_proxy_cache_miss_bytes_total{kind="blob"} 100.0\n'
    )
    reading = statuscommand.read_metrics("http://10.0.0.1:7439", text)
    assert reading.hit_ratio == 0.8
    down = statuscommand.ProxyReading("http://10.0.0.2:7439", error="unreachable (ConnectionError)")
    report = statuscommand.render([], [], [], [reading, down])
    assert "http://10.0.0.1:7439  400 B       100 B          80.0%" in report
    assert "http://10.0.0.2:7439  -           -              unreachable (ConnectionError)" in report
    assert "cached images\n(none" in report and "pull jobs in progress\n(none)" in report


def test_status_says_how_to_install_missing_crds() -> None:
    from imagewarm import kube

    class NoCrds:
        def get(self, path: str) -> dict[str, object]:
            raise kube.NotFound(f"GET {path}: 404 the server could not find the requested resource")

    with pytest.raises(statuscommand.StatusError, match=r"kubectl apply -f charts/imagewarm/crds/"):
        statuscommand._list(NoCrds(), api.CACHED_IMAGE)


# --- warm, cluster mode --------------------------------------------------------------------------


def warm_config(*argv: str) -> warmcommand.WarmConfig:
    parser = cli.build_parser({"warm": warmcommand.command})
    args: argparse.Namespace = parser.parse_args(["warm", *argv])
    return from_arguments(warmcommand.WarmConfig, args, {})


def test_the_mode_follows_kubeconfig_and_proxy() -> None:
    assert warm_config("nginx", "--kubeconfig", "/k").cluster_mode
    assert not warm_config("nginx", "--kubeconfig", "/k", "--proxy", "http://p:7439").cluster_mode
    assert not warm_config("nginx").cluster_mode
    with pytest.raises(ConfigError, match="--nodes or --selector, not both"):
        warm_config("nginx", "--nodes", "a", "--selector", "pool=x")


def test_one_image_makes_an_image_pull_job_with_the_flags_mapped() -> None:
    config = warm_config("nginx:1.27", "--kubeconfig", "/k", "--namespace", "shop", "--nodes", "n1",
                         "--nodes", "n2", "--parallelism", "50%", "--pull-secret", "cred")  # fmt: skip
    job = warmjob.job_object(
        config.images, namespace=config.namespace, parallelism=config.parallelism, selector=config.selector,
        nodes=config.nodes, pull_secrets=[n for _, n in config.pull_secret],
    )  # fmt: skip
    assert job["kind"] == "ImagePullJob" and job["apiVersion"] == "imagewarm.io/v1alpha1"
    assert job["metadata"]["generateName"] == "warm-" and job["metadata"]["namespace"] == "shop"
    assert job["spec"] == {
        "image": "docker.io/library/nginx:1.27",
        "parallelism": "50%",
        "selector": {"names": ["n1", "n2"]},
        "pullSecrets": ["cred"],
        "completionPolicy": {"type": "Always"},
    }


def test_several_images_make_an_image_list_pull_job() -> None:
    images = (parse("nginx:1.27"), parse("redis:7"))
    job = warmjob.job_object(images, namespace="d", parallelism=3, selector={"pool": "gpu"})
    assert job["kind"] == "ImageListPullJob"
    assert job["spec"]["images"] == ["docker.io/library/nginx:1.27", "docker.io/library/redis:7"]
    assert job["spec"]["selector"] == {"matchLabels": {"pool": "gpu"}} and job["spec"]["parallelism"] == 3


@pytest.mark.parametrize("text", ["pool", "=x", "a=b,", "a"])
def test_bad_selectors_say_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="key=value"):
        warmjob.parse_selector(text)


def test_bad_parallelism_is_refused() -> None:
    assert warmjob.parse_parallelism("10%") == "10%" and warmjob.parse_parallelism("4") == 4
    with pytest.raises(ValueError):
        warmjob.parse_parallelism("ten")


def nodeimage(
    node: str, owner_uid: str, status: dict[str, object] | None, version: int = 0
) -> dict[str, object]:
    task = {
        "tag": "1.27",
        "version": version,
        "ownerReferences": [{"kind": "ImagePullJob", "uid": owner_uid}],
    }
    body: dict[str, object] = {
        "metadata": {"name": node},
        "spec": {"images": {"docker.io/library/nginx": {"tags": [task]}}},
    }
    if status is not None:
        body["status"] = {"imageStatuses": {"docker.io/library/nginx": {"tags": [{"tag": "1.27", **status}]}}}
    return body


def test_node_rows_are_the_jobs_tasks_with_their_status() -> None:
    times = {"startTime": "2026-12-03T10:00:00Z", "completionTime": "2026-12-03T10:00:04Z"}
    nodeimages = [
        nodeimage("n2", "job-1", {"phase": "Pulling", "progress": 45, "version": 0}),
        nodeimage("n1", "job-1", {"phase": "Succeeded", "imageID": DIGEST, **times}),
        nodeimage("n3", "other-job", {"phase": "Succeeded"}),
        nodeimage("n4", "job-1", {"phase": "Succeeded", "version": 1}, version=2),  # stale status
    ]  # fmt: skip
    rows = warmjob.node_rows(parse("nginx:1.27"), "job-1", nodeimages)
    assert rows == [
        warmjob.NodeRow("n1", "nginx:1.27", "Succeeded", 100, DIGEST, 4.0),
        warmjob.NodeRow("n2", "nginx:1.27", "Pulling", 45),
        warmjob.NodeRow("n4", "nginx:1.27", "Waiting", 0),
    ]
    assert warmjob.bar(rows[1]) == "n2  nginx:1.27  [#########           ]  45%  Pulling"
    failed = warmjob.NodeRow("n5", "nginx:1.27", "Failed", 10, message="401: give pullSecrets")
    assert warmjob.bar(failed).endswith("Failed  401: give pullSecrets")
    assert warmjob.summary_rows(rows[:1], several_images=False) == [("n1", "Succeeded", DIGEST, "4.0", "-")]


def test_the_exit_rule_is_every_node_of_every_job_succeeded() -> None:
    done = {"status": {"completionTime": "t", "desired": 2, "succeeded": 2}}
    ok = [warmjob.NodeRow("n1", "i", "Succeeded"), warmjob.NodeRow("n2", "i", "Succeeded")]
    assert warmjob.finished([done]) and warmjob.succeeded([done], ok)
    one_failed = {"status": {"completionTime": "t", "desired": 2, "succeeded": 1, "failed": 1}}
    assert not warmjob.succeeded([one_failed], [ok[0], warmjob.NodeRow("n2", "i", "Failed")])
    nothing = {"status": {"completionTime": "t", "desired": 0}}
    assert not warmjob.succeeded([nothing], [])
    assert not warmjob.finished([done, {"status": {"desired": 1}}])


def test_status_without_a_usable_kubeconfig_exits_2_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--kubeconfig", "/nonexistent/kubeconfig"]) == 2
    assert "cannot use kubeconfig /nonexistent/kubeconfig" in capsys.readouterr().err


def test_cluster_mode_refuses_direct_mode_flags(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["warm", "nginx", "--kubeconfig", "/k", "--docker-config", "/d"]
    assert cli.main(argv) == 2
    assert "--docker-config is for direct mode" in capsys.readouterr().err
    argv = ["warm", "nginx", "--kubeconfig", "/k", "--namespace", "a", "--pull-secret", "b/cred"]
    assert cli.main(argv) == 2
    assert "a job's pull secrets are Secrets in its own namespace (a)" in capsys.readouterr().err
    argv = ["warm", "nginx", "--proxy", "http://127.0.0.1:1", "--nodes", "n1"]
    assert cli.main(argv) == 2
    assert "are for cluster mode" in capsys.readouterr().err


def test_the_follower_keeps_each_nodes_last_status_after_the_tasks_are_compacted() -> None:
    lines: list[str] = []
    follower = warmjob.Follower(client=None, images=[parse("nginx:1.27")], report=lines.append)
    follower._on_nodeimage("ADDED", nodeimage("n1", "job-1", None))
    follower._on_nodeimage("MODIFIED", nodeimage("n1", "job-1", {"phase": "Pulling", "progress": 40}))
    follower._on_nodeimage("MODIFIED", nodeimage("n1", "job-1", {"phase": "Pulling", "progress": 40}))
    follower._on_nodeimage("MODIFIED", nodeimage("n1", "job-1", {"phase": "Succeeded", "imageID": DIGEST}))
    follower._on_nodeimage("MODIFIED", {"metadata": {"name": "n1"}, "spec": {"images": {}}})  # compacted
    follower._on_nodeimage("ADDED", nodeimage("n2", "another-job", {"phase": "Failed"}))
    assert [line.split()[-1] for line in lines] == ["Waiting", "Pulling", "Succeeded", "Failed"]
    job = {"metadata": {"uid": "job-1"}}
    assert follower.rows([job]) == [warmjob.NodeRow("n1", "nginx:1.27", "Succeeded", 100, DIGEST)]
