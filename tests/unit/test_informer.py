"""The informer's list/watch logic against a scripted source (the real API server: tests/e2e)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from imagewarm.informer import Informer
from imagewarm.kube import Gone, Unavailable


def obj(name: str, version: str, namespace: str | None = None, **data: Any) -> dict[str, Any]:
    metadata = {"name": name, "resourceVersion": version} | ({"namespace": namespace} if namespace else {})
    return {"metadata": metadata, **data}


class ScriptedSource:
    """Answers lists from `lists` in turn and watches from `watches` in turn (each a list of events or
    an exception to raise); records every watch's resourceVersion. Blocks when the script is done."""

    def __init__(self, lists: list[dict[str, Any]], watches: list[Any]) -> None:
        self.lists = lists
        self.watches = watches
        self.watched_from: list[str] = []
        self.done = threading.Event()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.lists.pop(0)

    def watch(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_seconds: int = 300,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.watched_from.append(resource_version)
        if not self.watches:
            self.done.set()
            threading.Event().wait(0.05)
            return
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step


def run(source: ScriptedSource, **kwargs: Any) -> tuple[Informer, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    informer = Informer(
        source,
        "/x",
        max_backoff=0.01,
        handlers=(lambda kind, o: seen.append((kind, o["metadata"]["name"])),),
        **kwargs,
    )
    informer.start()
    assert source.done.wait(5)
    informer.stop()
    return informer, seen


def test_list_then_watch_resumes_from_the_last_version_after_a_drop() -> None:
    source = ScriptedSource(
        lists=[{"metadata": {"resourceVersion": "10"}, "items": [obj("a", "5"), obj("b", "6", "ns")]}],
        watches=[
            [
                {"type": "ADDED", "object": obj("c", "11")},
                {"type": "MODIFIED", "object": obj("a", "12", x=1)},
            ],
            Unavailable("connection dropped"),
            [
                {"type": "DELETED", "object": obj("b", "13", "ns")},
                {"type": "BOOKMARK", "object": obj("", "20")},
            ],
        ],
    )
    informer, seen = run(source)
    assert informer.synced and informer.lists == 1
    assert source.watched_from[:4] == ["10", "12", "12", "20"]
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "c"]
    assert informer.get("a")["x"] == 1 and informer.get("ns/b") is None
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b")]


def test_gone_relists_and_reports_what_changed_meanwhile() -> None:
    source = ScriptedSource(
        lists=[
            {"metadata": {"resourceVersion": "10"}, "items": [obj("a", "5"), obj("b", "6")]},
            {"metadata": {"resourceVersion": "90"}, "items": [obj("a", "80"), obj("n", "85")]},
        ],
        watches=[Gone("too old", status=410)],
    )
    informer, seen = run(source)
    assert informer.lists == 2 and source.watched_from[:2] == ["10", "90"]
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "n"]
    assert seen[2:] == [("MODIFIED", "a"), ("ADDED", "n"), ("DELETED", "b")]


def test_not_synced_until_the_first_list_succeeds() -> None:
    gate = threading.Event()

    class Slow(ScriptedSource):
        def get(self, path: str, **params: Any) -> dict[str, Any]:
            gate.wait(5)
            return super().get(path, **params)

    source = Slow(lists=[{"metadata": {"resourceVersion": "1"}, "items": []}], watches=[])
    informer = Informer(source, "/x").start()
    assert not informer.synced and not informer.wait_synced(0.05)
    gate.set()
    assert informer.wait_synced(5)
    informer.stop()


def test_synced_only_once_every_handler_saw_the_first_list() -> None:
    """What a handler derives from the cache (the controller's pod index) is complete once
    `synced` is: a reconcile never counts from an index still filling."""
    source = ScriptedSource(
        lists=[{"metadata": {"resourceVersion": "1"}, "items": [obj(f"p{i}", "1") for i in range(200)]}],
        watches=[],
    )
    derived: set[str] = set()
    synced_while_handling: list[bool] = []
    informer = Informer(source, "/x")

    def handler(kind: str, o: dict[str, Any]) -> None:
        synced_while_handling.append(informer.synced)
        threading.Event().wait(0.0005)  # a handler doing some work
        derived.add(o["metadata"]["name"])

    informer.add_handler(handler)
    informer.start()
    assert informer.wait_synced(5)
    assert len(derived) == 200 and not any(synced_while_handling)
    informer.stop()


