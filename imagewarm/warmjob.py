"""`imagewarm warm` in cluster mode: create an ImagePullJob (one image) or an ImageListPullJob
(several), then follow it until it finishes, from the API server only.

The controller expands the job into NodeImage tasks and the node agents pull; this module reads
what they report: a node is a target of the job when its NodeImage has a task owned by the job
(DESIGN.md "Control plane"), and the task's status gives its phase, progress, digest and times.
Progress lines go to stderr whenever a node's phase or progress changes; the summary table goes to
stdout. The pure parts (`job_object`, `node_rows`, `bar`, `summary_rows`, `finished`) are
unit-tested; `follow` polls the API server.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagewarm import api
from imagewarm.reference import Reference

POLL_SECONDS = 1.0
CRDS_MISSING = (
    "the imagewarm CRDs are not installed in this cluster: install the chart "
    "(`helm install imagewarm charts/imagewarm`) or apply them (`kubectl apply -f charts/imagewarm/crds/`)"
)
BAR_WIDTH = 20


def parse_selector(text: str) -> dict[str, str]:
    """`key=value[,key=value...]` (what `kubectl -l` takes for equality) -> matchLabels. Raises
    ValueError otherwise."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip().removeprefix("=")  # `==` as kubectl allows
        if not sep or not key:
            raise ValueError("expected node labels as key=value[,key=value], e.g. pool=gpu,zone=a")
        labels[key] = value
    return labels


def parse_parallelism(text: str) -> int | str:
    """An int or a percentage, as the CRD takes it. Raises ValueError otherwise."""
    value: int | str = int(text) if text.strip().isdigit() else text.strip()
    api.resolve_parallelism(value, 100)
    return value


def job_object(
    images: Sequence[Reference],
    *,
    namespace: str,
    parallelism: int | str | None = None,
    selector: Mapping[str, str] | None = None,
    nodes: Sequence[str] = (),
    pull_secrets: Sequence[str] = (),
) -> dict[str, Any]:
    """The ImagePullJob (one image) or ImageListPullJob (several) to create, named `warm-<random>`
    by the API server, completing when every target node has pulled (completionPolicy Always)."""
    template: dict[str, Any] = {"completionPolicy": {"type": "Always"}}
    if parallelism is not None:
        template["parallelism"] = parallelism
    if nodes:
        template["selector"] = {"names": list(nodes)}
    elif selector:
        template["selector"] = {"matchLabels": dict(selector)}
    if pull_secrets:
        template["pullSecrets"] = list(pull_secrets)
    metadata = {
        "generateName": "warm-",
        "namespace": namespace,
        "labels": {"app.kubernetes.io/created-by": "imagewarm-warm"},
    }
    if len(images) == 1:
        spec = {**template, "image": str(images[0])}
        return {"apiVersion": api.api_version(), "kind": "ImagePullJob", "metadata": metadata, "spec": spec}
    spec = {**template, "images": [str(i) for i in images]}
    return {"apiVersion": api.api_version(), "kind": "ImageListPullJob", "metadata": metadata, "spec": spec}


@dataclass(frozen=True)
class NodeRow:
    """Where one node stands for one image of the job."""

    node: str
    image: str
    phase: str
    progress: int = 0
    digest: str = ""
    seconds: float | None = None
    message: str = ""


def _seconds(start: object, end: object) -> float | None:
    import datetime as dt

    try:
        begun = dt.datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        done = dt.datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (done - begun).total_seconds()


def node_rows(image: Reference, job_uid: str, nodeimages: Iterable[Mapping[str, Any]]) -> list[NodeRow]:
    """One row per node whose NodeImage has a task for `image` owned by the job `job_uid`."""
    name, tag = image.name, image.digest or image.tag or "latest"
    rows = []
    for nodeimage in nodeimages:
        node = str((nodeimage.get("metadata") or {}).get("name"))
        entry = ((nodeimage.get("spec") or {}).get("images") or {}).get(name) or {}
        task = next((t for t in entry.get("tags") or [] if t.get("tag") == tag), None)
        if task is None or not any(o.get("uid") == job_uid for o in task.get("ownerReferences") or []):
            continue
        statuses = (((nodeimage.get("status") or {}).get("imageStatuses") or {}).get(name) or {}).get("tags")
        status = next((s for s in statuses or [] if s.get("tag") == tag), None) or {}
        if (status.get("version") or 0) < (task.get("version") or 0):
            status = {}  # the agent reports on an older version of the task: not started yet
        phase = str(status.get("phase") or "Waiting")
        progress = 100 if phase == "Succeeded" else int(status.get("progress") or 0)
        seconds = _seconds(status.get("startTime"), status.get("completionTime")) if status else None
        digest = str(status.get("imageID") or "").rpartition("@")[2]  # `sha256:…` or `name@sha256:…`
        message = str(status.get("message") or "")
        rows.append(NodeRow(node, image.familiar, phase, progress, digest, seconds, message))
    return sorted(rows, key=lambda r: r.node)


