"""What ``lepton results`` shows: the results the coordinator stored, read from its database.

Read-only (``mode=ro``), like ``lepton status``: it never blocks the running
coordinator. Results are read per device along the (device, seq) primary
key, newest first, so a query costs about ``--limit`` rows per device
however many the database holds; ``--since`` finds its first seq per device
by the binary search retention uses (sequence numbers grow with arrival).
A ``Follower`` returns what was stored since it last looked, a result
stored after higher seqs included (ingest stores each device's results in
seq order; a database written before it did may hold such results).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import TYPE_CHECKING

from lepton.coordinator.retention import prune_below
from lepton.errors import ConfigError

if TYPE_CHECKING:
    from sqlite_utils import Database

COLUMNS = "device, seq, stream, model, computed_on, captured_at, infer_ms, received_at, payload"
FOLLOW_BATCH = 5000  # rows per query while following
MAX_HOLES = 10_000  # seqs per device a follower watches for a late arrival
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time (epoch seconds) from a duration back from now (``90s``, ``15m``, ``2h``, ``7d``) or
    an ISO date or date-time (``2026-11-27``, ``2026-11-27T08:00``, local time unless it has an offset)."""
    now = time.time() if now is None else now
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if found:
        return now - float(found.group(1)) * _UNITS[found.group(2)]
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"--since {text!r}: give a duration (90s, 15m, 2h, 7d) or a date or time "
                          "(2026-11-27, 2026-11-27T08:00)") from None


def _devices(db: Database) -> list[str]:
    """Every device that has or had results (the acks table has one row per such device) or a birth."""
    return sorted({r["device"] for r in db.query("SELECT device FROM acks")}
                  | {r["id"] for r in db.query("SELECT id FROM devices")})


def _declaring(db: Database, stream: str, devices: list[str] | None = None) -> list[str]:
    """The devices whose births declared *stream* (of *devices*, when given)."""
    found = sorted(r["device"] for r in db.query("SELECT device FROM streams WHERE stream = ?", [stream]))
    return found if devices is None else [d for d in found if d in devices]


def scope(db: Database, device: str = "", stream: str = "") -> tuple[list[str], str]:
    """(devices to read, stream id) for the filters; ConfigError for a device or stream the database does
    not know, so a typo is not mistaken for a quiet fleet. *stream* may be ``DEVICE/STREAM``; a stream is
    known by the births that declared it (the streams table), so a stream is read only on its devices."""
    given = stream
    if "/" in stream:
        qualified_device, stream = stream.split("/", 1)
        if not qualified_device or not stream or "/" in stream:
            raise ConfigError(f"--stream {given!r}: give STREAM or DEVICE/STREAM")
        if device and device != qualified_device:
            raise ConfigError(f"--stream {given!r} names another device than --device {device!r}")
        device = qualified_device
    known = _devices(db)
    if device and device not in known:
        flag = f"--stream {given!r}" if "/" in given else "--device"
        raise ConfigError(f"{flag}: no device {device!r} in this database"
                          + (f" (devices: {_some(known)})" if known else " (no device has reported yet)"))
    devices = [device] if device else known
    if stream:
        on = _declaring(db, stream, devices)
        if not on:
            marks = ",".join("?" * len(devices))
            names = sorted({r["stream"] for r in db.query(
                f"SELECT stream FROM streams WHERE device IN ({marks})", devices)}) if devices else []
            raise ConfigError(f"--stream {given!r}: no such stream" + (f" on {device}" if device else "")
                              + (f" (streams: {_some(names)})" if names else ""))
        devices = on
    return devices, stream


def _some(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def newest(db: Database, devices: list[str], stream: str = "", limit: int = 20, since: float | None = None,
           upto: dict[str, int] | None = None) -> list[dict]:
    """The newest *limit* results of *devices* (oldest first), each as ``result_json`` gives it.

    Newest by each device's seq, which is the order ingest stores its results in (a result above a gap waits
    for the gap to fill). *since* finds each
    device's first seq as retention does, on the same assumption. *upto*: per device, no seq above it.
    """
    rows: list[dict] = []
    for d in devices:
        floor = prune_below(db, d, since) if since is not None else 0
        sql, args = f"SELECT {COLUMNS} FROM results WHERE device = ? AND seq >= ?", [d, floor]
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto.get(d, 0))
        if stream:
            sql += " AND stream = ?"
            args.append(stream)
        if since is not None:
            sql += " AND received_at >= ?"
            args.append(since)
        rows += db.query(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])
    rows.sort(key=lambda r: (r["received_at"], r["device"], r["seq"]))
    return [result_json(r) for r in rows[-limit:]]