def test_failed_lists_are_retried() -> None:
    class Flaky(ScriptedSource):
        calls = 0

        def get(self, path: str, **params: Any) -> dict[str, Any]:
            self.calls += 1
            if self.calls < 3:
                raise Unavailable("apiserver restarting")
            return super().get(path, **params)

    source = Flaky(lists=[{"metadata": {"resourceVersion": "1"}, "items": [obj("a", "1")]}], watches=[])
    informer, _ = run(source)
    assert source.calls == 3 and informer.get("a") is not None


def test_selectors_go_to_the_list_and_every_watch() -> None:
    class Recording(ScriptedSource):
        def __init__(self, lists: list[dict[str, Any]], watches: list[Any]) -> None:
            super().__init__(lists, watches)
            self.list_params: list[dict[str, Any]] = []
            self.watch_params: list[dict[str, Any] | None] = []

        def get(self, path: str, **params: Any) -> dict[str, Any]:
            self.list_params.append(params)
            return super().get(path, **params)

        def watch(
            self,
            path: str,
            resource_version: str,
            *,
            timeout_seconds: int = 300,
            params: dict[str, Any] | None = None,
        ) -> Iterator[dict[str, Any]]:
            self.watch_params.append(params)
            return super().watch(path, resource_version, timeout_seconds=timeout_seconds, params=params)

    source = Recording(
        lists=[{"metadata": {"resourceVersion": "1"}, "items": [obj("node-1", "1")]}],
        watches=[[{"type": "MODIFIED", "object": obj("node-1", "2")}]],
    )
    run(source, field_selector="metadata.name=node-1", label_selector="a=b")
    wanted = {"fieldSelector": "metadata.name=node-1", "labelSelector": "a=b"}
    assert source.list_params == [{**wanted, "limit": 500}]
    assert source.watch_params[:2] == [wanted, wanted]

    only_fields = Recording(lists=[{"metadata": {"resourceVersion": "1"}, "items": []}], watches=[])
    run(only_fields, field_selector="metadata.name=node-2")
    assert only_fields.list_params == [{"fieldSelector": "metadata.name=node-2", "limit": 500}]


def test_a_list_is_read_in_pages_each_transformed_before_the_next_is_read() -> None:
    pages_read: list[dict[str, Any]] = []
    transformed: list[str] = []

    class Paged(ScriptedSource):
        def get(self, path: str, **params: Any) -> dict[str, Any]:
            pages_read.append(dict(params))
            # Page n is read only once every object of page n-1 went through the transform.
            assert len(transformed) == 2 * (len(pages_read) - 1)
            return super().get(path, **params)

    source = Paged(
        lists=[
            {"metadata": {"resourceVersion": "7", "continue": "t1"}, "items": [obj("a", "1"), obj("b", "2")]},
            {"metadata": {"resourceVersion": "7", "continue": "t2"}, "items": [obj("c", "3"), obj("d", "4")]},
            {"metadata": {"resourceVersion": "7"}, "items": [obj("e", "5")]},
        ],
        watches=[],
    )

    def transform(o: dict[str, Any]) -> dict[str, Any]:
        transformed.append(o["metadata"]["name"])
        return {"metadata": {"name": o["metadata"]["name"]}}

    informer, seen = run(source, page_size=2, transform=transform)
    assert pages_read == [{"limit": 2}, {"limit": 2, "continue": "t1"}, {"limit": 2, "continue": "t2"}]
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "b", "c", "d", "e"]
    assert seen == [("ADDED", n) for n in "abcde"]
    assert source.watched_from[0] == "7" and informer.lists == 1


def test_an_expired_continue_token_lists_again_from_the_start() -> None:
    source = ScriptedSource(
        lists=[
            {"metadata": {"resourceVersion": "7", "continue": "t1"}, "items": [obj("a", "1")]},
            Gone("continue token too old"),  # type: ignore[list-item]
            {"metadata": {"resourceVersion": "9"}, "items": [obj("a", "8"), obj("b", "9")]},
        ],
        watches=[],
    )

    def get(path: str, **params: Any) -> dict[str, Any]:
        answer = source.lists.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    source.get = get  # type: ignore[method-assign]
    informer, seen = run(source, page_size=1)
    assert sorted(o["metadata"]["name"] for o in informer.items()) == ["a", "b"]
    assert seen == [("ADDED", "a"), ("ADDED", "b")]  # nothing of the unfinished list was applied
    assert source.watched_from[0] == "9" and informer.lists == 1