def bar(row: NodeRow) -> str:
    """`iw-node-1  nginx:1.27  [##########          ]  50%  Pulling`."""
    filled = row.progress * BAR_WIDTH // 100
    drawn = "#" * filled + " " * (BAR_WIDTH - filled)
    line = f"{row.node}  {row.image}  [{drawn}] {row.progress:3d}%  {row.phase}"
    return line + (f"  {row.message}" if row.message and row.phase == "Failed" else "")


def summary_rows(rows: Iterable[NodeRow], several_images: bool) -> list[tuple[str, ...]]:
    out = []
    for row in rows:
        seconds = f"{row.seconds:.1f}" if row.seconds is not None else "-"
        cells = [row.node, row.phase, row.digest or "-", seconds, row.message or "-"]
        if several_images:
            cells.insert(1, row.image)
        out.append(tuple(cells))
    return out


def finished(jobs: Iterable[Mapping[str, Any]]) -> bool:
    """Whether every job has a completionTime (the controller sets it when an Always job ends)."""
    return all((j.get("status") or {}).get("completionTime") for j in jobs)


def succeeded(jobs: Sequence[Mapping[str, Any]], rows: Sequence[NodeRow]) -> bool:
    """Every target node of every job succeeded (a job that targeted no node did not)."""
    if not rows or not jobs:
        return False
    for job in jobs:
        status = job.get("status") or {}
        if (
            status.get("failed")
            or not status.get("desired")
            or status.get("succeeded") != status.get("desired")
        ):
            return False
    return all(r.phase == "Succeeded" for r in rows)


class JobError(RuntimeError):
    """The job cannot be created or followed; the message says what to do."""


