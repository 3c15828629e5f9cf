"""Fault-plan row 16: a device killed while it serves another device's offloaded stream.

A weak camera (slow CPU emulated, a small CPU share) originates a digits
stream; two workers have no sources and fetch the fleet-signed model from
the coordinator's HTTP server. The real coordinator places the stream on a
worker; that worker is SIGKILLed. Its last will reaches the coordinator
within 1.5 x keepalive, the coordinator replans, the camera switches its
route, and results come from the other worker again. Every result the camera
numbered is stored exactly once across it (counted at the receiving end and
in the coordinator's database). The part-level version of this check is
tests/test_placement_fleet.py (its ``Watch`` is reused).
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("lepton.agent.offload", reason="the agent cannot offload in this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")

from test_agent_standins import wait_for  # noqa: E402
from test_coordinator_standins import db_rows  # noqa: E402
from test_placement_fleet import DIGITS, Watch  # noqa: E402
from test_placement_kit import build_version, make_keys  # noqa: E402

from lepton.protocol import Topics  # noqa: E402

KEEPALIVE = 4
TELEMETRY_S = 1.0
# How docs/reliability.md tells operators to set liveness so that a silent device is planned around
# within 1.5 x keepalive (telemetry period and the once-a-second sweep come on top of stale_after_s).
STALE_AFTER_S = 1.5 * KEEPALIVE - TELEMETRY_S - 2.0
MODEL = "digits-fleet"
CAMERA, WORKERS = "cam", ["w1", "w2"]


def start_fleet(fleet, private, public):
    """Counter, coordinator (serving the fleet registry), the camera and both workers; the counter."""
    registry = fleet.root / "fleet-models"
    build_version(registry, MODEL, "1.0.0", private, public)
    models_dir = registry / f"{MODEL}-1.0.0"
    counter = fleet.start_counter()
    fleet.start_coordinator({"models": {"dir": str(models_dir), "trusted_keys": [str(public)]},
                             "liveness": {"stale_after_s": STALE_AFTER_S}, "planner": {"interval_s": 3600, "time_limit_s": 2}})
    common = {"link": {"up_mbps": 100.0, "down_mbps": 100.0, "rtt_ms": 1.0}, "telemetry": {"interval_s": TELEMETRY_S, "window_s": 10.0}}
    models = {"trusted_keys": [str(public)]}
    fleet.start_agent(CAMERA, wait=0, overrides={
        **common, "sources": DIGITS, "streams": [{"id": "door", "source": "cam0", "model": MODEL}],
        "runtime": {"cpu_share": 0.05, "slowdown": 1000.0},
        "models": {**models, "dir": str(models_dir), "cache_dir": str(fleet.root / CAMERA / "models")}})
    for w in WORKERS:
        fleet.start_agent(w, wait=0, overrides={**common, "sources": [], "streams": [],
                                                 "models": {**models, "cache_dir": str(fleet.root / w / "models")}})
    for dev in fleet.devices:
        counter.wait_status(dev, "online", timeout=30)
    return counter


@pytest.mark.row(16, "offload server dies")
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_offloaded_stream_is_served_again_after_its_server_dies(fleet_factory, figures, long_run, how):
    """kill: SIGKILL (the kernel closes its socket: the broker knows at once); freeze: SIGSTOP, then SIGKILL
    (a host that hangs or loses power: only the keepalive tells)."""
    fleet = fleet_factory(devices=[CAMERA, *WORKERS], netns=False, keepalive=KEEPALIVE)
    fleet.start_broker(persistence=True)
    counter = start_fleet(fleet, *make_keys(fleet.root / "keys"))
    watch = Watch(fleet.broker.port, Topics(fleet.prefix))
    rounds = 3 if long_run else 1
    try:
        outcomes = [failover(fleet, watch, how) for _ in range(rounds)]
    finally:
        watch.close()
    fleet.stop(CAMERA)  # clean stop: its outbox says how many results it numbered
    produced = fleet.produced([CAMERA])
    counter.wait_for(produced, timeout=30)
    db, report = fleet.check_db(produced), fleet.report(produced)
    worst = max(outcomes, key=lambda o: o["resume_s"] - o["bound_s"])
    telemetry = counter.telemetry.get(CAMERA)
    figures.update(lost=db.lost_total, dups=db.duplicates, inversions=report.inversions_total,
                   failovers=len(outcomes), keepalive_s=KEEPALIVE, stale_after_s=STALE_AFTER_S, **worst, produced=len(produced[CAMERA]),
                   offload_failed=getattr(telemetry, "offload_failed", None))
    assert db.lost_total == 0 and db.duplicates == 0 and db.integrity == "ok"
    for o in outcomes:  # the broker's will timing is recorded (detect_s), not the product's to bound
        assert o["plan_s"] <= 1.5 * KEEPALIVE + o["solve_s"] + 1.0, o
        assert o["resume_s"] <= o["bound_s"], o


def failover(fleet, watch: Watch, how: str) -> dict:
    """Wait for the stream to be offloaded to a worker, take that worker down, time the way back."""
    since = time.monotonic()  # a round counts only results from now on (not the last round's)
    serving = wait_for(lambda: _alive(fleet) and {d: n for d, n in watch.served_by(since).items()
                                                  if d in WORKERS and n >= 10 and d in _routed(watch)},
                       90, "results computed on a worker the stream is routed to")
    first = max(serving, key=serving.get)
    route_before = watch.route(CAMERA, "door")
    killed = fleet.mark(f"{how} {first}")
    (fleet.kill if how == "kill" else fleet.pause)(first)
    moved_at, route = wait_for(lambda: _alive(fleet, first) and _route_without(watch, first, killed),
                               1.5 * KEEPALIVE + 20, f"door routed away from {first}")
    resumed_at = wait_for(lambda: _alive(fleet, first) and _first_result(watch, route, moved_at), 30,
                          f"results from {route} after the new route")
    solve_s = db_rows(fleet.coordinator_db, "SELECT solve_s FROM plans ORDER BY id DESC LIMIT 1")[0][0]
    frames = sorted({r.output["source"]["frame"] for t, r in watch.results if t >= killed - 1 and t <= resumed_at})
    skipped = frames[-1] - frames[0] + 1 - len(frames) if frames else 0
    offline = fleet.counter.wait_status(first, "offline", timeout=3 * KEEPALIVE + 5, after=killed)
    if how == "freeze":
        fleet.kill(first)
    fleet.start(first, wait=30)  # back in the fleet for the next round
    return {"detect_s": round(offline.t - killed, 2), "plan_s": round(moved_at - killed, 2),
            "resume_s": round(resumed_at - killed, 2), "solve_s": round(solve_s, 3),
            "bound_s": round(1.5 * KEEPALIVE + solve_s + APPLY_S, 2), "frames_skipped": skipped,
            "route_before": route_before[1] if route_before else None, "route_after": route}


def _routed(watch: Watch) -> list[str]:
    route = watch.route(CAMERA, "door")
    return route[1] if route else []


def _route_without(watch: Watch, dead: str, since: float) -> tuple[float, list[str]] | None:
    """(arrival, devices) of the first desired for the camera since *since* whose route avoids *dead*."""
    with watch.lock:
        for t, d in watch.desired.get(CAMERA, []):
            devices = [r.device for r in d.routes.get("door", [])]
            if t >= since and devices and dead not in devices:
                return t, devices
    return None


def _first_result(watch: Watch, route: list[str], since: float) -> float | None:
    """Arrival of the first result computed by a device of *route* after *since*."""
    with watch.lock:
        return next((t for t, r in watch.results if t >= since and r.computed_on in route), None)


# The bound is 1.5 x keepalive (by then the broker's will, or for a frozen host the coordinator's
# liveness sweep, has marked the device) + the plan's solve time; the replan waits out a short debounce
# and a worker new to the stream fetches and loads the model first: 1 s allowed for that.
APPLY_S = 1.0


def _alive(fleet, *dead: str) -> bool:
    for name in ["coordinator", *fleet.devices]:
        if name not in dead and not fleet.running(name):
            raise AssertionError(f"{name} exited:\n{fleet.procs[name].log_tail()}")
    return True
