"""The demo's pure parts: the kubelet's pull times from its events, progress bars, the summary."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest

from localcluster.demo import summary
from localcluster.demosteps import Demo, DemoResult, StartedPod, go_duration, pull_times


def event(container: str, message: str) -> dict[str, object]:
    return {"involvedObject": {"fieldPath": f"spec.containers{{{container}}}"}, "message": message}


def test_pull_times_read_the_kubelets_pulled_events() -> None:
    events = [
        event(
            "app",
            'Successfully pulled image "localhost:7439/r/app:1" in 11.6s (11.6s including waiting). '
            "Image size: 269 bytes.",
        ),
        event(
            "logger",
            'Successfully pulled image "localhost:7439/r/logger:1" in 590ms (590ms including waiting)',
        ),
        event("other", 'Container image "x:1" already present on machine'),
        event("slow", 'Successfully pulled image "y:1" in 2m13.641s (2m13.642s including waiting)'),
        event("broken", "something else"),
    ]
    assert pull_times(events) == {
        "app": "11.60s",
        "logger": "0.59s",
        "other": "already present",
        "slow": "133.64s",
    }


@pytest.mark.parametrize(
    ("text", "seconds"), [("2m13.641s", 133.641), ("590ms", 0.59), ("1h0m2s", 3602.0), ("750µs", 0.00075)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2x", "1.5", "s"])
def test_what_is_not_a_go_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        go_duration(text)


def test_a_bar_without_a_terminal_prints_a_line_at_each_quarter() -> None:
    lines: list[str] = []
    demo = Demo(out=lines.append)
    for done in range(0, 101, 5):
        demo.bar("pull", done, 100)
    assert [line.split("]")[-1].split()[0] for line in lines if "pull" in line] == [
        "0%",
        "25%",
        "50%",
        "75%",
        "100%",
    ]
    demo.say("next")  # a new step starts a new bar
    demo.bar("pull", 0, 100)
    assert lines[-1].rstrip().endswith("0%")


def test_the_summary_has_a_row_per_pod_and_every_claim() -> None:
    now = datetime.datetime.now(datetime.UTC)
    pod = StartedPod(step="cold", name="p", node="n1", created=now, images={"app": "localhost:7439/r/a:1"},
                     original={"app": "r/a:1"}, start_seconds=14.0, pulls={"app": "11.60s"},
                     upstream_blob_gets=2, served_from="upstream")  # fmt: skip
    outcome = DemoResult(pods=[pod], facts=[("hit ratio (bytes)", "75%")], views={"nodeimages": "NAME ..."},
                      checks=[("it worked", True), ("it failed", False)])  # fmt: skip
    text = summary(outcome, Demo(out=lambda line: None))
    assert "cold  n1    upstream" in text and "11.60s" in text and "14s" in text
    assert "kubectl get nodeimages\nNAME ..." in text
    assert "it failed  NO" in text and not outcome.ok


def test_chain_ids_follow_the_oci_image_spec(tmp_path: Path) -> None:
    """The snapshot names containerd gives an image's layers (checked against a real containerd
    when the demo waits for a forgotten image's snapshots to go)."""
    from localcluster.demosteps import chain_ids
    from localcluster.images import ImageBuilder

    image = ImageBuilder(tmp_path).busybox(data_size=1 << 10)
    diff_ids = image.config_json()["rootfs"]["diff_ids"]
    second = "sha256:" + hashlib.sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()).hexdigest()
    assert chain_ids(image) == [diff_ids[0], second]
