"""Receiving-end accounting: what arrived, what was lost, duplicated, reordered.

``analyse(arrivals, expected)`` is pure: it takes the (device, seq, time)
records a ``ResultCounter`` collected on the wire and says, per device, which
expected sequence numbers never arrived (lost), how many arrived more than
once (wire duplicates: allowed, at-least-once), how many first arrivals came
after a higher seq of the same device (order inversions), the missing seq
ranges (gaps) and the longest silence between arrivals.

``check_db(path, expected)`` asks the coordinator's SQLite file the same
questions by SQL: every (device, seq) stored exactly once, none missing,
``PRAGMA integrity_check`` ok. That is where "exactly once" is decided.

``expected`` maps a device to the seqs it produced: any iterable of ints,
e.g. the ``range(first_seq, next_seq)`` an agent's outbox numbered
(``Fleet.produced()``), or an int n for 1..n (planted data and stand-ins
that number from 1; an agent's outbox numbers from the clock in
microseconds). None means "the lowest .. the highest seq seen", so only
holes count as lost (a lost head or tail needs the real range from the device).
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

Expected = Mapping[str, "int | Iterable[int]"]


@dataclass(frozen=True)
class Arrival:
    """One result message as the receiving end saw it."""

    device: str
    seq: int
    t: float  # time.monotonic() at arrival
    stream: str = ""
    wall: float = 0.0  # time.time() at arrival
    captured_at: float = 0.0  # the device's capture timestamp


@dataclass
class DeliveryReport:
    """What arrived against what was expected."""

    received: int = 0  # messages, duplicates included
    unique: int = 0  # distinct (device, seq)
    lost: dict[str, list[int]] = field(default_factory=dict)
    wire_duplicates: int = 0
    inversions: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # missing (first, last) ranges
    per_device: dict[str, int] = field(default_factory=dict)  # unique seqs per device
    max_silence_s: dict[str, float] = field(default_factory=dict)
    unexpected: int = 0  # (device, seq) outside the expected set

    @property
    def lost_total(self) -> int:
        return sum(len(v) for v in self.lost.values())

    @property
    def inversions_total(self) -> int:
        return sum(self.inversions.values())

    def figures(self) -> dict:
        """Flat numbers for the figures table."""
        return {
            "received": self.received,
            "unique": self.unique,
            "lost": self.lost_total,
            "wire_dups": self.wire_duplicates,
            "inversions": self.inversions_total,
            "max_silence_s": round(max(self.max_silence_s.values(), default=0.0), 3),
        }

    def to_json(self) -> dict:
        data = asdict(self)
        data["lost_total"] = self.lost_total
        data["inversions_total"] = self.inversions_total
        return data


def expected_sets(expected: Expected | None, seen: Mapping[str, set[int]]) -> dict[str, set[int]]:
    """Normalise an ``expected`` spec (see module doc) to a set per device."""
    if expected is None:
        return {dev: set(range(min(seqs), max(seqs) + 1)) for dev, seqs in seen.items() if seqs}
    out: dict[str, set[int]] = {}
    for dev, spec in expected.items():
        out[dev] = set(range(1, spec + 1)) if isinstance(spec, int) else set(spec)
    return out


def ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ints as inclusive (first, last) runs: [1,2,3,7] -> [(1,3),(7,7)]."""
    runs: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def analyse(arrivals: Iterable[Arrival], expected: Expected | None = None) -> DeliveryReport:
    """Account for *arrivals* (in arrival order) against *expected*."""
    report = DeliveryReport()
    seen: dict[str, set[int]] = defaultdict(set)
    highest: dict[str, int] = {}
    last_t: dict[str, float] = {}
    for a in sorted(arrivals, key=lambda a: a.t):
        report.received += 1
        if a.device in last_t:
            gap = a.t - last_t[a.device]
            report.max_silence_s[a.device] = max(report.max_silence_s.get(a.device, 0.0), gap)
        last_t[a.device] = a.t
        if a.seq in seen[a.device]:
            report.wire_duplicates += 1
            continue
        seen[a.device].add(a.seq)
        # An inversion: a new seq arriving after a higher one of the same device.
        if a.seq < highest.get(a.device, 0):
            report.inversions[a.device] = report.inversions.get(a.device, 0) + 1
        highest[a.device] = max(highest.get(a.device, 0), a.seq)
    want = expected_sets(expected, seen)
    for dev in sorted(set(want) | set(seen)):
        got = seen.get(dev, set())
        missing = want.get(dev, set()) - got
        report.per_device[dev] = len(got)
        report.inversions.setdefault(dev, 0)
        report.max_silence_s.setdefault(dev, 0.0)
        if dev in want:
            report.unexpected += len(got - want[dev])
        if missing:
            report.lost[dev] = sorted(missing)
            report.gaps[dev] = ranges(missing)
    report.unique = sum(len(s) for s in seen.values())
    return report


@dataclass
class DbReport:
    """The coordinator's stored results, checked by SQL."""

    rows: int = 0
    duplicates: int = 0  # (device, seq) stored more than once
    lost: dict[str, list[int]] = field(default_factory=dict)
    extra: int = 0  # stored (device, seq) outside the expected set
    per_device: dict[str, int] = field(default_factory=dict)
    integrity: str = ""

    @property
    def lost_total(self) -> int:
        return sum(len(v) for v in self.lost.values())

    def figures(self) -> dict:
        return {"db_rows": self.rows, "db_dups": self.duplicates, "db_lost": self.lost_total,
                "integrity": self.integrity}


def check_db(path: str | Path, expected: Expected | None = None, table: str = "results") -> DbReport:
    """Check the coordinator's results table: exactly once, nothing missing, file intact."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=30)
    try:
        report = DbReport()
        report.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        report.rows = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        report.duplicates = conn.execute(
            f"SELECT COALESCE(SUM(n - 1), 0) FROM (SELECT COUNT(*) AS n FROM {table} GROUP BY device, seq HAVING n > 1)"
        ).fetchone()[0]
        seen: dict[str, set[int]] = defaultdict(set)
        for device, seq in conn.execute(f"SELECT device, seq FROM {table}"):
            seen[device].add(seq)
    finally:
        conn.close()
    want = expected_sets(expected, seen)
    for dev in sorted(set(want) | set(seen)):
        got = seen.get(dev, set())
        report.per_device[dev] = len(got)
        missing = want.get(dev, set()) - got
        if missing:
            report.lost[dev] = sorted(missing)
        if dev in want:
            report.extra += len(got - want[dev])
    return report
