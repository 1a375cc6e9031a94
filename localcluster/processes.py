"""Background daemons for the local test harness: start, wait until serving, stop without leftovers.

Every daemon runs in its own session (process group id = its pid), writes to its own log file, and
is recorded in a module registry. ``stop_all()`` runs at interpreter exit and on SIGTERM/SIGHUP, so
nothing started here outlives the test session, even when it is interrupted or a test fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from imagewarm.errors import ImagewarmError


class DaemonError(ImagewarmError, RuntimeError):
    """A daemon failed to start or to become ready; the message carries the tail of its log."""


class MissingTool(ImagewarmError, RuntimeError):
    """A program the harness runs is not installed; the message names the package to install."""


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (the local ports of outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct ports that were free a moment ago, never handed out before by this
    process, below the kernel's ephemeral range.

    Ports of the ephemeral range are what a kernel gives any socket bound to port 0 and every
    outgoing connection: a port picked there and released could be taken by a connection before
    its server binds it (a kubelet then failed with "address already in use"). A port handed out
    earlier may not be bound yet by the server it was for, so it is not handed out again."""
    low, high = 10000, _ephemeral_low()
    found: list[int] = []
    with _handed_out_lock:
        if len(_handed_out) > (high - low) // 2:
            _handed_out.clear()
        for port in random.sample(range(low, high), high - low):
            if len(found) == n:
                break
            if port not in _handed_out and _bindable(host, port):
                found.append(port)
                _handed_out.add(port)
    if len(found) < n:
        raise RuntimeError(f"fewer than {n} free ports on {host} between {low} and {high}")
    return found


def free_port_on(*hosts: str) -> int:
    """A port that was free a moment ago on every one of `hosts` (loopback addresses such as
    127.0.0.1 and 127.0.0.2), for servers that must share a port, as a DaemonSet's do across nodes."""
    for _ in range(50):
        port = free_ports(1, hosts[0])[0]
        if all(_bindable(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid`` with arguments joined by spaces, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


class Daemon:
    """One long-running command in its own process group, logging to ``log_path``.

    ``marker`` is a string the process's command line must contain before it is signalled (a
    recorded pid may have been reused by an unrelated process); by default the arguments.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        marker: str | None = None,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.marker = marker if marker is not None else " ".join(self.argv[1:] or self.argv[:1])
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this run's output starts in the (appended) log
        self.owner_pid = os.getpid()  # only the starting process may stop it at exit

    def __repr__(self) -> str:
        return f"Daemon({self.name!r}, pid={self.pid}, running={self.running})"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> Daemon:
        """Start the command (appending to its log). Raises DaemonError if already running."""
        if self.running:
            raise DaemonError(f"{self.name} is already running (pid {self.pid}); stop() it first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.owner_pid = os.getpid()
        _register(self)
        return self

    def stop(self, timeout: float = 10) -> int | None:
        """TERM the whole process group, wait up to ``timeout`` seconds, then KILL it.

        Returns the exit code of the main process (None if it was never started). Idempotent.
        Raises DaemonError, signalling nothing, if the live process's command line lacks ``marker``.
        """
        if self._popen is None:
            return None
        try:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait(5)
            # Children that ignored TERM (or outlived the leader) still share the group.
            self._signal_group(signal.SIGKILL)
        finally:
            _unregister(self)
        return self._popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash: nothing gets to clean up) and reap it."""
        if self._popen is None:
            return None
        try:
            self._signal_group(signal.SIGKILL)
            self._popen.wait(10)
        finally:
            _unregister(self)
        return self._popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        pid = self._popen.pid
        if self._popen.poll() is None:
            cmdline = _cmdline(pid)
            # Right after exec the new command line is briefly empty: wait for it to appear.
            deadline = time.monotonic() + 1
            while cmdline == "" and time.monotonic() < deadline and self._popen.poll() is None:
                time.sleep(0.01)
                cmdline = _cmdline(pid)
            if cmdline and self.marker not in cmdline:
                raise DaemonError(
                    f"refusing to signal pid {pid} of {self.name}: its command line {cmdline!r} "
                    f"does not contain {self.marker!r}; pass the right marker to Daemon()"
                )
        elif Path(f"/proc/{pid}").exists():
            # Leader reaped and its pid already reused by someone else: their group, not ours.
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def output(self) -> str:
        """What the current (or last) run wrote to the log, without earlier runs' output."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 30) -> None:
        """Return once this run's output contains ``text``: proof that *this* process is serving,
        where a port or URL check could be answered by another process holding the address.
        Raises DaemonError if the process exits or the deadline passes, with the log tail.
        """
        deadline = time.monotonic() + timeout
        while text not in self.output():
            self._check_alive(repr(text))
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} did not log {text!r} within {timeout}s; "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _check_alive(self, waiting_for: str) -> None:
        if not self.running:
            code = self._popen.returncode if self._popen else None
            raise DaemonError(
                f"{self.name} exited (code {code}) while waiting for {waiting_for}; "
                f"its log {self.log_path} ends with:\n{self.log_tail()}"
            )

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
        """Return once a TCP connection to ``host:port`` succeeds; DaemonError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(f"{host}:{port}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} did not listen on {host}:{port} within {timeout}s; "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def wait_http(self, url: str, timeout: float = 30, *, statuses: Sequence[int] | None = None) -> int:
        """Return the status once ``url`` answers with any HTTP status (or one of ``statuses``).

        Raises DaemonError if the process exits or the deadline passes, with the log tail.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            self._check_alive(url)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    status = int(response.status)
            except urllib.error.HTTPError as error:
                status = error.code
            except (OSError, ValueError) as error:
                status, last = 0, str(error)
            if status and (statuses is None or status in statuses):
                return status
            if status:
                last = f"HTTP {status}"
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"{self.name} did not serve {url} within {timeout}s (last: {last}); "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            time.sleep(0.05)


# --- the registry of live daemons -------------------------------------------------------------

_lock = threading.Lock()
_live: dict[int, Daemon] = {}
_atexit_installed = False
_signals_installed = False
_previous_handlers: dict[int, Any] = {}


def _register(daemon: Daemon) -> None:
    with _lock:
        _live[id(daemon)] = daemon
    _install_handlers()


def _unregister(daemon: Daemon) -> None:
    with _lock:
        _live.pop(id(daemon), None)


def live_daemons() -> list[Daemon]:
    """Daemons this process started and has not stopped yet, oldest first.

    A forked child inherits the registry but not the daemons: it sees none of them.
    """
    with _lock:
        return [daemon for daemon in _live.values() if daemon.owner_pid == os.getpid()]


def stop_all(timeout: float = 10) -> None:
    """Stop every live daemon, newest first (dependents before what they depend on)."""
    for daemon in reversed(live_daemons()):
        with contextlib.suppress(Exception):
            daemon.stop(timeout)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all(timeout=5)
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    # Re-deliver with the default action so the exit status still says "killed by signal".
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """Stop daemons at exit and on SIGTERM/SIGHUP (Ctrl-C unwinds to atexit). Installed once;
    the signal handlers as soon as a daemon is started from the main thread (Python's rule).
    """
    global _atexit_installed, _signals_installed
    with _lock:
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(stop_all)
        if _signals_installed or threading.current_thread() is not threading.main_thread():
            return
        _signals_installed = True
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # the owner chose to survive this signal; so do its daemons
            _previous_handlers[signum] = previous
            signal.signal(signum, _on_signal)
