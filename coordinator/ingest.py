"""Exactly-once ingest: the one thread that writes what devices send.

paho's callbacks only enqueue (``submit``). This thread takes whatever has
queued (up to ``batch_max``), validates it, and commits it in ONE transaction:
results with ``INSERT ... ON CONFLICT (device, seq) DO NOTHING`` (a re-sent
result is stored once), status, telemetry and reported placement through the
fleet registry, and the new per-device ack. Only after the commit does it
PUBACK the MQTT messages (paho ``manual_ack``) and publish the highest
contiguous committed seq on each device's ``acks`` topic. A crash before the
commit loses nothing: the broker re-delivers what was never PUBACKed and the
device re-sends what was never acked.

Each device's results are stored in seq order. A result above a gap in its
device's seqs (a broker that dropped part of its queue at a restart lets
higher seqs through before the device re-sends the missing ones) is PUBACKed
but held in memory, unstored and unacknowledged, until the gap fills (the
re-send) or the device's ``floor`` passes it (it dropped or expired those
seqs); then it is stored after them. Held results are bounded (HOLD_MAX_ROWS
per device, HOLD_MAX_BYTES in all): past the bounds, once HOLD_MAX_S passed
with none of a device's released (whether messages arrive or not), or at a
stop, they are stored out of order rather than not at all. Held results lost with the process (a crash) are still in their
device's outbox, which re-sends what it has not had acked (but for a result
whose deadline passes meanwhile: expired, and counted so by the device).

An invalid payload is logged with device, topic and reason, PUBACKed (so the
broker does not re-deliver it forever) and changes nothing.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lepton.coordinator.acks import AckTracker
from lepton.coordinator.db import open_db, write_tx
from lepton.coordinator.registry import Change, FleetRegistry
from lepton.errors import ProtocolError
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

INSERT_RESULT = (
    "INSERT INTO results (device, seq, stream, model, computed_on, captured_at, infer_ms, received_at, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING"
)
HOLD_MAX_ROWS = 10_000  # per device (an agent has at most its ack_window, 200 by default, on the wire)
HOLD_MAX_BYTES = 64 << 20  # all devices together
HOLD_MAX_S = 120.0  # a device's held results waited this long with no gap filled: stored (out of order)
ROW_BYTES = 300  # what a held row costs in memory beside its payload
HOLD_LOG_S = 60.0  # a device's "held above a gap" line, at most this often

SAVE_ACK = (
    "INSERT INTO acks (device, seq) VALUES (?, ?) "
    "ON CONFLICT (device) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > acks.seq"
)


@dataclass(frozen=True)
class Inbound:
    """One received MQTT message, as paho's callback hands it over."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    conn: int = 0  # connection generation it arrived on: a PUBACK only makes sense on the same one


class Sink(Protocol):
    """Where ingest sends its acknowledgements (the coordinator's MQTT client)."""

    def puback(self, mid: int, qos: int, conn: int) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None: ...


@dataclass
class _Batch:
    rows: list[tuple]
    floors: dict[str, int]  # device -> highest floor seen in this batch
    seqs: dict[str, list[int]]
    changes: list[Change]


