"""What every reconciler is built from (`Context`), and how it hooks into the informers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from controller.caches import Caches
from controller.config import ControllerConfig
from controller.events import EventRecorder
from controller.runner import Reconciler, Runner
from imagewarm.informer import key_of
from imagewarm.kube import Kube


@dataclass
class Context:
    """What every reconciler is built from."""

    config: ControllerConfig
    kube: Kube
    caches: Caches
    runner: Runner
    events: EventRecorder
    # Keys a periodic resync enqueues again, per reconciler name.
    resync: dict[str, Callable[[], Iterable[str]]] = field(default_factory=dict)

    def watch(
        self,
        cache: str,
        reconciler: str,
        keys: Callable[[dict[str, Any]], Iterable[str]] = lambda obj: [key_of(obj)],
        *,
        after: float = 0.0,
    ) -> None:
        """Enqueue `keys(obj)` for `reconciler` on every change of an object in `cache`."""
        self.caches[cache].add_handler(self.runner.handler(reconciler, keys, after=after))

    def resync_all(self, reconciler: str, cache: str) -> None:
        """Reconcile every object of `cache` again on each resync."""
        self.resync[reconciler] = lambda: [key_of(o) for o in self.caches[cache].items()]


ReconcilerFactory = Callable[[Context], Reconciler]
