"""The result outbox: a SQLite file that holds every result until the coordinator has it.

A result is committed here (WAL, ``synchronous=FULL``) before it is
published, and deleted only when the coordinator's ``acks`` message says it
committed that sequence number; the broker's PUBACK never deletes anything.
Sequence numbers are per device and never repeat: the counter is stored in
the same transaction as the rows it numbers, so a SIGKILL at any point leaves
either both or neither. A new file numbers from the clock in microseconds
plus a random offset (``clock_seq``), so a file that replaces another (a
re-imaged card, a deleted outbox) numbers above everything the old one did,
or, when the clock was behind, far below it, where the coordinator's refusal
and ``_renumber_above`` take over (docs/protocol.md, delivery rule 8).

The outbox is bounded (rows and payload bytes). When full it drops the
oldest result; results whose deadline passed are expired. Both are counted
(persistently) and reported in telemetry. ``floor`` is the lowest seq still
held: every seq below it was acknowledged or counted as dropped/expired, which
lets the coordinator acknowledge past the gap.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import storage_error

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY,
    stream   TEXT NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    created  REAL NOT NULL,
    deadline REAL,
    floor    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_deadline ON outbox (deadline) WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
COUNTERS = ("next_seq", "acked", "dropped", "expired", "first_seq")
SANE_CLOCK = 1_600_000_000  # 2020-09-13: a clock before this is unset (a device without RTC before NTP)
RANDOM_SPAN = 2**40  # microseconds, about 12.7 days: how far above the clock a new outbox may start


def clock_seq(now: float | None = None) -> int:
    """The first seq of a new outbox: the clock in microseconds plus a random offset below RANDOM_SPAN.

    Above any seq an earlier outbox of this device reached when the clock moved on by more than
    RANDOM_SPAN between their creations. Otherwise (a re-imaged device boots with its image's date
    until NTP sets the clock, so both outboxes were made "at" about the same time) the new range
    lands far above or far below the old one, and only rarely inside it: about one chance in
    RANDOM_SPAN / results the old one made. Far below is what the coordinator refuses and the
    device numbers again (docs/protocol.md, delivery rule 8). A clock before 2020 counts as
    unset: from 1 plus the offset, with a warning.
    """
    import secrets

    now = time.time() if now is None else now
    if now < SANE_CLOCK:
        log.warning("the clock reads %s, before 2020: a new outbox numbers from a random start instead",
                    time.ctime(now))
        return 1 + secrets.randbelow(RANDOM_SPAN)
    return int(now * 1_000_000) + secrets.randbelow(RANDOM_SPAN)


@dataclass(frozen=True)
class Pending:
    """A result waiting for its seq: the payload is built once seq and floor are known."""

    stream: str
    topic: str
    build: Callable[[int, int], bytes]  # (seq, floor) -> payload bytes
    deadline: float | None = None


@dataclass(frozen=True)
class Row:
    """One stored result; ``floor`` is the one its payload carries (0: unknown)."""

    seq: int
    stream: str
    topic: str
    payload: bytes
    created: float
    deadline: float | None
    floor: int = 0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline < now


def _renumbered(payload: bytes, seq: int, floor: int) -> bytes:
    """A stored result's payload with its ``seq`` and ``floor`` replaced."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(body, dict):
        return payload
    body["seq"], body["floor"] = seq, floor
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class Outbox:
    """The outbox file. Thread-safe (one connection behind a lock); all writes are transactions."""

    def __init__(self, path: str | Path, max_rows: int = 100000, max_bytes: int = 64 * 1024 * 1024,
                 first_seq: int | None = None):
        """*first_seq*: where a new file numbers from (default ``clock_seq()``); an existing file keeps its count."""
        self.path = Path(path)
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
            if "floor" not in columns:  # a file from before the column existed
                self._db.execute("ALTER TABLE outbox ADD COLUMN floor INTEGER NOT NULL DEFAULT 0")
            self._tx(self._init_counters, first_seq)
            self._load()
        except (sqlite3.Error, OSError) as exc:
            raise storage_error(f"outbox {self.path}: cannot be opened", self.path, exc) from None

    def _init_counters(self, first_seq: int | None) -> None:
        new = self._db.execute("SELECT 1 FROM counters WHERE name = 'next_seq'").fetchone() is None
        # A file from before first_seq was kept numbered from 1.
        first = (first_seq if first_seq is not None else clock_seq()) if new else 1
        for name in COUNTERS:
            self._db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES (?, ?)",
                             (name, first if name in ("next_seq", "first_seq") else 0))

    def _load(self) -> None:
        counters = dict(self._db.execute("SELECT name, value FROM counters"))
        self.next_seq = counters["next_seq"]
        self.acked = counters["acked"]
        self.dropped = counters["dropped"]
        self.expired = counters["expired"]
        self.first_seq = counters["first_seq"]
        self.renumbered = 0  # times this process numbered the held results again above an ack (_renumber_above)
        # Rows below this seq were committed before this process opened the outbox, on the clock as it was then (a
        # Pi that booted at its last shutdown's date held them from before): a clock step seen now is not theirs.
        self.run_first_seq = self.next_seq
        self.depth, self.bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        low = self._db.execute("SELECT min(seq) FROM outbox").fetchone()[0]
        self._floor = low if low is not None else self.next_seq
        # Highest seq known lost (dropped or expired); what a payload's floor must exceed
        # for the coordinator to acknowledge past the gap. Unknown across restarts: assume
        # everything below the floor, so stored payloads get their floor refreshed once.
        self.lost_upto = self._floor - 1 if self.dropped or self.expired else 0

    # --- reading ---------------------------------------------------------------
    @property
    def floor(self) -> int:
        """The lowest seq still held (``next_seq`` when empty): everything below is acked or counted lost."""
        return self._floor

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Row]:
        """Held results with ``seq > after_seq``, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, stream, topic, payload, created, deadline, floor FROM outbox WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
        return [Row(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    def stats(self) -> dict[str, int]:
        """Depth, bytes, counters: what telemetry reports."""
        return {"depth": self.depth, "bytes": self.bytes, "dropped": self.dropped, "expired": self.expired,
                "acked": self.acked, "next_seq": self.next_seq, "floor": self._floor, "first_seq": self.first_seq}

    # --- writing ---------------------------------------------------------------
    def enqueue(self, items: Sequence[Pending], now: float | None = None) -> list[Row]:
        """Number, build and commit *items* in one transaction; return the rows still held afterwards.

        Returns only after the commit, so a caller may publish what it gets back.
        """
        if not items:
            return []
        now = time.time() if now is None else now
        with self._lock:
            seq = self.next_seq
            floor = self._floor if self.depth else seq
            rows = []
            for item in items:
                rows.append(Row(seq, item.stream, item.topic, item.build(seq, floor), now, item.deadline, floor))
                seq += 1
            size = sum(len(r.payload) for r in rows)
            trim: list[int] = []  # (last seq, rows, bytes) dropped in the same transaction
            self._tx(self._insert_bounded, rows, seq, size, trim)
            self.next_seq = seq
            self.depth += len(rows)
            self.bytes += size
            if not self.depth - len(rows):
                self._floor = rows[0].seq
            dropped = self._dropped(*trim) if trim else 0
        if dropped:
            log.warning("outbox full (%d rows / %d bytes max): dropped the %d oldest result(s), %d in all",
                        self.max_rows, self.max_bytes, dropped, self.dropped)
        return [r for r in rows if r.seq >= self._floor]

    def _insert(self, rows: list[Row], next_seq: int) -> None:
        self._db.executemany(
            "INSERT INTO outbox (seq, stream, topic, payload, created, deadline, floor) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.seq, r.stream, r.topic, r.payload, r.created, r.deadline, r.floor) for r in rows])
        self._db.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (next_seq,))

    def ack(self, seq: int) -> int:
        """The coordinator committed everything up to *seq*: delete it. Returns how many rows went."""
        with self._lock:
            if seq <= self.acked:
                return 0
            if seq >= self.next_seq:
                self._renumber_above(seq)
                return 0
            n, freed = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE seq <= ?", (seq,)).fetchone()
            updates = [("UPDATE counters SET value = ? WHERE name = 'acked'", (seq,))]
            self._tx(self._delete_upto, seq, updates)
            self.acked = seq
            self._removed(n, freed)
            return n

    def _renumber_above(self, ack: int) -> None:
        """An ack above anything numbered here: the coordinator holds results of an older outbox of this device
        numbered above this one (it replaced that one while the clock was behind). It stored none of these:
        it refuses what comes at or below a device's ack unstored. So nothing is deleted: every held result is
        numbered again, in order, from ``ack + 1``, its payload with it (caller holds the lock)."""
        rows = self._db.execute("SELECT seq, stream, topic, payload, created, deadline FROM outbox ORDER BY seq").fetchall()
        first = ack + 1
        shift = first - (rows[0][0] if rows else self.next_seq)
        log.warning("ack %d is above the outbox's next seq %d (it replaced an older outbox while the clock was "
                    "behind?): the %d result(s) held are numbered again from %d", ack, self.next_seq, len(rows), first)
        moved = [(r[0] + shift, r[1], r[2], _renumbered(bytes(r[3]), r[0] + shift, first), r[4], r[5], first)
                 for r in rows]

        def renumber() -> None:
            self._db.execute("DELETE FROM outbox")
            self._db.executemany("INSERT INTO outbox (seq, stream, topic, payload, created, deadline, floor) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", moved)
            self._db.execute("UPDATE counters SET value = ? WHERE name = 'acked'", (ack,))
            self._db.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (self.next_seq + shift,))

        self._tx(renumber)
        self.acked, self.next_seq = ack, self.next_seq + shift
        self.bytes = sum(len(r[3]) for r in moved)
        self._floor = first
        self.lost_upto = ack
        self.renumbered += 1
        self.run_first_seq += shift  # numbered again in order: the same rows are this run's

    def _insert_bounded(self, rows: list[Row], next_seq: int, size: int, trim: list[int]) -> None:
        """Insert *rows* and drop the oldest past the bounds in the same transaction, so no
        reader and no crash ever finds the file over its bound; what went is put in *trim*."""
        self._insert(rows, next_seq)
        depth, total = self.depth + len(rows), self.bytes + size
        if depth <= self.max_rows and total <= self.max_bytes:
            return
        excess_rows, excess_bytes = max(0, depth - self.max_rows), max(0, total - self.max_bytes)
        cut, n, freed = 0, 0, 0
        for seq, length in self._db.execute("SELECT seq, length(payload) FROM outbox ORDER BY seq"):
            if n >= excess_rows and freed >= excess_bytes:
                break
            cut, n, freed = seq, n + 1, freed + length
        self._delete_upto(cut, [("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (n,))])
        trim.extend((cut, n, freed))

    def _dropped(self, cut: int, n: int, freed: int) -> int:
        """Account in memory for the oldest rows dropped by ``enqueue`` (caller holds the lock, after the commit)."""
        self.dropped += n
        self.lost_upto = max(self.lost_upto, cut)
        self._removed(n, freed)
        return n

    def expire(self, now: float | None = None) -> int:
        """Delete results whose deadline passed; count them. Returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, length(payload) FROM outbox WHERE deadline IS NOT NULL AND deadline < ?", (now,)).fetchall()
            if not rows:
                return 0

            def delete() -> None:
                self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(r[0],) for r in rows])
                self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'expired'", (len(rows),))

            self._tx(delete)
            self.expired += len(rows)
            self.lost_upto = max(self.lost_upto, max(r[0] for r in rows))
            self._removed(len(rows), sum(r[1] for r in rows))
        return len(rows)

    def shift_deadlines(self, step: float, from_seq: int = 0) -> int:
        """Move the deadlines of held rows from *from_seq* on by *step* seconds (the wall clock was set by that
        much); how many moved."""
        with self._lock:
            moved = self._db.execute("SELECT count(*) FROM outbox WHERE deadline IS NOT NULL AND seq >= ?",
                                     (from_seq,)).fetchone()[0]
            if moved:
                self._tx(self._db.execute, "UPDATE outbox SET deadline = deadline + ? WHERE deadline IS NOT NULL "
                         "AND seq >= ?", (step, from_seq))
        return moved

    def _delete_upto(self, seq: int, updates: list[tuple[str, tuple]]) -> None:
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
        for sql, params in updates:
            self._db.execute(sql, params)

    def _removed(self, n: int, freed: int) -> None:
        """Account for deleted rows in memory (caller holds the lock, after the commit)."""
        self.depth -= n
        self.bytes -= freed
        low = self._db.execute("SELECT min(seq) FROM outbox").fetchone()[0] if self.depth else None
        self._floor = low if low is not None else self.next_seq

    def _tx(self, fn: Callable, *args) -> None:
        """Run *fn* in one IMMEDIATE transaction: all of it is committed, or none."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            fn(*args)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def integrity_check(self) -> str:
        """SQLite's own verdict on the file ('ok' when sound)."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self, timeout: float = 5.0) -> bool:
        """Close the file (a checkpoint folds the WAL back in), waiting at most *timeout* seconds.

        Every commit is already on disk (synchronous=FULL), so a close that
        cannot have the file in time (another process holds its lock, or a
        write is still waiting for it) leaves the WAL for the next open and
        returns False, rather than holding the agent's exit past its budget.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            log.warning("outbox %s: still in use at close; left for the next start (nothing committed is lost)",
                        self.path)
            return False
        try:
            try:
                wait_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
                self._db.execute(f"PRAGMA busy_timeout={wait_ms}")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("outbox %s: no checkpoint at close (%s); the WAL is folded in at the next start",
                            self.path, exc)
            self._db.close()
            return True
        finally:
            self._lock.release()