@dataclass
class Follower:
    """Follows a job: watches the NodeImages (start it before creating the job, so no status is
    missed) and polls the job (and, for a list job, the ImagePullJobs it owns).

    A finished job's tasks leave the NodeImages (the controller compacts them), so each node's row
    is the last status the watch saw for a task the job owned, not what the NodeImages hold now."""

    client: Any
    images: Sequence[Reference]
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    poll: float = POLL_SECONDS
    settle: float = 5.0  # how long a finished job's last statuses may take to arrive
    job: dict[str, Any] = field(default_factory=dict)
    _seen: dict[tuple[str, str, str], NodeRow] = field(default_factory=dict)  # (job uid, node, image)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _informer: Any = None

    @property
    def label(self) -> str:
        return f"{self.job['kind']} {self.job['metadata']['namespace']}/{self.job['metadata']['name']}"

    def start(self, timeout: float = 30.0) -> None:
        """Watch the NodeImages. Raises JobError when they cannot be listed."""
        from imagewarm.informer import Informer

        self._informer = Informer(
            self.client, api.NODE_IMAGE.path(), name="warm", watch_timeout=60, handlers=(self._on_nodeimage,)
        ).start()
        if not self._informer.wait_synced(timeout):
            self.stop()
            raise JobError(f"cannot list NodeImages within {timeout:.0f}s: is the API server reachable?")

    def stop(self) -> None:
        if self._informer is not None:
            self._informer.stop(timeout=0.1)

    def _on_nodeimage(self, kind: str, nodeimage: dict[str, Any]) -> None:
        if kind == "DELETED":
            return
        for image in self.images:
            entry = ((nodeimage.get("spec") or {}).get("images") or {}).get(image.name) or {}
            tag = image.digest or image.tag or "latest"
            task = next((t for t in entry.get("tags") or [] if t.get("tag") == tag), None) or {}
            for owner in task.get("ownerReferences") or []:
                if owner.get("kind") != "ImagePullJob":
                    continue
                for row in node_rows(image, str(owner.get("uid")), [nodeimage]):
                    with self._lock:
                        previous = self._seen.get((str(owner.get("uid")), row.node, row.image))
                        self._seen[(str(owner.get("uid")), row.node, row.image)] = row
                    if previous is None or (previous.phase, previous.progress) != (row.phase, row.progress):
                        self.report(bar(row))

    def _jobs(self) -> list[dict[str, Any]]:
        """[(ImagePullJob)] the job itself, or the ImagePullJobs an ImageListPullJob owns."""
        from imagewarm import kube

        metadata = self.job["metadata"]
        namespace, name, uid = metadata["namespace"], metadata["name"], metadata["uid"]
        try:
            if self.job["kind"] == "ImagePullJob":
                return [self.client.get(api.IMAGE_PULL_JOB.path(name, namespace))]
            self.client.get(api.IMAGE_LIST_PULL_JOB.path(name, namespace))  # still there?
            children = self.client.get(api.IMAGE_PULL_JOB.path(namespace=namespace)).get("items") or []
        except kube.NotFound:
            raise JobError(f"{self.label} was deleted while it was followed") from None
        owned = [
            c
            for c in children
            if any(o.get("uid") == uid for o in c["metadata"].get("ownerReferences") or [])
        ]
        return sorted(owned, key=lambda c: str(c["spec"].get("image")))

    def rows(self, jobs: Sequence[Mapping[str, Any]]) -> list[NodeRow]:
        """The last row seen of every node of every job, by job then node."""
        uids = [str(j["metadata"]["uid"]) for j in jobs]
        with self._lock:
            seen = dict(self._seen)
        return [row for uid in uids for key, row in sorted(seen.items()) if key[0] == uid]

    def follow(self) -> tuple[list[dict[str, Any]], list[NodeRow]]:
        """Until every job finished: (the jobs, the node rows). Temporary API errors are retried."""
        from imagewarm import kube

        expected = len(self.images) if self.job["kind"] == "ImageListPullJob" else 1
        while True:
            try:
                jobs = self._jobs()
            except kube.Unavailable as exc:
                self.report(f"the API server did not answer ({exc}); retrying")
                time.sleep(self.poll)
                continue
            if len(jobs) >= expected and finished(jobs):
                break
            time.sleep(self.poll)
        # The job's result is written after its nodes' last statuses: wait for the watch to bring them.
        desired = sum(int((j.get("status") or {}).get("desired") or 0) for j in jobs)
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline:
            rows = self.rows(jobs)
            if len(rows) >= desired and all(r.phase in ("Succeeded", "Failed") for r in rows):
                break
            time.sleep(0.1)
        return jobs, self.rows(jobs)


def _create_once(client: Any, path: str, job: dict[str, Any], attempts: int = 6) -> dict[str, Any]:
    """POST the job, again only after a 429 (a CRD's storage initializing, throttling): the server
    refused it, so nothing was created. Any other failure is not retried: with `generateName` a
    POST whose answer was lost may have created a job, and a retry would make a second one."""
    from imagewarm import kube

    for attempt in range(attempts):
        try:
            created: dict[str, Any] = client.create(path, job)
            return created
        except kube.Unavailable as exc:
            if exc.status != 429 or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def create(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Create the job; raises JobError saying what to do (CRDs missing, RBAC, invalid spec)."""
    from imagewarm import kube

    resource = api.IMAGE_PULL_JOB if job["kind"] == "ImagePullJob" else api.IMAGE_LIST_PULL_JOB
    namespace = job["metadata"]["namespace"]
    try:
        created = _create_once(client, resource.path(namespace=namespace), job)
    except kube.NotFound as exc:
        if "namespaces" in str(exc) and f'"{namespace}"' in str(exc):
            raise JobError(
                f"namespace {namespace} does not exist: give an existing one with --namespace"
            ) from None
        raise JobError(CRDS_MISSING) from None
    except kube.Forbidden as exc:
        raise JobError(
            f"cannot create a {job['kind']} in {namespace}: {exc} (needs `create` on {resource.crd_name})"
        ) from None
    except kube.Invalid as exc:
        raise JobError(f"the API server rejected the {job['kind']}: {exc}") from None
    except kube.KubeError as exc:
        raise JobError(f"cannot create the {job['kind']}: {exc}") from None
    return created
