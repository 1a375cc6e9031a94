"""The agent's threads run in the gunicorn master, which forks workers at any time (at start and
whenever one dies). A child forked while a master thread holds prometheus_client's process-wide
lock (multiprocess mode) would deadlock on its first metric update, so agent threads update metrics
inside `held()`, and a fork waits until none is inside it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
os.register_at_fork(before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_lock.release)


@contextmanager
def held() -> Iterator[None]:
    with _lock:
        yield