class Follower:
    """What was stored since the last look, each result once, a result stored late included.

    Per device it keeps the highest seq seen and the *holes*: seqs below it not stored when last
    looked and not yet covered by the device's ack. A hole is filled when that result is stored after
    higher seqs (in a database from before ingest held results above a gap); once the ack passes it,
    it is filled or never will be (the
    device dropped it), so holes stay few. Devices that appear later are followed from their first
    result. ``hi`` is the snapshot taken at creation: list what came before with ``newest(upto=hi)``.
    """

    def __init__(self, db: Database, device: str = "", stream: str = "") -> None:
        self.db, self.device, self.stream = db, device, stream
        self.hi: dict[str, int] = {}
        self.holes: dict[str, set[int]] = {}
        acks = self._acks()
        for d in self._devices():
            row = db.execute("SELECT seq FROM results WHERE device = ? ORDER BY seq DESC LIMIT 1", [d]).fetchone()
            self.hi[d] = hi = int(row[0]) if row else 0
            low = max(acks.get(d, 0), hi - MAX_HOLES)
            stored = {r[0] for r in db.execute("SELECT seq FROM results WHERE device = ? AND seq > ? AND seq <= ?",
                                               [d, low, hi]).fetchall()}
            self.holes[d] = set(range(low + 1, hi + 1)) - stored

    def _devices(self) -> list[str]:
        if self.device:
            return [self.device]
        return _declaring(self.db, self.stream) if self.stream else _devices(self.db)

    def _acks(self) -> dict[str, int]:
        return {r["device"]: r["seq"] for r in self.db.query("SELECT device, seq FROM acks")}

    def poll(self) -> list[dict]:
        """Results stored since the last poll (or creation), oldest first."""
        acks = self._acks()  # before the reads: every seq at or below a device's ack is stored by then, or never
        rows: list[dict] = []
        for d in self._devices():
            rows += self._device(d, acks.get(d, 0))
        if self.stream:
            rows = [r for r in rows if r["stream"] == self.stream]
        rows.sort(key=lambda r: (r["received_at"], r["device"], r["seq"]))
        return [result_json(r) for r in rows]

    def _device(self, d: str, ack: int) -> list[dict]:
        holes, hi = self.holes.setdefault(d, set()), self.hi.get(d, 0)
        found: list[dict] = []
        wanted = sorted(holes)
        for i in range(0, len(wanted), 500):  # filled holes: results stored late
            chunk = wanted[i:i + 500]
            found += self.db.query(f"SELECT {COLUMNS} FROM results WHERE device = ? AND seq IN "
                                   f"({','.join('?' * len(chunk))})", [d, *chunk])
        holes.difference_update(r["seq"] for r in found)
        while True:  # new results, in pages
            page = list(self.db.query(f"SELECT {COLUMNS} FROM results WHERE device = ? AND seq > ? "
                                      "ORDER BY seq LIMIT ?", [d, hi, FOLLOW_BATCH]))
            for r in page:
                if r["seq"] > hi + 1:  # a gap: but nothing below the result's floor is coming (acked or dropped;
                    # a new device, or a replaced outbox, starts far above anything before it)
                    low = max(hi + 1, _floor(r), r["seq"] - MAX_HOLES)
                    holes.update(range(low, r["seq"]))
                hi = r["seq"]
            found += page
            if len(page) < FOLLOW_BATCH:
                break
        self.hi[d] = hi
        kept = sorted(s for s in holes if s > ack)[-MAX_HOLES:]
        self.holes[d] = set(kept)
        return found


def _floor(row: dict) -> int:
    """The ``floor`` the stored result carries (1 when it cannot be read)."""
    try:
        floor = json.loads(row["payload"]).get("floor", 1)
    except (ValueError, AttributeError):
        return 1
    return floor if isinstance(floor, int) else 1


def result_json(row: dict) -> dict:
    """The result as its device sent it, with ``received_at`` (when the coordinator stored it)."""
    try:
        payload = json.loads(row["payload"])
    except ValueError:  # stored as received: not expected to fail, but a view must not
        payload = {"device": row["device"], "seq": row["seq"], "stream": row["stream"], "payload": row["payload"]}
    return {"received_at": row["received_at"], **payload}


def summary(output: dict, width: int = 60) -> str:
    """One short phrase for a result's output: the top class and its score, an anomaly verdict, else
    the output's JSON (without the frame's source data), cut to *width*."""
    top = output.get("top")
    if isinstance(top, list) and top and isinstance(top[0], dict) and isinstance(top[0].get("score"), (int, float)):
        best = top[0]
        return f"{best.get('label', best.get('index', '?'))} ({float(best['score']):.3f})"
    if isinstance(output.get("anomaly"), bool):
        score = output.get("score")
        verdict = "ANOMALY" if output["anomaly"] else "normal"
        return f"{verdict} (score {float(score):.3f})" if isinstance(score, (int, float)) else verdict
    text = json.dumps({k: v for k, v in output.items() if k != "source"}, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def render_results(rows: list[dict], header: bool = True) -> str:
    """One line per result: when it was stored, where from, which model on which device, how long it took
    (invoke, and capture to storage), and what it found."""
    lines = [f"{'RECEIVED':<19}  {'DEVICE/STREAM':<28} {'SEQ':>16}  {'MODEL':<24} {'ON':<12} {'INFER':>8} "
             f"{'E2E':>8}  OUTPUT"] if header else []
    for r in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received_at"]))
        spec = r.get("model") if isinstance(r.get("model"), dict) else {}
        model = f"{spec.get('name', '?')}@{spec.get('version', '?')}"
        e2e = (r["received_at"] - r["captured_at"]) * 1000.0 if isinstance(r.get("captured_at"), (int, float)) else None
        infer = f"{r['infer_ms']:.1f}ms" if isinstance(r.get("infer_ms"), (int, float)) else "-"
        output = r.get("output") if isinstance(r.get("output"), dict) else {}
        lines.append(f"{stamp:<19}  {r.get('device', '?') + '/' + r.get('stream', '?'):<28} {r.get('seq', 0):>16}  "
                     f"{model:<24} {r.get('computed_on', '?'):<12} {infer:>8} "
                     f"{'-' if e2e is None else f'{e2e:.0f}ms':>8}  {summary(output)}")
    return "\n".join(lines)
