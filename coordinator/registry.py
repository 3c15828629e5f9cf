"""The fleet registry: what the coordinator knows about every device.

Wraps one thread's ``Database`` (see ``lepton.coordinator.db``). Writers call
``apply_*`` with a validated protocol message inside a transaction they own;
each returns the ``Change``s worth a new plan. Nothing here talks MQTT.

Liveness: ``online`` after a birth, ``offline`` after a last will or a clean
stop, ``stale`` when neither telemetry nor a status arrived for
``stale_after_s`` (judged by the coordinator's clock, never the device's).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from sqlite_utils import Database

from lepton.protocol import messages as m

WINDOW = 8  # compute samples kept per (device, model): the median of the last 8 reports
# A failure reported again this long after the last report of it is a new attempt that failed (the model was
# placed there again): a new event and a replan. Sooner, it is the same failure in a later report.
REFAILED_AFTER_S = 60.0
SOURCE_DOWN_S = 10.0  # a source not delivering this long is a source-down event (shorter drops are not)
STREAM_RATE_CHANGE = 0.05  # a stream whose announced rate moved less than this (relative) is unchanged


@dataclass(frozen=True)
class Change:
    """Something that may call for a new plan."""

    kind: str  # new-device | online | offline | stale | streams | failed | measured
    device: str
    detail: str = ""


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class FleetRegistry:
    """Reads and writes fleet state through one connection (one thread)."""

    def __init__(self, db: Database):
        self.db = db

    # --- events -----------------------------------------------------------
    def event(self, kind: str, device: str = "", detail: str = "", data: Any = None, now: float | None = None) -> None:
        """Record what changed and why (shown by ``lepton events``)."""
        self.db.execute(
            "INSERT INTO events (ts, kind, device, detail, data) VALUES (?, ?, ?, ?, ?)",
            [now or time.time(), kind, device, detail, None if data is None else _json(data)],
        )

    # --- status (birth / last will) -----------------------------------------
    def device(self, device: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM devices WHERE id = ?", [device]))
        return rows[0] if rows else None

    def apply_status(self, msg: m.Status, now: float) -> list[Change]:
        """Store a birth or a last will; a replay of the same status changes nothing."""
        old = self.device(msg.device)
        if msg.state == "offline":
            return self._went_offline(msg, old, now)
        caps = _json(msg.capabilities.model_dump()) if msg.capabilities else (old or {}).get("capabilities")
        row = {
            "id": msg.device,
            "state": "online",
            "liveness": "online",
            "status_at": now,
            "status_ts": msg.ts,
            "reason": msg.reason,
            "agent_version": msg.agent_version,
            "capabilities": caps,
        }
        changes: list[Change] = []
        if old is None:
            row.update(first_seen=now, degraded=0, degraded_reason="")
            self.db["devices"].insert(row)
            self.event("device-new", msg.device, f"first birth, agent {msg.agent_version or '?'}", now=now)
            changes.append(Change("new-device", msg.device))
        else:
            same = old["state"] == "online" and old["status_ts"] == msg.ts and old["capabilities"] == caps
            if same:
                return self._apply_streams(msg, now)  # a replayed retained birth: nothing new
            self.db["devices"].update(msg.device, row)
            if old["liveness"] != "online":
                self.event("device-online", msg.device, f"birth after {old['liveness']}", now=now)
                changes.append(Change("online", msg.device))
            elif old["capabilities"] != caps:
                self.event("device-capabilities", msg.device, "capabilities changed", now=now)
                changes.append(Change("online", msg.device, "capabilities"))
        return changes + self._apply_streams(msg, now)

    def _went_offline(self, msg: m.Status, old: dict | None, now: float) -> list[Change]:
        if old is None:
            return []  # a will from a device never born here carries nothing to plan with
        if old["state"] == "offline" and old["liveness"] == "offline":
            return []
        reason = msg.reason or "last will"
        self.db["devices"].update(
            msg.device, {"state": "offline", "liveness": "offline", "status_at": now, "status_ts": msg.ts, "reason": reason}
        )
        self.event("device-offline", msg.device, reason, now=now)
        return [Change("offline", msg.device, reason)]

    def _apply_streams(self, msg: m.Status, now: float) -> list[Change]:
        new = {s.id: s for s in msg.streams}
        old = {r["stream"]: r for r in self.db.query("SELECT * FROM streams WHERE device = ?", [msg.device])}

        def same(s: m.StreamInfo, r: dict) -> bool:
            # A birth carries the rate its source measured: one that moved by less than STREAM_RATE_CHANGE is the
            # same stream (an event and a plan at every reconnect otherwise); telemetry follows the rate.
            rate_same = abs(s.rate_hz - r["rate_hz"]) <= STREAM_RATE_CHANGE * max(s.rate_hz, r["rate_hz"])
            return rate_same and (s.model, s.payload_bytes, s.reply_bytes, s.slo_ms) == (
                r["model"], r["payload_bytes"], r["reply_bytes"], r["slo_ms"])

        added = [sid for sid, s in new.items() if sid not in old or not same(s, old[sid])]
        removed = [sid for sid in old if sid not in new]
        if not added and not removed:
            return []
        for sid in removed:
            self.db.execute("DELETE FROM streams WHERE device = ? AND stream = ?", [msg.device, sid])
        self.db["streams"].upsert_all(
            [dict(s.model_dump(exclude={"id"}), stream=s.id, device=msg.device, updated_at=now) for s in new.values()
             if s.id in added],
            pk=("device", "stream"),
        )
        detail = ", ".join([f"+{sid}" for sid in added] + [f"-{sid}" for sid in removed])
        self.event("streams", msg.device, detail, now=now)
        return [Change("streams", msg.device, detail)]

    # --- telemetry ------------------------------------------------------------
    def apply_telemetry(self, msg: m.Telemetry, now: float) -> list[Change]:
        """Store the newest telemetry, update compute windows and link estimates."""
        old = self.device(msg.device)
        if old is None:
            return []  # unknown device: its retained birth comes first, telemetry waits for it
        self.db["devices"].update(
            msg.device,
            {
                "telemetry": m.encode(msg).decode(),
                "telemetry_at": now,
                "load1": msg.load1,
                "cpu_percent": msg.cpu_percent,
                "outbox_depth": msg.outbox_depth,
            },
        )
        self._source_events(msg, old["telemetry"], now)
        changes = [Change("measured", msg.device)]
        for model, timing in msg.models.items():
            if timing.count > 0:
                self._add_compute(msg.device, model, timing.p50_ms, now)
        self._update_link(msg.device, msg.link, now)
        for stream, hz in msg.streams.items():
            self.db.execute("UPDATE streams SET measured_hz = ? WHERE device = ? AND stream = ?", [hz, msg.device, stream])
        if old["liveness"] == "stale" and old["state"] == "online":
            self.db["devices"].update(msg.device, {"liveness": "online"})
            self.event("device-online", msg.device, "telemetry again after stale", now=now)
            changes.append(Change("online", msg.device, "telemetry"))
        return changes

    def _source_events(self, msg: m.Telemetry, before: str | None, now: float) -> None:
        """``source-down`` once a source has not delivered for SOURCE_DOWN_S (a camera missing at start
        included; a camera slow to give its first frame, or a drop it comes back from sooner, is no event),
        ``source-up`` when one that was down delivers again."""
        sources = getattr(msg, "sources", None)  # telemetry v2
        if not sources:
            return
        try:
            was = dict(json.loads(before or "{}").get("sources") or {})
        except (ValueError, AttributeError, TypeError):
            was = {}

        def down(h: dict) -> bool:
            return not h.get("connected", True) and (h.get("down_s") or 0) >= SOURCE_DOWN_S

        for sid, health in sources.items():
            prev = was.get(sid)
            was_down = isinstance(prev, dict) and down(prev)
            if down(health.model_dump()) and not was_down:
                last = "no frame yet" if health.last_frame_s is None else f"last frame {health.last_frame_s:.0f} s ago"
                self.event("source-down", msg.device, f"{sid}: not delivering for {health.down_s:.0f} s ({last})",
                           now=now)
            elif was_down and health.connected:
                self.event("source-up", msg.device, f"{sid}: delivering again ({health.reconnects} reconnect(s) so "
                           "far)", now=now)

    def _add_compute(self, device: str, model: str, ms: float, now: float) -> None:
        rows = list(self.db.query("SELECT window FROM compute WHERE device = ? AND model = ?", [device, model]))
        window = (json.loads(rows[0]["window"]) if rows else [])[-(WINDOW - 1):] + [ms]
        self.db.execute(
            "INSERT INTO compute (device, model, window, ms, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (device, model) DO UPDATE SET window = excluded.window, ms = excluded.ms, "
            "updated_at = excluded.updated_at",
            [device, model, _json(window), statistics.median(window), now],
        )

    def _update_link(self, device: str, link: m.Link, now: float) -> None:
        measured = {k: v for k, v in link.model_dump().items() if v is not None}
        if not measured:
            return
        self.db["links"].upsert(dict(measured, device=device, updated_at=now), pk="device")

    # --- reported placement -----------------------------------------------------
    def apply_reported(self, msg: m.Reported, now: float) -> list[Change]:
        """Store what the device runs; failures (per version) mark it degraded and keep that version away."""
        if self.device(msg.device) is None:
            return []
        row = {"device": msg.device, "reported_gen": msg.generation, "reported": m.encode(msg).decode(), "reported_at": now}
        prev = list(self.db.query("SELECT reported FROM placement WHERE device = ?", [msg.device]))
        if prev and prev[0]["reported"] == row["reported"]:
            return []  # a replayed retained report
        self.db["placement"].upsert(row, pk="device")
        changes: list[Change] = []
        for model, state in msg.models.items():
            if state.state == "failed":
                changes += self._model_failed(msg.device, model, state, now)
            elif state.state == "loaded":  # that version works here (a newer one that failed stays failed)
                self.db.execute("DELETE FROM failures WHERE device = ? AND model = ? AND version = ?",
                                [msg.device, model, state.version])
                if state.invoke_ms is not None:
                    self._add_compute(msg.device, model, state.invoke_ms, now)
        # Degraded: what this report says failed. (The failures rows outlive it: they keep the model away from
        # the device for exclude_failed_s after the plan moved it elsewhere and the report stopped naming it.)
        failed = [name for name, state in msg.models.items() if state.state == "failed"]
        reason = ", ".join(sorted(failed))
        dev = self.device(msg.device)
        if bool(dev["degraded"]) != bool(failed) or (failed and dev["degraded_reason"] != reason):
            self.db["devices"].update(msg.device, {"degraded": int(bool(failed)), "degraded_reason": reason})
            self.event("degraded" if failed else "recovered", msg.device, reason or "no failed model", now=now)
        return changes

    def _model_failed(self, device: str, model: str, state: m.ModelState, now: float) -> list[Change]:
        """Record a failed model; every report of it restarts its exclusion window, so a model placed again once
        the window passed, that fails again, is kept away again."""
        old = list(self.db.query("SELECT reason, version, at FROM failures WHERE device = ? AND model = ? "
                                 "AND version = ?", [device, model, state.version]))
        self.db["failures"].upsert(
            {"device": device, "model": model, "version": state.version, "reason": state.reason, "at": now},
            pk=("device", "model", "version"),
        )
        if old and (old[0]["reason"], old[0]["version"]) == (state.reason, state.version) \
                and now - old[0]["at"] < REFAILED_AFTER_S:
            return []  # the same failure in a later report (another model's state changed)
        self.event("model-failed", device, f"{model} {state.version}: {state.reason}", now=now)
        return [Change("failed", device, model)]

    def shift_clock(self, step: float, run_from: float, run_to: float, keep_from: float, keep_to: float) -> int:
        """Move the stored times that liveness and failure windows compare with the wall clock by *step* s (the
        clock was set by that much): those within [run_from, run_to] (written by this run before the step), but
        not those within [keep_from, keep_to] (written after it, on the new clock). How many moved."""
        moved = 0
        for table, column in (("devices", "status_at"), ("devices", "telemetry_at"), ("failures", "at")):
            moved += self.db.execute(
                f"UPDATE {table} SET {column} = {column} + ? WHERE {column} BETWEEN ? AND ? "
                f"AND {column} NOT BETWEEN ? AND ?", [step, run_from, run_to, keep_from, keep_to]).rowcount
        return moved

    # --- liveness sweep (rebalancer) ------------------------------------------------
    def silent(self, now: float, stale_after_s: float) -> list[dict]:
        """Online devices that sent nothing for longer than *stale_after_s* (a read: no lock taken)."""
        return list(self.db.query(
            "SELECT id, status_at, telemetry_at FROM devices WHERE liveness = 'online' "
            "AND max(coalesce(status_at, 0), coalesce(telemetry_at, 0)) < ?",
            [now - stale_after_s],
        ))

    def mark_stale(self, now: float, stale_after_s: float) -> list[Change]:
        """Online devices silent for longer than *stale_after_s* become stale."""
        changes = []
        for row in self.silent(now, stale_after_s):
            silent = now - max(row["status_at"] or 0, row["telemetry_at"] or 0)
            self.db["devices"].update(row["id"], {"liveness": "stale"})
            detail = f"no telemetry for {silent:.1f} s (stale after {stale_after_s:g} s)"
            self.event("device-stale", row["id"], detail, now=now)
            changes.append(Change("stale", row["id"], detail))
        return changes

    # --- reads ------------------------------------------------------------------------
    def devices(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM devices ORDER BY id"))

    def streams(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM streams ORDER BY device, stream"))

    def compute(self) -> dict[tuple[str, str], float]:
        return {(r["device"], r["model"]): r["ms"] for r in self.db.query("SELECT device, model, ms FROM compute")}

    def links(self) -> dict[str, dict]:
        return {r["device"]: r for r in self.db.query("SELECT * FROM links")}

    def failures(self, since: float = 0.0) -> list[dict]:
        return list(self.db.query("SELECT * FROM failures WHERE at >= ? ORDER BY device, model", [since]))

    def placements(self) -> dict[str, dict]:
        return {r["device"]: r for r in self.db.query("SELECT * FROM placement")}

    def known_versions(self) -> dict[str, list[dict]]:
        """Every known version of each model, by name, newest first."""
        out: dict[str, list[dict]] = {}
        for row in self.db.query("SELECT * FROM models"):
            out.setdefault(row["name"], []).append(row)
        for rows in out.values():
            rows.sort(key=lambda r: _version_key(r["version"]), reverse=True)
        return out

    def known_models(self) -> dict[str, dict]:
        """Newest version of each known model, by name."""
        return {name: rows[0] for name, rows in self.known_versions().items()}

    def set_models(self, rows: list[dict]) -> None:
        """Replace the known models with what the model registry holds now."""
        with self.db.atomic():
            self.db.execute("DELETE FROM models")
            if rows:
                self.db["models"].insert_all(rows, pk=("name", "version"))

    def meta(self, key: str, default: Any = None) -> Any:
        rows = list(self.db.query("SELECT value FROM meta WHERE key = ?", [key]))
        return json.loads(rows[0]["value"]) if rows else default

    def set_meta(self, key: str, value: Any) -> None:
        self.db["meta"].upsert({"key": key, "value": _json(value)}, pk="key")


def _version_key(version: str) -> tuple:
    """Versions in the order devices use (PEP 440, as ``lepton models add`` requires: "1.10" > "1.9",
    "1.0.0rc1" < "1.0.0" = "1.0"); one that is not PEP 440 sorts below every one that is, numerically
    where it has numbers."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), ())
    except InvalidVersion:
        return (0, None, tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                               for p in version.replace("-", ".").split(".")))
