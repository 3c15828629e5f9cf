"""What the delivery rows (1-7, 13) share: the coordinator's stored results, read by SQL.

The coordinator's ``results`` table is where "exactly once" is decided
(``harness.check_db``); these helpers ask it the remaining questions of the
fault plan: in what order each device's results were stored, how long the
backlog of an outage took to drain, and whether a sequence number was ever
given to two different results (a reused seq would be dropped as a
duplicate: a silent loss). Times in the table are wall clock (``time.time()``
on this machine, the same clock the agents stamp ``captured_at`` with).
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .harness import Fleet
from .harness.accounting import DbReport


@dataclass(frozen=True)
class Stored:
    """One stored result: (device, seq), the device's capture time, the coordinator's commit time."""

    device: str
    seq: int
    captured_at: float
    received_at: float


def stored(db_path: str | Path) -> list[Stored]:
    """Every row of the coordinator's results table."""
    conn = sqlite3.connect(f"file:{Path(db_path)}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT device, seq, captured_at, received_at FROM results").fetchall()
    finally:
        conn.close()
    return [Stored(*r) for r in rows]


def db_inversions(rows: list[Stored]) -> int:
    """Results committed in a later batch than a higher seq of the same device (storage order broken)."""
    by_device: dict[str, list[Stored]] = defaultdict(list)
    for r in rows:
        by_device[r.device].append(r)
    count = 0
    for items in by_device.values():
        lowest_later = float("inf")  # earliest commit time among the higher seqs seen so far
        for r in sorted(items, key=lambda r: -r.seq):
            if r.received_at > lowest_later:
                count += 1
            lowest_later = min(lowest_later, r.received_at)
    return count


def drain_s(rows: list[Stored], since_wall: float) -> float | None:
    """Seconds from *since_wall* until the last result captured before it was stored (None: none)."""
    backlog = [r.received_at for r in rows if r.captured_at < since_wall]
    return round(max(backlog) - since_wall, 3) if backlog else None


def seq_reuse(fleet: Fleet) -> int:
    """(device, seq) pairs the counter saw with two different capture times: one number, two results."""
    seen: dict[tuple[str, int], set[float]] = defaultdict(set)
    for a in fleet.counter.arrivals() if fleet.counter else ():
        seen[(a.device, a.seq)].add(a.captured_at)
    return sum(1 for times in seen.values() if len(times) > 1)


def wait_db(fleet: Fleet, expected: dict, timeout: float) -> DbReport:
    """Poll the coordinator database until every expected (device, seq) is stored; the last report."""
    deadline = time.monotonic() + timeout
    while True:
        report = fleet.check_db(expected)
        if report.lost_total == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def wait_last_stored(fleet: Fleet, produced: dict[str, range], timeout: float) -> DbReport:
    """Wait until each device's last numbered result is stored (results the outbox policy dropped
    never will be, so ``wait_db`` would wait them out); the report then."""
    deadline = time.monotonic() + timeout
    while True:
        report = fleet.check_db({d: [seqs[-1]] for d, seqs in produced.items() if seqs})
        if report.lost_total == 0 or time.monotonic() > deadline:
            return fleet.check_db(produced)
        time.sleep(0.2)


def wait_stored(fleet: Fleet, timeout: float, settled_s: float = 2.0) -> tuple[float, dict[str, range]]:
    """Wait, with the agents still running, until the coordinator has caught up with them.

    Takes what the devices numbered so far and waits until all of it is stored,
    again and again, until one such round takes less than *settled_s* (a long
    backlog drains while the devices keep producing). Returns (when the last
    round was complete, time.monotonic(); the seqs it waited for). Stopping
    agents before this leaves what they still owe in their outboxes (a stopped
    agent re-sends nothing); TimeoutError names what is missing.
    """
    deadline = time.monotonic() + timeout
    while True:
        started, expected = time.monotonic(), fleet.produced()
        report = wait_db(fleet, expected, max(1.0, deadline - started))
        if report.lost_total:
            raise TimeoutError(f"not stored within {timeout}s: {report.lost_total} results, {lost_summary(report)}")
        if time.monotonic() - started < settled_s:
            return time.monotonic(), expected


def stop_all(fleet: Fleet, devices: list[str] | None = None) -> dict[str, range]:
    """Stop the agents cleanly (each flushes what it holds to the broker); the seqs they numbered."""
    devices = devices or fleet.devices
    for dev in devices:
        fleet.stop(dev)
    return fleet.produced(devices)


def finish(fleet: Fleet, timeout: float = 60.0, rounds: int = 3) -> tuple[dict[str, range], DbReport, int]:
    """Stop every agent and wait until the coordinator stored all they numbered.

    A clean stop publishes what the outbox holds, but a broker may still drop it
    (a queue over its limit) and a stopped agent re-sends nothing: those results
    wait in its outbox for its next run. So an agent that still owes results is
    started again (it re-sends on connect), given time, and stopped again.
    Returns (produced: per device the seqs it numbered, the database report, how many such restarts it took).
    """
    produced = stop_all(fleet)
    db = wait_db(fleet, produced, timeout=15)
    restarts = 0
    while db.lost_total and restarts < rounds:
        owing = sorted(db.lost)
        for dev in owing:
            fleet.start(dev)
        restarts += 1
        wait_db(fleet, fleet.produced(owing) | {d: n for d, n in produced.items() if d not in owing}, timeout)
        produced = {**produced, **stop_all(fleet, owing)}
        db = wait_db(fleet, produced, timeout=15)
    return produced, db, restarts


def count(produced: dict[str, range]) -> int:
    """How many results the devices numbered in all (``produced`` as ``Fleet.produced()`` gives it)."""
    return sum(len(seqs) for seqs in produced.values())


def lost_summary(report: DbReport, limit: int = 8) -> dict:
    """The first few missing seqs per device, for an assertion message."""
    return {d: s[:limit] for d, s in report.lost.items()}
