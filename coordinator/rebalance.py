"""Replanning: on a timer and on events, publish only what changed.

A named thread with its own database connection. Ingest hands it ``Change``s
(device offline by last will, a new device, a device back, streams added,
a model that failed to load, new measurements); the thread itself finds
stale devices (no telemetry for ``stale_after_s``) and measured compute, link
or stream-rate figures that drifted past ``drift`` from what the last plan
assumed (a load spike is a stream rate that jumped).
Its timers run on the monotonic clock; when the wall clock is set (NTP steps
a host that booted at a wrong date), the times devices were last heard and
models failed move with the step (``FleetRegistry.shift_clock``), so the
fleet is neither called stale at once nor kept online for the step's length.
Events within ``debounce_s`` are planned together. Each plan builds a
snapshot from the registry (``fleetview``), solves it with the planner, and
publishes a new retained ``placement/desired`` generation only to devices
whose placement changed. Plans and what they changed are recorded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from lepton.clock import StepWatch
from lepton.coordinator import fleetview, placement
from lepton.coordinator.db import open_db, write_tx
from lepton.coordinator.registry import Change, FleetRegistry
from lepton.errors import LeptonError
from lepton.repeats import Repeats
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

REPLAN_KINDS = {"new-device", "online", "offline", "stale", "streams", "failed"}
KEEP_PLANS = 200  # recorded plans (each with its snapshot) kept for replay
KEEP_EVENTS = 100_000
FAILURE_LOG_S = 30.0  # a failure that repeats the same way is logged this often


def planner_params(cfg) -> dict:
    """Snapshot ``params`` from the ``[planner]`` config section."""
    return {"utilization_cap": cfg.utilization_cap, "migration_penalty_ms": cfg.migration_penalty_ms,
            "route_hold": cfg.route_hold,
            "unserved_penalty_ms": cfg.unserved_penalty_ms, "time_limit_s": cfg.time_limit_s, "queueing": cfg.queueing}


class Rebalancer:
    """Plans the fleet and publishes desired placements."""

    def __init__(self, db_path: str, topics: Topics, bus, planner_cfg, stale_after_s: float, base_url: str,
                 synchronous: str = "FULL", metrics=None):
        self.db_path, self.topics, self.bus, self.cfg = db_path, topics, bus, planner_cfg
        self.stale_after_s, self.base_url, self.synchronous, self.metrics = stale_after_s, base_url, synchronous, metrics
        self.params = planner_params(planner_cfg)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._triggers: list[str] = []
        self._measured: set[str] = set()
        self._republish = False
        self._last: dict = {}  # the snapshot the last plan used: the baseline for drift
        self._swept = 0.0
        self._thread: threading.Thread | None = None
        self.plans = 0
        # Is the coordinator's own broker session up? While it is not, no device can be heard, so none is
        # called stale (the app wires it to the bus; alone, e.g. in tests, it is always up).
        self.bus_connected: Callable[[], bool] = lambda: True
        self.ingest_ok: Callable[[], bool] = lambda: True  # False while ingest commits fail (telemetry unstored)
        self._ingest_was_ok = True
        self._repeats = Repeats(log, "rebalance", FAILURE_LOG_S)
        self._clock = StepWatch()
        self._skipped: set[str] = set()  # streams the last plan skipped, and those it left unserved: recorded
        self._unserved: set[str] = set()  # as events when they change
        self._clock_checked = time.monotonic()
        # Stored times this process wrote are at or after this (on the clock as it is now; moved with each step):
        # earlier ones were written on the clock of an earlier run, which a step seen now is not about.
        self._run_from = time.time() - 1.0
        self._clock_pending: list[tuple[float, float, float]] = []  # (step, written-after, now before it) to apply

    # --- from other threads -------------------------------------------------
    def notify(self, changes: list[Change]) -> None:
        """Hand over changes from ingest (any thread)."""
        with self._lock:
            for c in changes:
                if c.kind in REPLAN_KINDS:
                    self._triggers.append(f"{c.kind} {c.device}")
                elif c.kind == "measured":
                    self._measured.add(c.device)
        self._wake.set()

    def request(self, trigger: str) -> None:
        """Ask for a plan now (operator, tests, start-up)."""
        with self._lock:
            self._triggers.append(trigger)
        self._wake.set()

    def republish(self) -> None:
        """After each (re)connect: send every stored desired placement again (a crash may have lost one), and
        give devices one liveness period to be heard before any is called stale (the outage silenced them all)."""
        with self._lock:
            self._republish = True
            self.started = time.monotonic()
        self._wake.set()

    # --- the thread -------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(stop,), name="rebalancer", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        if self._thread:
            self._thread.join(timeout)

    def attach(self) -> None:
        """Open this thread's database connection (the thread does it; tests may call it directly)."""
        self.db = open_db(self.db_path, self.synchronous)
        self.registry = FleetRegistry(self.db)
        if not hasattr(self, "started"):
            self.started = time.monotonic()

    def _run(self, stop: threading.Event) -> None:
        self.attach()
        # The solver's import (scipy, about 0.6 s) while the coordinator connects, not in the first plan (the
        # first failover after a start took that much longer).
        try:
            import lepton.coordinator.planner.solve  # noqa: F401
            import scipy.optimize  # noqa: F401
        except Exception as exc:  # each plan tries again and says why it fails
            log.error("the planner cannot be loaded: %s", exc)
        next_timer = time.monotonic() + min(1.0, self.cfg.interval_s)  # a first plan soon after start
        while not stop.is_set():
            self._wake.wait(timeout=max(0.0, min(1.0, next_timer - time.monotonic())))
            self._wake.clear()
            if stop.is_set():
                break
            try:
                trigger = self._due(time.monotonic() >= next_timer)
                if trigger:
                    if self.cfg.debounce_s and not trigger.startswith("timer"):
                        stop.wait(self.cfg.debounce_s)  # let a burst of events arrive: plan them together
                        trigger = self._collect(trigger)
                    self.plan_once(trigger)
                    next_timer = time.monotonic() + self.cfg.interval_s
                self._repeats.worked()
            except Exception as exc:  # a planning failure must not end the thread: the next trigger tries again
                self._repeats.failed(exc)
                next_timer = time.monotonic() + self.cfg.interval_s
        self.db.close()

    def _due(self, timer: bool) -> str:
        """What calls for a plan now ('' for nothing): stale devices, events, drift, the timer."""
        if self._take_republish():
            self._republish_all()
        self._follow_clock()
        now, tick = time.time(), time.monotonic()
        sweep = tick - self._swept >= 1.0  # telemetry wakes this thread often: sweep and check drift once a second
        if sweep:
            self._swept = tick
        # While ingest cannot store telemetry every device looks silent: none is called stale then, and each
        # gets one period again once it can.
        ingest_ok = self.ingest_ok()
        if ingest_ok and not self._ingest_was_ok:
            self.started = tick
        self._ingest_was_ok = ingest_ok
        # Give devices one period to report after a (re)start or reconnect before calling any of them stale.
        if (sweep and ingest_ok and self.bus_connected() and tick - self.started >= self.stale_after_s
                and self.registry.silent(now, self.stale_after_s)):
            with write_tx(self.db):
                stale = self.registry.mark_stale(now, self.stale_after_s)
            if stale:
                self.notify(stale)
        trigger = self._collect("")
        drift = self._drift() if sweep else ""
        if drift:
            trigger = f"{trigger}; {drift}" if trigger else drift
        return trigger or ("timer" if timer else "")

    def _follow_clock(self) -> None:
        """Move the stored liveness and failure times with a step of the wall clock (see the module doc)."""
        step, tick = self._clock.check(), time.monotonic()
        since, self._clock_checked = tick - self._clock_checked, tick
        if step:
            now = time.time()
            # Times written after the step, on the new clock, lie within the time since the last check (kept);
            # this run's times before it lie between its start and the old clock's now (moved).
            before = now - step + 1.0  # this run's pre-step times are below the old clock's now
            # After a forward step shorter than the time since the last check (a long plan in between) the two
            # ranges meet: a time there is moved (a device heard up to `since` later) rather than left S old
            # (called stale at once).
            after = max(now - since - 1.0, before) if step > 0 else now - since - 1.0
            self._clock_pending.append((step, after, before))
            log.warning("the wall clock was set %s by %.1f s: when devices were last heard and models failed move "
                        "with it", "forward" if step > 0 else "back", abs(step))
        while self._clock_pending:  # a write that failed (a locked or full database) is tried again next round
            step, after, before = self._clock_pending[0]
            now = time.time()
            with write_tx(self.db):
                moved = self.registry.shift_clock(step, self._run_from, before, after, now + 1.0)
                self.registry.event("clock-step", detail=f"the wall clock was set {'forward' if step > 0 else 'back'} "
                                    f"by {abs(step):.1f} s; {moved} stored time(s) of devices moved with it", now=now)
            self._run_from += step
            self._clock_pending.pop(0)

    def _collect(self, trigger: str) -> str:
        with self._lock:
            parts = ([trigger] if trigger else []) + self._triggers
            self._triggers = []
        return "; ".join(dict.fromkeys(parts))

    def _take_republish(self) -> bool:
        with self._lock:
            flag, self._republish = self._republish, False
        return flag

    def _drift(self) -> str:
        """Measured compute, link or stream-rate figures that moved past ``drift`` since the last plan."""
        with self._lock:
            devices, self._measured = self._measured, set()
        if not devices or not self._last:
            return ""
        view = fleetview.build(self.registry, self.params, self.cfg.default_compute_ms, self.cfg.exclude_failed_s)
        new, old = _figures(view.snapshot, devices), _figures(self._last, devices)
        moved = [f"{k} {old[k]:.3g}->{v:.3g}" for k, v in new.items()
                 if k in old and abs(v - old[k]) > max(self.cfg.drift * abs(old[k]), 0.5)]
        return "drift " + ", ".join(moved[:5]) if moved else ""

    # --- one plan -------------------------------------------------------------------
    def plan_once(self, trigger: str) -> dict | None:
        """Build the snapshot, solve, publish changed placements; returns the plan row written."""
        from lepton.coordinator.planner import plan as solve  # scipy: loaded only where plans are made
        from lepton.coordinator.snapshot import load_snapshot

        now = time.time()
        view = fleetview.build(self.registry, self.params, self.cfg.default_compute_ms, self.cfg.exclude_failed_s, now)
        if not any(d["online"] for d in view.snapshot["devices"]):
            self._last = view.snapshot
            self._observe_devices()  # nothing to plan, but the fleet's liveness changed
            return None
        try:
            result = solve(load_snapshot(view.snapshot))
        except LeptonError as exc:
            with write_tx(self.db):
                self.registry.event("plan-failed", detail=f"{trigger}: {exc}")
            log.error("plan failed (%s): %s", trigger, exc)
            return None
        desired = placement.contents(result, view, self.base_url)
        changed = self._store(result, view, desired, trigger, now)
        for msg in changed:
            self.bus.publish(self.topics.desired(msg.device), encode(msg), qos=1, retain=True)
        self._last = view.snapshot
        self.plans += 1
        self._observe(result, trigger, changed)
        log.info("plan (%s): %s via %s in %.3f s, %d device(s) changed", trigger, result.status, result.path,
                 result.solve_s, len(changed))
        return {"trigger": trigger, "changed": [c.device for c in changed], "plan": result}

    def _store(self, result, view: fleetview.FleetView, desired: dict, trigger: str, now: float) -> list[m.Desired]:
        placements = self.registry.placements()
        changed: list[m.Desired] = []
        with write_tx(self.db):
            for dev, content in desired.items():
                prev = placements.get(dev) or {}
                if placement.same(prev.get("desired"), content):
                    continue
                msg = m.Desired(device=dev, generation=(prev.get("desired_gen") or 0) + 1, ts=now, **content)
                self.db["placement"].upsert({"device": dev, "desired_gen": msg.generation,
                                             "desired": encode(msg).decode(), "desired_at": now}, pk="device")
                self.registry.event("placement", dev, placement.describe(prev.get("desired"), msg), now=now)
                changed.append(msg)
            # Recorded when they change, not at every plan: a misconfigured device is otherwise named twice a
            # second while its neighbours flap, and the events that matter fall out of the kept window.
            for note in sorted(set(view.skipped) - self._skipped):
                self.registry.event("stream-skipped", detail=note, now=now)
            unserved = {k: v for k, v in (result.unserved or {}).items() if v > placement.MIN_SHARE}
            if unserved and set(unserved) != self._unserved:
                self.registry.event("unserved", detail=", ".join(f"{k} {v:.0%}" for k, v in sorted(unserved.items())), now=now)
            self.db.execute(
                "INSERT INTO plans (ts, trigger, status, path, objective, gap, solve_s, changed, plan, snapshot) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [now, trigger[:500], str(result.status), result.path, _num(result.objective), _num(result.gap),
                 result.solve_s, len(changed), json.dumps(result.to_json(), default=str), json.dumps(view.snapshot)],
            )
            self.db.execute("DELETE FROM plans WHERE id <= (SELECT max(id) FROM plans) - ?", [KEEP_PLANS])
            self.db.execute("DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?", [KEEP_EVENTS])
        self._skipped, self._unserved = set(view.skipped), set(unserved)  # recorded: committed
        return changed

    def _republish_all(self) -> None:
        for dev, row in self.registry.placements().items():
            if row.get("desired"):
                self.bus.publish(self.topics.desired(dev), row["desired"].encode(), qos=1, retain=True)

    def _observe(self, result, trigger: str, changed: list) -> None:
        if not self.metrics:
            return
        self.metrics.plans.labels(trigger=trigger.split(" ")[0].rstrip(";")).inc()
        self.metrics.plan_seconds.observe(result.solve_s or 0.0)
        self.metrics.placements_published.inc(len(changed))
        self.metrics.unserved.set(sum(1 for v in (result.unserved or {}).values() if v > placement.MIN_SHARE))
        self._observe_devices()

    def _observe_devices(self) -> None:
        if not self.metrics:
            return
        counts: dict[str, int] = {"online": 0, "stale": 0, "offline": 0}
        for d in self.registry.devices():
            counts[d["liveness"]] = counts.get(d["liveness"], 0) + 1
        for k, v in counts.items():
            self.metrics.devices.labels(liveness=k).set(v)


def _figures(snapshot: dict, devices: set[str]) -> dict[str, float]:
    """Compute, link and stream-rate figures of *devices* in a snapshot, keyed for comparison."""
    out: dict[str, float] = {}
    for d in snapshot.get("devices", []):
        if d["id"] in devices:
            for k in ("uplink_mbps", "downlink_mbps", "rtt_ms"):
                out[f"{d['id']}.{k}"] = d[k]
    for stream in snapshot.get("streams", []):
        if stream["origin"] in devices:
            out[f"{stream['id']}.rate_hz"] = stream["rate_hz"]
    scale = {d["id"]: d.get("compute_scale", 1.0) for d in snapshot.get("devices", [])}
    for mod in snapshot.get("models", []):
        for dev in devices:  # a first measurement replaces the scaled bench default: compare with what was assumed
            default = mod.get("default_compute_ms")
            ms = mod["compute_ms"].get(dev, None if default is None else default * scale.get(dev, 1.0))
            if ms is not None:
                out[f"{mod['name']}@{dev}"] = ms
    return out


def _num(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
