"""The demo's timeline: start the fleet, kill a worker, add a camera, summarise."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from lepton.demo.fleet import Fleet, demo_devices, spike_device
from lepton.demo.observe import Observer
from lepton.embedded_broker import private_broker

log = logging.getLogger(__name__)

KEEPALIVE_S = 2
SPIKE_LEAD_S = 12.0  # timed runs: the spike comes at least this long before the end
FIRST_EVENT_S = 25.0  # interactive runs: kill a worker after this long, add the spike 20 s later


class Scenario:
    """One demo run; stop() ends every process whatever happened."""

    def __init__(self, workdir: Path, prefix: str, duration: float = 0.0, broker: str = "auto",
                 stop: threading.Event | None = None):
        self.workdir, self.prefix, self.duration = workdir, prefix, duration
        self.stop_requested = stop or threading.Event()  # set (by a signal): end the timeline now
        self.started = time.time()
        self.broker = private_broker(workdir / "broker", prefer=broker)
        self.fleet: Fleet | None = None
        self.obs: Observer | None = None
        self.specs = demo_devices()
        self.roles = {s.id: s.role for s in self.specs + [spike_device()]}
        self.killed: str | None = None
        self.kill_at: float | None = None
        self.plan_at_kill: int = 0
        self.at_risk: list[tuple[str, str]] = []  # (origin, stream) served on the killed device
        self.failovers: dict[tuple[str, str], dict] = {}
        self.spiked = False
        self.exited: list[str] = []  # processes that ended on their own, with their last log line

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.broker.start()
        self.fleet = Fleet(self.workdir, self.broker.host, self.broker.port, self.prefix, KEEPALIVE_S)
        self.fleet.start_coordinator()
        self.obs = Observer(self.broker.host, self.broker.port, self.prefix, self.fleet.coordinator_db)
        for spec in self.specs:
            if self.stop_requested.is_set():
                break  # asked to stop while starting: start no more
            self.fleet.start_agent(spec)
        self.started = time.time()
        self.obs.note(f"fleet started on a private {type(self.broker).__name__} at {self.broker.host}:{self.broker.port}"
                      f" (watch it: mosquitto_sub -h {self.broker.host} -p {self.broker.port} -v -t '{self.prefix}/#')")

    def stop(self) -> None:
        if self.fleet:
            self.fleet.stop()
        if self.obs:
            self.obs.close()
        self.broker.stop()

    def run(self, live: bool) -> dict:
        """Run the timeline until the duration is up or a stop is requested; the summary."""
        kill_s, spike_s = self._schedule()
        try:
            self.start()
            if live:
                self._live(kill_s, spike_s)
            else:
                while not self._finished():
                    self._step(kill_s, spike_s)
                    self.stop_requested.wait(0.5)
        except KeyboardInterrupt:
            pass
        return self.summary()

    def _schedule(self) -> tuple[float, float]:
        if self.duration:
            # the joining camera needs a few seconds to start, be placed and send (more on a busy machine)
            kill_s = 0.35 * self.duration
            return kill_s, max(kill_s, min(0.6 * self.duration, self.duration - SPIKE_LEAD_S))
        return FIRST_EVENT_S, FIRST_EVENT_S + 20

    def _finished(self) -> bool:
        if self.stop_requested.is_set():
            return True
        return bool(self.duration) and time.time() - self.started >= self.duration

    def _live(self, kill_s: float, spike_s: float) -> None:
        from rich.console import Console
        from rich.live import Live

        from lepton.demo.view import render

        assert self.obs
        console = Console()
        with Live(render(self.obs, self.roles, self.started, self.duration, console.width), console=console,
                  refresh_per_second=2, screen=False) as view:
            while not self._finished():
                self._step(kill_s, spike_s)
                view.update(render(self.obs, self.roles, self.started, self.duration, console.width))
                self.stop_requested.wait(0.5)

    # --- the timeline ------------------------------------------------------
    def _step(self, kill_s: float, spike_s: float) -> None:
        assert self.fleet and self.obs
        elapsed = time.time() - self.started
        if self.killed is None and elapsed >= kill_s:
            self._kill_busiest_worker()
        if not self.spiked and elapsed >= spike_s:
            self.spiked = True
            spec = spike_device()
            self.fleet.start_agent(spec)
            self.obs.note(f"load spike: {spec.id} joins with a heavy stream")
        if self.killed:
            self._track_failover()
        for name in self.fleet.dead():
            proc = self.fleet.procs[name]
            self.exited.append(f"{name} exited on its own (status {proc.popen.returncode}): {proc.log_tail(1)}")
            self.obs.note(self.exited[-1])
            proc.popen = None

    def _kill_busiest_worker(self) -> None:
        """Kill the worker that serves most of other devices' streams in the last plan."""
        assert self.fleet and self.obs
        plan = self.obs.last_plan() or {"routes": {}, "id": 0}
        served: dict[str, list[tuple[str, str]]] = {}
        for (origin, stream) in list(self.obs.streams):
            for route in plan["routes"].get(stream) or plan["routes"].get(f"{origin}.{stream}") or []:
                if route["device"] != origin and route["share"] > 0.01:
                    served.setdefault(route["device"], []).append((origin, stream))
        workers = [s.id for s in self.specs if not s.streams]
        victim = max(workers, key=lambda w: len(served.get(w, [])))
        self.killed, self.kill_at, self.plan_at_kill = victim, time.time(), plan["id"]
        self.at_risk = served.get(victim, [])
        self.fleet.kill(victim)
        self.obs.note(f"killed {victim} (SIGKILL); it served {len(self.at_risk)} stream(s) of other devices")

    def _track_failover(self) -> None:
        """A stream has failed over once a newer plan routes it elsewhere and results flow from there."""
        assert self.obs and self.kill_at
        plan = self.obs.last_plan()
        if not plan or plan["id"] <= self.plan_at_kill:
            return
        for origin, stream in self.at_risk:
            if (origin, stream) in self.failovers:
                continue
            routes = plan["routes"].get(stream) or plan["routes"].get(f"{origin}.{stream}") or []
            moved_to = [r["device"] for r in routes if r["share"] > 0.01 and r["device"] != self.killed]
            view = self.obs.streams.get((origin, stream))
            if moved_to and all(r["device"] != self.killed for r in routes) and view and view.last_at > self.kill_at:
                after = view.last_at - self.kill_at
                self.failovers[(origin, stream)] = {"stream": f"{origin}/{stream}", "device": self.killed,
                                                    "moved_to": moved_to, "recovered_after_s": round(after, 2)}
                self.obs.note(f"failover: {origin}/{stream} now on {', '.join(moved_to)} ({after:.1f}s after the kill)")

    # --- the summary -------------------------------------------------------
    def summary(self) -> dict:
        if self.obs is None:  # stopped before the fleet was up
            return {"ok": False, "duration_s": round(time.time() - self.started, 1), "broker": type(self.broker).__name__,
                    "results": 0, "streams": {}, "devices": {}, "killed": None, "failovers": [], "spike": None,
                    "plans": 0, "placements_published": 0, "events": [],
                    "problems": ["stopped before the fleet had started"]}
        plan = self.obs.last_plan() or {"count": 0}
        with self.obs.lock:
            streams = {
                f"{o}/{s}": {"model": v.model, "results": v.results, "computed_on": dict(v.computed_on),
                             "accuracy": round(v.correct / v.judged, 3) if v.judged else None,
                             "e2e_p50_ms": v.p50_ms()}
                for (o, s), v in sorted(self.obs.streams.items())
            }
            devices = {d.id: d.state for d in self.obs.devices.values()}
            events = [f"{t - self.started:6.1f}s {text}" for t, text in self.obs.events]
        expected = {f"{spec.id}/{st['id']}" for spec in self.specs for st in spec.streams}
        if self.spiked:
            expected |= {f"{spike_device().id}/{st['id']}" for st in spike_device().streams}
        silent = sorted(name for name in expected if not streams.get(name, {}).get("results"))
        problems = [f"no results from stream {name}" for name in silent] + list(self.exited)
        if self.duration and not self.failovers:
            if self.killed is None:
                problems.append("no failover observed: stopped before a worker was killed")
            else:
                problems.append("no failover observed" + ("" if self.at_risk else
                                f": {self.killed} served no other device's stream when it was killed"))
        return {
            "ok": not problems,
            "duration_s": round(time.time() - self.started, 1),
            "broker": type(self.broker).__name__,
            "results": sum(s["results"] for s in streams.values()),
            "streams": streams,
            "devices": devices,
            "killed": self.killed,
            "failovers": list(self.failovers.values()),
            "spike": spike_device().id if self.spiked else None,
            "plans": plan.get("count", 0),
            "placements_published": self.obs.desired_count,
            "events": events,
            "problems": problems,
        }
