"""Timings read after the fact: log lines, coordinator events, sampled gauges.

The agent and coordinator log with wall-clock timestamps (``2026-01-02
03:04:05,678``) and the coordinator records liveness changes in its
``events`` table (``time.time()``), while the harness marks faults with
``time.monotonic()``. ``wall(mono)`` converts a mark, so a detection time is
``event wall time - wall(fault mark)``, good to a few milliseconds.

``Sampler`` polls a callable in a named thread (outbox depth, RSS) so a test
can assert a bound held for the whole fault, not just at its end.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def wall(mono: float) -> float:
    """The ``time.time()`` of a ``time.monotonic()`` reading taken in this process."""
    return time.time() - (time.monotonic() - mono)


def log_times(path: str | Path, pattern: str, after: float = 0.0) -> list[float]:
    """Wall times of the log lines matching *pattern* (regex), stamped at or after *after* (wall)."""
    rx = re.compile(pattern)
    times = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        m = STAMP.match(line)
        if not m or not rx.search(m.group(2)):
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if t >= after - 0.001:  # stamps are truncated to the millisecond
            times.append(t)
    return times


def first_log_time(path: str | Path, pattern: str, after: float = 0.0, before: float = float("inf")) -> float | None:
    """The first matching log line's wall time in [after, before), or None."""
    return next((t for t in log_times(path, pattern, after) if t < before), None)


def coordinator_events(db_path: str | Path, kinds: tuple[str, ...] = (), device: str = "",
                       after: float = 0.0) -> list[tuple[float, str, str, str]]:
    """(ts, kind, device, detail) from the coordinator's event log since *after* (wall), oldest first."""
    conn = sqlite3.connect(f"file:{Path(db_path)}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT ts, kind, device, detail FROM events WHERE ts >= ? ORDER BY id",
                            (after,)).fetchall()
    finally:
        conn.close()
    return [r for r in rows if (not kinds or r[1] in kinds) and (not device or r[2] == device)]


def first_event(db_path: str | Path, kinds: tuple[str, ...], device: str, after: float,
                before: float = float("inf")) -> tuple[float, str] | None:
    """(ts, kind) of the first of *kinds* for *device* in [after, before) (wall), or None."""
    for ts, kind, _, _ in coordinator_events(db_path, kinds, device, after):
        if ts < before:
            return ts, kind
    return None


class Sampler:
    """Call *fn* every *interval* s in a thread of its own; keeps (monotonic time, value) pairs.

    An exception from *fn* (a file briefly locked, a process between runs) skips that sample.
    """

    def __init__(self, name: str, fn: Callable[[], object], interval: float = 0.1) -> None:
        self.fn, self.interval = fn, interval
        self.samples: list[tuple[float, object]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{name}", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "Sampler":
        return self.__enter__()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.fn()))
            except Exception:  # a sample may fail while the file is busy: skip it
                self.errors += 1
            self._stop.wait(self.interval)

    def values(self) -> list:
        return [v for _, v in self.samples]


def broker_drop_notices(log_path: str | Path, client_id: str = "") -> int:
    """How often Mosquitto logged that it dropped outgoing messages (for *client_id*, or any)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return 0
    rx = re.compile(r"Outgoing messages are being dropped for client (\S+?)\.?$")
    return sum(1 for line in text.splitlines()
               if (m := rx.search(line)) and (not client_id or m.group(1) == client_id))