def test_transform_applies_to_listed_and_watched_objects_before_cache_and_handlers() -> None:
    source = ScriptedSource(
        lists=[{"metadata": {"resourceVersion": "10"}, "items": [obj("a", "5", spec={"big": "x" * 100})]}],
        watches=[
            [
                {"type": "ADDED", "object": obj("b", "11", spec={"big": "y"}, status={"phase": "Running"})},
                {"type": "DELETED", "object": obj("a", "12", spec={"big": "z"})},
            ]
        ],
    )
    handed: list[dict[str, Any]] = []

    def slim(o: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": o["metadata"], "phase": (o.get("status") or {}).get("phase", "")}

    informer = Informer(
        source, "/x", max_backoff=0.01, transform=slim, handlers=(lambda kind, o: handed.append(o),)
    )
    informer.start()
    assert source.done.wait(5)
    informer.stop()
    assert informer.items() == [{"metadata": {"name": "b", "resourceVersion": "11"}, "phase": "Running"}]
    assert all("spec" not in o for o in handed) and len(handed) == 3
    assert informer.resource_version == "12"


def test_a_handler_added_before_start_sees_every_object() -> None:
    listing = {"metadata": {"resourceVersion": "1"}, "items": [obj("a", "1")]}
    source = ScriptedSource(lists=[listing], watches=[])
    informer = Informer(source, "/x")
    seen: list[str] = []
    informer.add_handler(lambda kind, o: seen.append(f"{kind} {o['metadata']['name']}"))
    informer.start()
    assert source.done.wait(5)
    informer.stop()
    assert seen == ["ADDED a"]


def test_the_backoff_starts_again_after_a_successful_list_and_watch(caplog: Any) -> None:
    """A new watch cache answers 429 "storage is (re)initializing" until it has listed, then 410
    to a watch from before it. Earlier failures must not make that retry wait long: while it waits,
    the cache misses what changes (a webhook worker would admit pods without new SidecarSets)."""

    class Flaky(ScriptedSource):
        calls = 0

        def get(self, path: str, **params: Any) -> dict[str, Any]:
            self.calls += 1
            if self.calls <= 4:
                raise Unavailable("API server starting")
            return super().get(path, **params)

    source = Flaky(
        lists=[{"metadata": {"resourceVersion": "1"}, "items": []}] * 2,
        watches=[
            [],  # ended by the server (its storage rebuilt): a success
            Unavailable("429 storage is (re)initializing", status=429),
            Gone("410 too old resource version"),
        ],
    )
    with caplog.at_level("WARNING", logger="imagewarm.informer"):
        informer = Informer(source, "/x", min_backoff=0.001, max_backoff=1.0).start()
        assert source.done.wait(5)
        informer.stop()
    waits = [r.retry_seconds for r in caplog.records if hasattr(r, "retry_seconds")]
    assert waits == [0.001, 0.002, 0.004, 0.008, 0.001]
    assert informer.lists == 2


def test_progress_is_reported_after_every_list_event_and_bookmark() -> None:
    """What a program exports per cache (the webhook: per gunicorn worker) to show how current it is."""
    source = ScriptedSource(
        lists=[{"metadata": {"resourceVersion": "10"}, "items": [obj("a", "5")]}],
        watches=[
            [{"type": "ADDED", "object": obj("b", "11")}, {"type": "BOOKMARK", "object": obj("", "20")}],
            [],  # ended by the server
        ],
    )
    reported: list[tuple[str, int, int]] = []

    def progressed(informer: Informer) -> None:
        state = informer.state()
        reported.append((state["resourceVersion"], state["objects"], state["lists"]))
        raise RuntimeError("a broken hook must not stop the cache")

    informer = Informer(source, "/x", on_progress=progressed).start()
    assert source.done.wait(5)
    informer.stop()
    assert reported == [("10", 1, 1), ("11", 2, 1), ("20", 2, 1)]
    state = informer.state()
    assert state["synced"] and state["watches"] == 3 and state["resourceVersion"] == "20"
    assert 0 <= state["secondsSinceProgress"] < 5


def test_state_before_the_first_list() -> None:
    informer = Informer(ScriptedSource(lists=[], watches=[]), "/x")
    assert informer.state() == {
        "synced": False,
        "resourceVersion": "",
        "objects": 0,
        "lists": 0,
        "watches": 0,
        "secondsSinceProgress": None,
    }
