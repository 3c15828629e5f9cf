"""systemd readiness and watchdog over ``NOTIFY_SOCKET``, in plain socket code.

``READY=1`` once the broker session and the pipelines are up, ``STATUS=``
lines a person reads in ``systemctl status``, and ``WATCHDOG=1`` at half of
``WATCHDOG_USEC`` for as long as the agent is healthy: a stuck pipeline stops
the pings and systemd restarts the service. Without ``NOTIFY_SOCKET`` (not
under systemd) everything here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams; a no-op when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # '@' names a socket in the abstract namespace (a leading NUL byte).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = self._watchdog_interval(env)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed = False

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None if no watchdog is set for us."""
        pid = env.get("WATCHDOG_PID", "")
        if pid and pid != str(os.getpid()):
            return None  # the watchdog is meant for another process (e.g. our parent)
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False if not under systemd or it failed."""
        if not self.address:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                if not self._failed:
                    log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
                self._failed = True
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Pings ``WATCHDOG=1`` every half interval while *healthy()* says so."""

    def __init__(self, notifier: Notifier, healthy: Callable[[], tuple[bool, str]]) -> None:
        self.notifier, self.healthy = notifier, healthy
        self.pings = 0
        self._thread: threading.Thread | None = None
        self._was_healthy = True

    def start(self, stop: threading.Event) -> None:
        """Start pinging (only if systemd asked for a watchdog)."""
        if not self.notifier.enabled or not self.notifier.watchdog_s:
            return
        self._thread = threading.Thread(target=self._run, args=(stop,), name="watchdog", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        interval = self.notifier.watchdog_s or 1.0
        while not stop.wait(interval):
            ok, why = self.healthy()
            if ok:
                self.notifier.send("WATCHDOG=1")
                self.pings += 1
            elif self._was_healthy:
                log.error("not pinging the systemd watchdog: %s", why)
                self.notifier.status(f"unhealthy: {why}")
            self._was_healthy = ok

    def join(self, timeout: float = 1.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
