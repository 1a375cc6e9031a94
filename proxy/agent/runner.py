"""One pull task's execution: attempts of `imagewarm.warmup.warm` through this node's own proxy
(its verify and cross-process single-flight path, so a warm-up and a kubelet pulling the same blob
share one upstream fetch), with the task's pull-secret credentials, for the node's platform.

`timeoutSeconds` bounds each attempt, `backoffLimit` the retries (1 s doubling, capped at 60 s, in
between), `activeDeadlineSeconds` the whole task from its startTime. An attempt that ends, by
timeout or error, leaves every blob the proxy verified in the cache, so the next attempt (or a
restarted agent) fetches only the blobs still missing; a timed-out attempt leaves the proxy's fill
running for the next to join, and a blob whose upstream transfer broke off (or whose proxy was
killed) resumes from the bytes its partial file holds.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from imagewarm import warmup
from imagewarm.kube import Kube
from imagewarm.platforms import Platform
from imagewarm.reference import InvalidReference, Reference
from proxy import metrics
from proxy.agent import nodeimage, secrets
from proxy.agent.nodeimage import FAILED, SUCCEEDED, Key, TagState, Task
from proxy.agent.pins import Pins

log = logging.getLogger("imagewarm.proxy.agent.runner")

# Publishes a task's new state; `urgent` for a phase or message change, not for progress alone.
Update = Callable[[Key, TagState, bool], None]


@dataclass(frozen=True)
class Context:
    """What every task of this node needs."""

    kube: Kube
    proxy_url: str
    platform: Platform
    pins: Pins
    node: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TaskRun:
    """Runs one version of one task on its own thread until it succeeds, fails or is cancelled."""

    def __init__(self, task: Task, state: TagState, context: Context, update: Update) -> None:
        self.task = task
        self.state = state
        self.context = context
        self.update = update
        self.cancelled = threading.Event()
        self._attempt_stop = threading.Event()

    def cancel(self) -> None:
        """Stop at the next chunk (the task left the spec or got a new version); nothing is reported."""
        self.cancelled.set()
        self._attempt_stop.set()

    def _publish(self, state: TagState, urgent: bool) -> None:
        if self.cancelled.is_set():
            return
        self.state = state
        self.update(self.task.key, state, urgent)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug must fail the task visibly, not leave it Pulling
            log.exception("pull task crashed", extra={"image": self.task.image})
            self._finish(FAILED, f"internal error of the node agent ({type(exc).__name__}); see its log")

    def _run(self) -> None:
        task, policy = self.task, self.task.policy
        try:
            image = task.reference()
        except InvalidReference as exc:
            self._finish(FAILED, f"{task.image} is not a valid image reference: {exc}; fix its name or tag")
            return
        # The deadline runs from the task's startTime, also for a task resumed after a restart.
        start = nodeimage.parse_time(self.state.start_time) or _now()
        started = time.monotonic() - max(0.0, (_now() - start).total_seconds())
        attempts = policy.backoff_limit + 1
        last_error = ""
        for attempt in range(1, attempts + 1):
            limit = nodeimage.attempt_limit(policy, started, time.monotonic())
            if limit <= 0:
                self._deadline_passed(attempt - 1, last_error)
                return
            error = self._attempt(image, attempt, limit)
            if error is None or self.cancelled.is_set():
                return
            last_error = error
            if attempt == attempts:
                break
            delay = nodeimage.backoff_delay(attempt - 1)
            left = nodeimage.attempt_limit(policy, started, time.monotonic())
            metrics.AGENT_PULLS.labels(result="retried").inc()
            self._publish(
                replace(self.state, message=f"attempt {attempt} of {attempts} failed: {error}; retrying"),
                True,
            )
            log.warning(
                "pull attempt failed; retrying",
                extra={"image": task.image, "attempt": attempt, "error": error, "retry_seconds": delay},
            )
            if self.cancelled.wait(min(delay, max(0.0, left))):
                return
        self._finish(
            FAILED,
            f"failed after {attempts} attempt{'s' if attempts > 1 else ''} (backoffLimit "
            f"{policy.backoff_limit}): {last_error}",
        )

    def _attempt(self, image: Reference, attempt: int, limit: float) -> str | None:
        """One warm-up of at most `limit` seconds; None when it succeeded (or was cancelled), else
        the error message for the status."""
        task = self.task
        self._attempt_stop = stop = threading.Event()
        if self.cancelled.is_set():
            return None
        timer = threading.Timer(limit, stop.set)
        timer.daemon = True
        timer.start()
        try:
            authorization = secrets.authorization(self.context.kube, task.pull_secrets, image)
            result = warmup.warm(
                image,
                self.context.proxy_url,
                platform=self.context.platform,
                authorization=authorization,
                progress=self._progress,
                # A stalled transfer ends at its read timeout: within the attempt's limit.
                timeout=max(1.0, min(60.0, limit)),
                cancel=stop,
            )
        except warmup.WarmCancelled:
            if self.cancelled.is_set():
                return None
            return (
                f"attempt {attempt} timed out after {limit:.0f}s (timeoutSeconds "
                f"{task.policy.timeout_seconds}) at {self.state.progress}% of bytes; the blobs verified "
                "so far stay cached and the next attempt resumes from them"
            )
        except (warmup.WarmError, secrets.SecretError) as exc:
            return str(exc)
        finally:
            timer.cancel()
        self.context.pins.pin(task.pin_owner, result.blob_digests)
        metrics.AGENT_WARMED_BYTES.inc(result.bytes)
        cached = f", {result.cached} of {result.blobs} blobs already cached" if result.cached else ""
        self._finish(
            SUCCEEDED,
            f"pulled {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f}s{cached}",
            image_id=result.digest,
        )
        return None

    def _progress(self, progress: warmup.Progress) -> None:
        done = nodeimage.percent(progress.done, progress.total)
        if done != self.state.progress and done < 100:
            self._publish(replace(self.state, progress=done), False)

    def _deadline_passed(self, attempts: int, last_error: str) -> None:
        seconds = self.task.policy.active_deadline_seconds
        detail = f"; last error: {last_error}" if last_error else ""
        self._finish(
            FAILED,
            f"activeDeadlineSeconds ({seconds}s) passed after {attempts} attempt"
            f"{'s' if attempts != 1 else ''}{detail}; raise it or timeoutSeconds for a big image",
        )

    def _finish(self, phase: str, message: str, image_id: str = "") -> None:
        if self.cancelled.is_set():
            return
        metrics.AGENT_PULLS.labels(result=phase.lower()).inc()
        state = replace(
            self.state,
            phase=phase,
            message=message,
            completion_time=nodeimage.format_time(_now()),
            image_id=image_id or self.state.image_id,
            progress=100 if phase == SUCCEEDED else self.state.progress,
        )
        (log.info if phase == SUCCEEDED else log.warning)(
            "pull task finished",
            extra={"node": self.context.node, "image": self.task.image, "phase": phase, "detail": message},
        )
        self._publish(state, True)
