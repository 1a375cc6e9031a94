"""The serving TLS context, reloaded when `tls.crt`/`tls.key` change (cert-manager rotation, or our
own certificate manager), without restarting gunicorn: gunicorn asks its `ssl_context` hook for a
context on every new connection, and this returns the current one."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

log = logging.getLogger("imagewarm.webhook")

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


class ReloadingContext:
    """An SSLContext for the pair in `directory`, rebuilt when either file changes (checked at most
    every `check_interval` seconds). A pair that fails to load keeps the previous context in use."""

    def __init__(self, directory: str | os.PathLike[str], *, check_interval: float = 1.0) -> None:
        self.directory = Path(directory)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] = ()
        self._checked = 0.0
        self._context: ssl.SSLContext | None = None

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    def _files_stamp(self) -> tuple[float, ...]:
        stats = [p.stat() for p in (self.cert_path, self.key_path)]
        return tuple(x for s in stats for x in (s.st_mtime_ns, s.st_size, s.st_ino))

    def get(self) -> ssl.SSLContext:
        """The current context. Raises FileNotFoundError/ssl.SSLError only if no pair ever loaded."""
        now = time.monotonic()
        with self._lock:
            if self._context is not None and now - self._checked < self.check_interval:
                return self._context
            self._checked = now
            try:
                stamp = self._files_stamp()
                if stamp != self._stamp or self._context is None:
                    self._context = self._load()
                    self._stamp = stamp
                    log.info("serving certificate loaded", extra={"cert": str(self.cert_path)})
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise
                log.warning(
                    "new certificate not usable yet; keeping the previous one", extra={"error": str(exc)}
                )
            return self._context

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        context.set_alpn_protocols(["http/1.1"])
        return context
