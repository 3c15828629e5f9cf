"""What ``lepton results`` shows: the results the coordinator stored, read from its database.

Read-only (``mode=ro``), like ``lepton status``: it never blocks the running
coordinator. Results are read per device along the (device, seq) primary
key, newest first, so a query costs about ``--limit`` rows per device
however many the database holds; ``--since`` finds its first seq per device
by the binary search retention uses (sequence numbers grow with arrival).
``follow`` returns what was stored after a device's last seq seen.
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
FOLLOW_BATCH = 5000  # rows per device per poll
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


def scope(db: Database, device: str = "", stream: str = "") -> tuple[list[str], str]:
    """(devices to read, stream id) for the filters; ConfigError for a device or stream the database does
    not know, so a typo is not mistaken for a quiet fleet. *stream* may be ``DEVICE/STREAM``."""
    if "/" in stream:
        qualified_device, stream = stream.split("/", 1)
        if device and device != qualified_device:
            raise ConfigError(f"--stream {qualified_device}/{stream} names another device than --device {device}")
        device = qualified_device
    known = _devices(db)
    if device and device not in known:
        raise ConfigError(f"--device {device!r}: no such device in this database"
                          + (f" (devices: {_some(known)})" if known else " (no device has reported yet)"))
    devices = [device] if device else known
    if stream:
        marks = ",".join("?" * len(devices))
        declared = {r["stream"] for r in db.query(f"SELECT stream FROM streams WHERE device IN ({marks})", devices)}
        if stream not in declared and not any(_newest(db, d, stream, 0, 1) for d in devices):
            names = sorted(declared)
            raise ConfigError(f"--stream {stream!r}: no such stream" + (f" on {device}" if device else "")
                              + (f" (streams: {_some(names)})" if names else ""))
    return devices, stream


def _some(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _newest(db: Database, device: str, stream: str, floor: int, limit: int, since: float | None = None) -> list[dict]:
    sql, args = f"SELECT {COLUMNS} FROM results WHERE device = ? AND seq >= ?", [device, floor]
    if stream:
        sql += " AND stream = ?"
        args.append(stream)
    if since is not None:
        sql += " AND received_at >= ?"
        args.append(since)
    return list(db.query(sql + " ORDER BY seq DESC LIMIT ?", args + [limit]))


def newest(db: Database, limit: int = 20, device: str = "", stream: str = "", since: float | None = None) -> list[dict]:
    """The newest *limit* results (oldest first) matching the filters, each as ``result_json`` gives it."""
    devices, stream = scope(db, device, stream)
    rows: list[dict] = []
    for d in devices:
        floor = prune_below(db, d, since) if since is not None else 0
        rows += _newest(db, d, stream, floor, limit, since)
    rows.sort(key=lambda r: (r["received_at"], r["device"], r["seq"]))
    return [result_json(r) for r in rows[-limit:]]


def last_seqs(db: Database, devices: list[str]) -> dict[str, int]:
    """The highest stored seq of each device (0: none yet): where ``follow`` starts."""
    out = {}
    for d in devices:
        row = db.execute("SELECT seq FROM results WHERE device = ? ORDER BY seq DESC LIMIT 1", [d]).fetchone()
        out[d] = int(row[0]) if row else 0
    return out


def follow(db: Database, last: dict[str, int], device: str = "", stream: str = "") -> list[dict]:
    """Results stored since *last* (device -> highest seq seen, updated in place), oldest first. Devices that
    appear later are followed from their first result."""
    devices = [device] if device else _devices(db)
    rows: list[dict] = []
    for d in devices:
        new = list(db.query(f"SELECT {COLUMNS} FROM results WHERE device = ? AND seq > ? ORDER BY seq LIMIT ?",
                            [d, last.get(d, 0), FOLLOW_BATCH]))
        if new:
            last[d] = new[-1]["seq"]
            rows += [r for r in new if not stream or r["stream"] == stream]
    rows.sort(key=lambda r: (r["received_at"], r["device"], r["seq"]))
    return [result_json(r) for r in rows]


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
    if isinstance(top, list) and top and isinstance(top[0], dict) and "score" in top[0]:
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
    lines = [f"{'RECEIVED':<19}  {'DEVICE/STREAM':<28} {'SEQ':>7}  {'MODEL':<16} {'ON':<12} {'INFER':>8} "
             f"{'E2E':>8}  OUTPUT"] if header else []
    for r in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received_at"]))
        model = r.get("model", {}).get("name", "?") if isinstance(r.get("model"), dict) else "?"
        e2e = (r["received_at"] - r["captured_at"]) * 1000.0 if isinstance(r.get("captured_at"), (int, float)) else None
        infer = f"{r['infer_ms']:.1f}ms" if isinstance(r.get("infer_ms"), (int, float)) else "-"
        output = r.get("output") if isinstance(r.get("output"), dict) else {}
        lines.append(f"{stamp:<19}  {r.get('device', '?') + '/' + r.get('stream', '?'):<28} {r.get('seq', 0):>7}  "
                     f"{model:<16} {r.get('computed_on', '?'):<12} {infer:>8} "
                     f"{'-' if e2e is None else f'{e2e:.0f}ms':>8}  {summary(output)}")
    return "\n".join(lines)