class Ingest:
    """Validates, stores and acknowledges in batches; owns its database connection."""

    def __init__(
        self,
        db_path: str,
        topics: Topics,
        sink: Sink,
        on_changes: Callable[[list[Change]], None] = lambda changes: None,
        synchronous: str = "FULL",
        batch_max: int = 2000,
        metrics=None,
    ):
        self.db_path, self.topics, self.sink = db_path, topics, sink
        self.on_changes, self.synchronous, self.batch_max = on_changes, synchronous, batch_max
        self.metrics = metrics
        self.failing = False  # the last commit failed (e.g. a full disk): telemetry is not being stored
        self._below_logged: dict[str, float] = {}  # device -> when results below its ack were last logged
        self._held: dict[str, dict[int, tuple]] = {}  # device -> seq -> result row, above a gap in its seqs
        self._held_at: dict[str, float] = {}  # device -> monotonic time since its held results wait for one gap
        self._held_bytes = 0  # their payloads and ROW_BYTES each
        self._held_count = 0
        self._held_logged: dict[str, float] = {}
        self.queue: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.tracker = AckTracker()
        self.committed = 0  # results newly stored since start (duplicates excluded)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- paho side ------------------------------------------------------------
    def submit(self, item: Inbound) -> None:
        """Hand one message to the ingest thread (safe from any thread, never blocks)."""
        self.queue.put(item)

    def depth(self) -> int:
        return self.queue.qsize()

    # --- lifecycle --------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        """Open the database in the ingest thread and start consuming; raises if the database fails."""
        self._thread = threading.Thread(target=self._run, args=(stop,), name="ingest", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error

    def join(self, timeout: float = 30.0) -> None:
        if self._thread:
            self._thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        try:
            self.db = open_db(self.db_path, self.synchronous)
            self.registry = FleetRegistry(self.db)
            self._load_acks()
        except BaseException as exc:  # handed to start(): the daemon must not run without its database
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not stop.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._held_at and min(self._held_at.values()) < time.monotonic() - HOLD_MAX_S:
                    self._commit([], stop)  # nothing arrives: store what waited too long all the same
                continue
            self._commit(self._drain(first), stop)
        while not self.queue.empty():  # what arrived before the stop is still committed and acked
            self._commit(self._drain(self.queue.get()), stop)
        self._flush_held()
        self.db.close()

    def _drain(self, first: Inbound) -> list[Inbound]:
        batch = [first]
        try:
            while len(batch) < self.batch_max:
                batch.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _load_acks(self) -> None:
        for row in list(self.db.query("SELECT device, seq FROM acks")):
            above = [r["seq"] for r in self.db.query(
                "SELECT seq FROM results WHERE device = ? AND seq > ?", [row["device"], row["seq"]])]
            self.tracker.load(row["device"], row["seq"], above)

    # --- the batch ------------------------------------------------------------------
    def _commit(self, items: list[Inbound], stop: threading.Event) -> None:
        """Store a batch in one transaction; retry (never PUBACK) while the database refuses."""
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                batch, acks, new_rows = self._write(items)
                if self.failing:
                    log.info("ingest commits work again")
                self.failing = False
                break
            except sqlite3.Error as exc:
                self.failing = True
                log.error("ingest commit of %d messages failed, retrying in %.1f s: %s", len(items), delay, exc)
                self._reload({self._device_of(i) for i in items} | set(self._held_at))
                if stop.wait(delay):
                    return  # not PUBACKed: the broker re-delivers to the next run
                delay = min(delay * 2, 5.0)
            except Exception:  # a message the checks let through that the database cannot take
                self._reload({self._device_of(i) for i in items} | set(self._held_at))
                if len(items) > 1:  # find it: the others are stored, one at a time
                    for item in items:
                        self._commit([item], stop)
                    return
                log.exception("refusing the payload on %s: it cannot be stored", items[0].topic)
                if self.metrics:
                    self.metrics.invalid.labels(kind=_kind(items[0].topic, self.topics)).inc()
                if items[0].qos:  # PUBACKed, so the broker does not re-deliver it forever; nothing changed
                    self.sink.puback(items[0].mid, items[0].qos, items[0].conn)
                return
        if self.metrics:
            self.metrics.results_held.set(self.held())
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.results_stored.inc(new_rows)
            self.metrics.results_duplicate.inc(len(batch.rows) - new_rows)
        self.committed += new_rows
        for item in items:
            if item.qos:
                self.sink.puback(item.mid, item.qos, item.conn)
        for device, seq in acks.items():
            self.sink.publish(self.topics.acks(device), encode(m.Ack(device=device, seq=seq)), 1)
        if batch.changes:
            self.on_changes(batch.changes)

    def _write(self, items: list[Inbound]) -> tuple[_Batch, dict[str, int], int]:
        now = time.time()
        batch = _Batch([], {}, {}, [])
        with write_tx(self.db):
            for item in items:
                self._one(item, batch, now)
            self._refuse_below_acks(batch)
            held = self._in_order(batch, now)
            cur = self.db.conn.executemany(INSERT_RESULT, batch.rows)
            new_rows = max(cur.rowcount, 0)
            acks = {d: self.tracker.committed(d, seqs, batch.floors[d]) for d, seqs in batch.seqs.items()}
            self.db.conn.executemany(SAVE_ACK, list(acks.items()))
        self._hold(held)
        return batch, acks, new_rows

    def held(self) -> int:
        """Results received above a gap in their device's seqs, waiting for it to fill."""
        return self._held_count

    def _in_order(self, batch: _Batch, now: float) -> dict[str, tuple[dict[int, tuple], list[int]]]:
        """Store each device's results in seq order: hold those above a gap, release those it no longer blocks.

        A device's results up to the ack this batch gives it (contiguous from its ack or floor - 1 over what is
        stored, this batch and the held results) are stored now, the released ones with this batch's time; the
        rest are to be held. Past the bounds a result is stored as it comes (its order broken, nothing dropped),
        and a device's held results are stored once none was released for HOLD_MAX_S (the gap may never
        fill). ``batch.rows`` and ``batch.seqs`` become what is stored (all the ack may count). Returns, per
        device, the results to hold and the held seqs stored: ``_hold`` applies them once the batch is
        committed, so a failed commit changes nothing here.
        """
        cutoff = time.monotonic() - HOLD_MAX_S
        split: dict[str, float] = {}  # device -> highest seq stored now (inf: every held one, held too long)
        for device, seqs in batch.seqs.items():
            held = self._held.get(device)
            top = self.tracker.frontier(device, batch.floors[device], [*seqs, *(held or ())])
            if held or (seqs and max(seqs) > top):
                split[device] = top
        for device in [d for d, at in self._held_at.items() if at < cutoff]:
            log.warning("device %s: storing %d result(s) held above a gap for %.0f s (the gap may never fill)",
                        device, len(self._held.get(device, ())), HOLD_MAX_S)
            split[device] = float("inf")
            batch.seqs.setdefault(device, [])
            batch.floors.setdefault(device, 1)
        if not split:
            return {}
        changes: dict[str, tuple[dict[int, tuple], list[int]]] = {d: ({}, []) for d in split}
        stored: dict[str, list[int]] = {d: [] for d in split}
        room_rows = HOLD_MAX_ROWS
        room_bytes = HOLD_MAX_BYTES - self._held_bytes
        rows: list[tuple] = []
        for row in batch.rows:
            device, seq = row[0], row[1]
            top = split.get(device)
            if top is not None:
                if seq > top:
                    hold = changes[device][0]
                    if seq in hold or seq in self._held.get(device, ()):
                        continue  # a re-send of one held already
                    size = len(row[8]) + ROW_BYTES
                    if len(self._held.get(device, ())) + len(hold) < room_rows and size <= room_bytes:
                        hold[seq] = row
                        room_bytes -= size
                        continue
                stored[device].append(seq)  # at or below the ack, or past the bounds: stored now
            rows.append(row)
        for device, top in split.items():
            held = self._held.get(device, {})
            ready = sorted(seq for seq in held if seq <= top)
            changes[device][1].extend(ready)
            in_batch = set(stored[device])  # a re-send of a held one is stored from the batch, once
            ready = [seq for seq in ready if seq not in in_batch]
            rows += [(*held[seq][:7], now, held[seq][8]) for seq in ready]
            batch.seqs[device] = stored[device] + ready
        rows.sort(key=lambda row: (row[0], row[1]))  # each device's in seq order
        batch.rows = rows
        return changes

    def _hold(self, changes: dict[str, tuple[dict[int, tuple], list[int]]]) -> None:
        """Apply ``_in_order``'s changes after the commit: keep the new held results, forget the stored ones."""
        now = time.monotonic()
        for device, (hold, stored) in changes.items():
            held = self._held.setdefault(device, {})
            for seq in stored:
                row = held.pop(seq)
                self._held_bytes -= len(row[8]) + ROW_BYTES
            for seq, row in hold.items():
                held[seq] = row
                self._held_bytes += len(row[8]) + ROW_BYTES
            self._held_count += len(hold) - len(stored)
            if not held:
                del self._held[device]
                self._held_at.pop(device, None)
                continue
            if stored or device not in self._held_at:  # waiting for another gap: timed from now
                self._held_at[device] = now
            if hold and now - self._held_logged.get(device, float("-inf")) >= HOLD_LOG_S:
                self._held_logged[device] = now
                log.warning("device %s: %d result(s) from seq %d held until the seqs below them arrive (a broker "
                            "dropped them? the device re-sends what it has not had acked): results are stored in "
                            "seq order", device, len(held), min(held))

    def _flush_held(self) -> None:
        """At a stop: store what is held, out of order rather than not at all (a result past its deadline is not
        sent again)."""
        if not self._held:
            return
        rows = [row for held in self._held.values() for row in held.values()]
        try:
            with write_tx(self.db):
                self.db.conn.executemany(INSERT_RESULT, rows)
        except sqlite3.Error as exc:
            log.warning("could not store the %d result(s) held above a gap at the stop (their devices re-send "
                        "them): %s", len(rows), exc)
            return
        log.info("stored %d result(s) held above a gap at the stop", len(rows))
        self._held.clear()
        self._held_at.clear()
        self._held_bytes = self._held_count = 0

    def _refuse_below_acks(self, batch: _Batch) -> None:
        """Results at or below their device's ack whose seq is not stored are not stored now either.

        Everything at or below an ack was stored or dropped by the device, so such a result comes from an
        outbox that replaced the device's older one and numbers below (or, rarely, among) its results: a
        re-imaged device's clock is behind until NTP sets it. Stored, it would be acked with the older
        results and deleted unsent. Refused, the device is acked up to the highest seq stored for it, which
        is above anything the new outbox numbered, and the device numbers what it holds again above that
        (``Outbox._renumber_above``) and sends it once more. A re-send of a seq stored already is acked as
        before. Results held above a gap count as stored: they are stored with this batch (``_in_order``).
        """
        for device, seqs in list(batch.seqs.items()):
            acked = self.tracker.acked.get(device, 0)
            low = sorted({s for s in seqs if s <= acked})
            if not low:
                continue
            stored: set[int] = set()
            for i in range(0, len(low), 500):
                chunk = low[i:i + 500]
                stored.update(r[0] for r in self.db.execute(
                    f"SELECT seq FROM results WHERE device = ? AND seq IN ({','.join('?' * len(chunk))})",
                    [device, *chunk]))
            # A stored seq is taken for a re-send, whatever its payload says now: a device may build a re-sent
            # result again (this one's agent does not), and a wrong "not a re-send" here would ack its gaps.
            refused = set(low) - stored
            if not refused:
                continue  # re-sends of results already stored: acked again below
            batch.rows = [r for r in batch.rows if r[0] != device or r[1] not in refused]
            batch.seqs[device] = [s for s in seqs if s not in refused]
            top = max(self.db.execute("SELECT max(seq) FROM results WHERE device = ?", [device]).fetchone()[0] or acked,
                      max(self._held.get(device, ()), default=0))
            self.tracker.forget(device)  # acked up to what is stored, gaps of the older outbox included
            self.tracker.acked[device] = max(acked, top)
            now = time.monotonic()
            if now - self._below_logged.get(device, float("-inf")) >= 60.0:
                self._below_logged[device] = now
                log.warning("device %s sent %d result(s) numbered at or below its ack %d (seq %d..%d) that are not "
                            "stored: its outbox numbers below or among an older one's results (replaced while its "
                            "clock was behind?), or it re-sends results stored and pruned since (it missed its acks "
                            "for longer than db.keep_results_days); refused, and acked up to %d so that it numbers "
                            "them again above", device, len(refused), acked, min(refused), max(refused),
                            max(acked, top))

    def _one(self, item: Inbound, batch: _Batch, now: float) -> None:
        parsed = None
        try:
            parsed = self.topics.parse(item.topic)
            msg = decode(parsed.kind, item.payload)
            _check_ids(parsed, msg)
        except ProtocolError as exc:
            log.warning("invalid payload from device %s on %s: %s", parsed.device if parsed else "?", item.topic, exc)
            if self.metrics:
                self.metrics.invalid.labels(kind=_kind(item.topic, self.topics)).inc()
            return
        if isinstance(msg, m.Result):
            batch.rows.append((msg.device, msg.seq, msg.stream, msg.model.name, msg.computed_on, msg.captured_at,
                               msg.infer_ms, now, bytes(item.payload).decode(errors="replace")))
            batch.seqs.setdefault(msg.device, []).append(msg.seq)
            batch.floors[msg.device] = max(batch.floors.get(msg.device, 1), msg.floor)
            return
        apply = {"status": self.registry.apply_status, "telemetry": self.registry.apply_telemetry,
                 "reported": self.registry.apply_reported}[parsed.kind]
        try:
            with self.db.atomic():  # a savepoint: one bad message cannot take the batch down
                batch.changes += apply(msg, now)
        except sqlite3.OperationalError:
            raise  # the database itself is unwell: retry the whole batch
        except Exception:
            log.exception("could not store %s from device %s on %s", parsed.kind, parsed.device, item.topic)

    def _device_of(self, item: Inbound) -> str:
        try:
            return self.topics.parse(item.topic).device
        except ProtocolError:
            return ""

    def _reload(self, devices: set[str]) -> None:
        """After a failed commit, forget in-memory ack progress that never reached the disk."""
        for device in devices:
            if not device:
                continue
            self.tracker.forget(device)
            rows = list(self.db.query("SELECT seq FROM acks WHERE device = ?", [device]))
            if rows:
                above = [r["seq"] for r in self.db.query(
                    "SELECT seq FROM results WHERE device = ? AND seq > ?", [device, rows[0]["seq"]])]
                self.tracker.load(device, rows[0]["seq"], above)


def _check_ids(parsed, msg) -> None:
    """The topic is what the broker's ACL vouches for: the payload must agree with it."""
    if parsed.kind not in ("status", "telemetry", "reported", "results"):
        raise ProtocolError(f"the coordinator does not take {parsed.kind} messages")
    if msg.device != parsed.device:
        raise ProtocolError(f"payload device {msg.device!r} differs from topic device {parsed.device!r}")
    if parsed.kind == "results" and msg.stream != parsed.stream:
        raise ProtocolError(f"payload stream {msg.stream!r} differs from topic stream {parsed.stream!r}")


def _kind(topic: str, topics: Topics) -> str:
    try:
        return topics.parse(topic).kind
    except ProtocolError:
        return "unknown"
