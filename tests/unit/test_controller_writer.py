"""NodeImageWriter: one image entry patched with the version it was computed from, conflicts
recomputed, and reads that see our own last write until the cache catches up."""

from __future__ import annotations

import copy
from typing import Any

from controller.nodeimagewriter import NodeImageWriter
from imagewarm.kube import Conflict


class Store:
    """One NodeImage in a pretend API server (merge patch of spec.images, version checks)."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] = {"metadata": {"name": "n", "resourceVersion": "1"}, "spec": {"images": {}}}
        self.patches: list[dict[str, Any]] = []
        self.before_patch: Any = None
        self.after_patch: Any = None

    def bump(self, images: dict[str, Any]) -> None:
        version = int(self.obj["metadata"]["resourceVersion"]) + 1
        self.obj = {"metadata": {"name": "n", "resourceVersion": str(version)}, "spec": {"images": images}}

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    def patch(self, path: str, body: dict[str, Any], kind: str = "merge") -> dict[str, Any]:
        if self.before_patch is not None:
            hook, self.before_patch = self.before_patch, None
            hook()
        self.patches.append(body)
        if body["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
            raise Conflict("changed")
        images = dict(self.obj["spec"]["images"])
        for name, entry in body["spec"]["images"].items():
            if entry is None:
                images.pop(name, None)
            else:
                images[name] = entry
        self.bump(images)
        result = copy.deepcopy(self.obj)
        if self.after_patch is not None:
            hook, self.after_patch = self.after_patch, None
            hook()
        return result


class Cache:
    def __init__(self, obj: dict[str, Any] | None) -> None:
        self.obj = copy.deepcopy(obj)

    def get(self, key: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.obj)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {"n": copy.deepcopy(self.obj)} if self.obj else {}


def entry(owner: str) -> dict[str, Any]:
    return {"tags": [{"tag": "1", "ownerReferences": [{"uid": owner}]}]}


def test_reads_see_our_write_until_the_cache_moves_on() -> None:
    store = Store()
    cache = Cache(store.obj)
    writer = NodeImageWriter(store, cache)  # type: ignore[arg-type]
    writer.update("n", "app", lambda e: entry("a"))
    assert writer.get("n")["spec"]["images"]["app"] == entry("a"), "cache behind: our write answers"  # type: ignore[index]
    cache.obj = copy.deepcopy(store.obj)  # the watch event arrives
    store.bump({"app": entry("a"), "other": entry("z")})  # ...and then someone else's write
    cache.obj = copy.deepcopy(store.obj)
    assert "other" in writer.get("n")["spec"]["images"], "the cache moved on: it answers again"  # type: ignore[index]


def test_no_write_when_the_entry_is_already_wanted() -> None:
    store = Store()
    store.bump({"app": entry("a")})
    writer = NodeImageWriter(store, Cache(store.obj))  # type: ignore[arg-type]
    writer.update("n", "app", lambda e: entry("a"))
    assert store.patches == []


def test_a_conflict_recomputes_from_the_fresh_object_and_keeps_the_other_write() -> None:
    store = Store()
    writer = NodeImageWriter(store, Cache(store.obj))  # type: ignore[arg-type]
    store.before_patch = lambda: store.bump({"app": entry("b")})  # another job wrote first

    def add_a(current: dict[str, Any] | None) -> dict[str, Any]:
        owners = [r for t in (current or {"tags": []})["tags"] for r in t["ownerReferences"]]
        return {"tags": [{"tag": "1", "ownerReferences": [*owners, {"uid": "a"}]}]}

    writer.update("n", "app", add_a)
    assert [r["uid"] for r in store.obj["spec"]["images"]["app"]["tags"][0]["ownerReferences"]] == ["b", "a"]
    assert len(store.patches) == 2 and writer.writes == 1
    # The cache still shows version 1 (older than both writes): our write answers.
    assert writer.get("n")["metadata"]["resourceVersion"] == store.obj["metadata"]["resourceVersion"]  # type: ignore[index]


def test_removing_the_last_tag_removes_the_entry() -> None:
    store = Store()
    store.bump({"app": entry("a")})
    writer = NodeImageWriter(store, Cache(store.obj))  # type: ignore[arg-type]
    writer.update("n", "app", lambda e: None)
    assert store.patches[-1]["spec"]["images"] == {"app": None} and store.obj["spec"]["images"] == {}


def test_a_cache_already_past_our_write_answers() -> None:
    """The agent writes right after us and its event reaches the cache before our patch returns:
    the cache is newer than our write and must answer (a stale answer would stick for good)."""
    store = Store()
    cache = Cache(store.obj)
    writer = NodeImageWriter(store, cache)  # type: ignore[arg-type]

    def agent_writes() -> None:
        store.bump({"app": entry("a"), "status-by-agent": entry("x")})
        cache.obj = copy.deepcopy(store.obj)

    store.after_patch = agent_writes
    writer.update("n", "app", lambda e: entry("a"))
    assert "status-by-agent" in writer.get("n")["spec"]["images"]  # type: ignore[index]
    assert "status-by-agent" in writer.snapshot()["n"]["spec"]["images"]
