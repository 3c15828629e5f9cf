"""What ``lepton status`` and ``lepton events`` show, read from the fleet database.

Read-only: these open the database in ``mode=ro`` and never block the
running coordinator.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from lepton.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports EVENT_KINDS at every start: keep sqlite_utils out of that
    from sqlite_utils import Database

CLOCK_OFF_S = 60.0  # a device clock this far from the coordinator's is shown in `lepton status`
SOURCE_SILENT_S = 30.0  # a source open this long without a frame is shown in `lepton status`

# Every kind of event the coordinator records (``FleetRegistry.event``), for ``lepton events --kind``.
EVENT_KINDS = (
    "coordinator-start", "models-reloaded",
    "device-new", "device-online", "device-capabilities", "device-offline", "device-stale",
    "streams", "degraded", "recovered", "model-failed",
    "placement", "stream-skipped", "unserved", "plan-failed", "clock-step", "source-down", "source-up",
)


def fleet_status(db: Database, now: float | None = None) -> dict:
    """Devices (liveness, load, placement, outbox depth, acks) and the last plan, as plain JSON."""
    now = now or time.time()
    placements = {r["device"]: r for r in db.query("SELECT * FROM placement")}
    acks = {r["device"]: r["seq"] for r in db.query("SELECT device, seq FROM acks")}
    streams: dict[str, list[str]] = {}
    for r in db.query("SELECT device, stream, model, coalesce(measured_hz, rate_hz) AS hz FROM streams "
                      "ORDER BY device, stream"):  # the rate telemetry measures, else the birth's
        streams.setdefault(r["device"], []).append(f"{r['stream']}:{r['model']}@{r['hz']:.3g}Hz")
    devices = []
    for d in db.query("SELECT * FROM devices ORDER BY id"):
        p = placements.get(d["id"], {})
        desired = json.loads(p["desired"]) if p.get("desired") else {}
        reported = json.loads(p["reported"]) if p.get("reported") else {}
        seen = max(d["status_at"] or 0, d["telemetry_at"] or 0)
        telemetry = json.loads(d["telemetry"]) if d.get("telemetry") else {}
        devices.append({
            "id": d["id"], "agent_version": d["agent_version"] or "", "liveness": d["liveness"], "degraded": bool(d["degraded"]),
            "degraded_reason": d["degraded_reason"], "reason": d["reason"] if d["liveness"] == "offline" else "",
            "last_seen_s": round(now - seen, 1) if seen else None,
            # the device's clock minus this one's, from its newest telemetry (+ the time it took to arrive)
            "clock_offset_s": round(telemetry["ts"] - d["telemetry_at"], 1) if telemetry.get("ts") and d["telemetry_at"] else None,
            "load1": d["load1"], "cpu_percent": d["cpu_percent"], "outbox_depth": d["outbox_depth"],
            "acked_seq": acks.get(d["id"], 0),
            "sources": telemetry.get("sources") or {},  # per source: connected, frames, reconnects, last frame
            "streams": streams.get(d["id"], []),
            "desired_generation": p.get("desired_gen"), "reported_generation": p.get("reported_gen"),
            "desired_models": [mr["name"] for mr in desired.get("models", [])],
            "desired_versions": {mr["name"]: mr.get("version", "") for mr in desired.get("models", [])},
            "routes": {s: [f"{r['device']}:{r['share']:.2f}" for r in rs] for s, rs in desired.get("routes", {}).items()},
            "serve": {origin: sorted(ids) for origin, ids in desired.get("serve", {}).items()},  # others' streams
            "reported_models": {k: v.get("state") for k, v in reported.get("models", {}).items()},
            "reported_versions": {k: v.get("version", "") for k, v in reported.get("models", {}).items()},
        })
    return {"devices": devices, "last_plan": last_plan(db, now)}


def last_plan(db: Database, now: float) -> dict | None:
    rows = plans(db, 1)
    if not rows:
        return None
    r = rows[0]
    r["age_s"] = round(now - r["ts"], 1)
    return r


def plans(db: Database, limit: int = 20) -> list[dict]:
    """The newest recorded plans (oldest first): id, when, what set each off, how it was solved, how many
    devices' placements it changed, what it left unserved. The coordinator keeps the last 200."""
    rows = list(db.query("SELECT id, ts, trigger, status, path, objective, gap, solve_s, changed, plan FROM plans "
                         "ORDER BY id DESC LIMIT ?", [limit]))
    for r in rows:
        try:
            plan = json.loads(r.pop("plan") or "{}")
        except ValueError:
            plan = {}
        r["unserved"] = {k: v for k, v in (plan.get("unserved") or {}).items() if v and v > 1e-4}
    return rows[::-1]


def render_plans(rows: list[dict]) -> str:
    cols = ("PLAN", "WHEN", "TRIGGER", "STATUS", "PATH", "OBJECTIVE", "GAP", "SOLVE", "CHANGED", "UNSERVED")
    out = []
    for p in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["ts"]))
        objective = "-" if p["objective"] is None else f"{p['objective']:.4g} ms"
        gap = "-" if p["gap"] is None else f"{p['gap']:.2%}"
        solve = "-" if p["solve_s"] is None else f"{p['solve_s']:.3f}s"
        unserved = ", ".join(f"{k} {v:.0%}" for k, v in p["unserved"].items()) or "-"
        trigger = p["trigger"] if len(p["trigger"]) <= 48 else p["trigger"][:45] + "..."
        out.append((f"#{p['id']}", stamp, trigger, p["status"] or "-", p["path"] or "-", objective, gap, solve,
                    str(p["changed"]), unserved))
    return _table(cols, out) if out else "no plan yet"


def events(db: Database, limit: int = 50, device: str = "", kind: str = "") -> list[dict]:
    """The newest events (oldest first), optionally for one device or kind (ConfigError for a kind that
    does not exist, so a typo is not mistaken for a quiet fleet)."""
    where, args = [], []
    if device:
        known = {r["id"] for r in db.query("SELECT id FROM devices")} | {
            r["device"] for r in db.query("SELECT DISTINCT device FROM events WHERE device != ''")}
        if device not in known:  # a typo must not read as a quiet device
            names = sorted(known)
            listed = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise ConfigError(f"--device {device!r}: no such device in this database"
                              + (f" (devices: {listed})" if names else " (no device has reported yet)"))
        where.append("device = ?")
        args.append(device)
    if kind:
        known = set(EVENT_KINDS) | {r["kind"] for r in db.query("SELECT DISTINCT kind FROM events")}
        if kind not in known:
            raise ConfigError(f"--kind {kind!r}: no such event kind (kinds: {', '.join(EVENT_KINDS)})")
        where.append("kind = ?")
        args.append(kind)
    sql = "SELECT id, ts, kind, device, detail FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = list(db.query(sql + " ORDER BY id DESC LIMIT ?", args + [limit]))
    return rows[::-1]


def render_status(status: dict) -> str:
    """A plain-text table for terminals."""
    cols = ("DEVICE", "AGENT", "LIVENESS", "SEEN", "LOAD", "OUTBOX", "ACKED", "GEN d/r", "MODELS", "STREAMS -> SERVED ON")
    rows = []
    for d in status["devices"]:
        live = d["liveness"] + (" degraded" if d["degraded"] else "")
        offset = d.get("clock_offset_s")
        if offset is not None and abs(offset) >= CLOCK_OFF_S:  # its results' capture times are off by as much
            live += f" clock {_duration(offset)}"
        if d["liveness"] != "offline":
            live += "".join(f" {problem}" for problem in _source_problems(d.get("sources") or {}))
        seen = "-" if d["last_seen_s"] is None else f"{d['last_seen_s']:.0f}s"
        models = _models_cell(d)
        routes = " ".join(f"{s}->{'|'.join(r) or 'unserved'}" for s, r in d["routes"].items()) or ",".join(d["streams"]) or "-"
        serving = [f"{origin}/{sid}" for origin, ids in (d.get("serve") or {}).items() for sid in ids]
        if serving:
            routes = (f"{routes}; " if routes != "-" else "") + "serves " + ",".join(serving)
        gen = f"{d['desired_generation'] if d['desired_generation'] is not None else '-'}/" \
              f"{d['reported_generation'] if d['reported_generation'] not in (None, -1) else '-'}"
        load = "-" if d["load1"] is None else f"{d['load1']:.2f}"
        outbox = "-" if d["outbox_depth"] is None else str(d["outbox_depth"])
        rows.append((d["id"], d["agent_version"] or "-", live, seen, load, outbox, str(d["acked_seq"]), gen, models,
                     routes))
    lines = [_table(cols, rows) if rows else "no devices yet"]
    p = status["last_plan"]
    if p:
        gap = "" if p["gap"] is None else f", gap {p['gap']:.3%}"
        lines.append(f"\nlast plan #{p['id']} {p['age_s']:.0f}s ago ({p['trigger']}): {p['status']} via {p['path']}, "
                     f"objective {p['objective']:.4g} ms{gap}, {p['solve_s']:.3f}s, {p['changed']} device(s) changed")
        if p["unserved"]:
            lines.append("unserved: " + ", ".join(f"{k} {v:.0%}" for k, v in p["unserved"].items()))
    else:
        lines.append("\nno plan yet")
    return "\n".join(lines)


def _source_problems(sources: dict) -> list[str]:
    """What a device's telemetry says is wrong with its sources: closed, or open with no frame for a while."""
    out = []
    for sid, h in sorted(sources.items()):
        last = h.get("last_frame_s")
        if not h.get("connected", True):
            gone = h.get("down_s", last)
            out.append(f"{sid} down" + (f" {_duration(gone).lstrip('+')}" if gone is not None else ""))
        elif last is not None and last >= SOURCE_SILENT_S:
            out.append(f"{sid} no frame {_duration(last).lstrip('+')}")
    return out


def _duration(seconds: float) -> str:
    """A signed span the way a person reads it: +90d, -2.0h, +75s."""
    sign, v = ("+" if seconds >= 0 else "-"), abs(seconds)
    if v >= 86400:
        return f"{sign}{v / 86400:.0f}d"
    if v >= 3600:
        return f"{sign}{v / 3600:.1f}h"
    if v >= 60:
        return f"{sign}{v / 60:.0f}m"
    return f"{sign}{v:.0f}s"


def _models_cell(d: dict) -> str:
    """The models placed on a device and what it said of them: loaded, or which failed. An offline device's
    last report is not its state now, so none is claimed; models it runs unplaced (from its own config,
    before any placement) are named as such."""
    versions = d.get("desired_versions") or {}
    models = ",".join(f"{n}@{versions[n]}" if versions.get(n) else n for n in d["desired_models"]) or "-"
    if not d["reported_models"] or d["liveness"] == "offline":
        return models
    said = d.get("reported_versions") or {}
    bad = [f"{k} {said[k]}" if said.get(k) else k for k, v in d["reported_models"].items() if v != "loaded"]
    if bad:
        return f"{models} (!{','.join(bad)})"
    if not d["desired_models"]:
        return ",".join(sorted(d["reported_models"])) + " (loaded, not placed)"
    return f"{models} (loaded)"


def render_events(rows: list[dict]) -> str:
    out = []
    for e in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        out.append(f"{stamp}  {e['kind']:<18} {e['device'] or '-':<16} {e['detail']}")
    return "\n".join(out) or "no events"


def _table(cols: tuple[str, ...], rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [cols, *rows])
