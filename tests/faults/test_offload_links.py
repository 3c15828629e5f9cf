"""Offload over shaped links: the planner's predicted latency against the measured one, and D = L/C.

Two namespaced devices and a coordinator on the bridge: ``cam`` runs a
synthetic camera through mobilenet96 on an emulated slow CPU
(``runtime.slowdown``), ``gpu`` is a pure inference worker. The cam's link is
limited with tbf to a capacity C in both directions; the worker's link is not.
Everything the coordinator plans with is what the agents measured: compute
times from telemetry, links from probes and offload payloads.

For each capacity the test waits for a plan made on links measured at that
capacity, then:

- where the plan offloads the stream, it compares the round trip the cam
  measured for results computed on the worker (``rtt_ms``: payload up,
  through the broker to the worker, inference, reply back) with the plan's
  predicted transfer + propagation + compute for that route: within 15%;
- from the same snapshot it computes where D = L/C puts the switch: the
  capacity C* at which sending L bytes (and the reply) costs what the cam's
  compute saves, and checks that the plan offloads above C* and serves the
  stream locally below it. After 12 Mbit/s (and 6 and 3 with --long) the
  link is set to 1.6 x C* (still offloaded), 0.6 x C* (local) and back to 12
  (offloaded); a step whose own C* moved to the other side of its capacity is
  taken again at k x the new C*.

The figures (predicted vs measured per capacity) are printed.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]
pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")

STREAM = "s0"  # the cam's stream (the plan names streams by id unless two origins share one)
RATE_HZ = 2.0
CAM_COMPUTE_MS = 120.0  # the emulated camera device's mobilenet96 time: runtime.slowdown = this / the host's invoke
OFFLOADED_AT = (12.0, 6.0, 3.0)  # Mbit/s: transfer 19-75 ms, well under the cam's own compute
AROUND = (1.6, 0.6)  # then x C* (where D = L/C puts the switch, from the plan before): one each side
BURST = 2 * 1514  # tbf bucket: two frames, so a 27 KB payload sees the configured rate
TOLERANCE = 0.15
SAMPLES = 16  # offloaded results per capacity
COORDINATOR = {"planner": {"interval_s": 2.0, "migration_penalty_ms": 1.0, "drift": 0.1}}
CAM = {"link": {"probe_interval_s": 2.0, "probe_bytes": 16384, "window_s": 8.0},
       "telemetry": {"interval_s": 1.0, "window_s": 20.0}}


def cam_slowdown() -> float:
    """runtime.slowdown that makes the cam's mobilenet96 take CAM_COMPUTE_MS on this host.

    A fixed factor made the cam's compute time follow the host's int8 speed (0.3 ms
    here, 0.85 ms there): at 3x the compute, C* fell and the 1.6 x C* step ran the
    link at 40% utilisation, where queueing (which the static prediction leaves out)
    put the measured round trip 35-70% above it."""
    from lepton.demo.fleet import host_invoke_ms, host_slowdown

    return host_slowdown(CAM_COMPUTE_MS, host_invoke_ms())


WORKER = {"sources": [], "streams": [], "link": {"probe_interval_s": 2.0, "window_s": 8.0},
          "telemetry": {"interval_s": 1.0, "window_s": 20.0}}


def plans_since(db_path, since: float) -> list[dict]:
    """Plans the coordinator made after *since* (wall time): ts, plan, snapshot."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT ts, plan, snapshot FROM plans WHERE ts > ? ORDER BY id", [since]).fetchall()
    return [{"ts": ts, "plan": json.loads(plan), "snapshot": json.loads(snap)} for ts, plan, snap in rows]


def results_since(db_path, since: float) -> list[tuple[float, str, float | None]]:
    """(captured_at, computed_on, rtt_ms) of the cam's stored results captured after *since*."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT captured_at, computed_on, json_extract(payload, '$.rtt_ms') FROM results "
                          "WHERE device = 'cam' AND captured_at > ? ORDER BY seq", [since]).fetchall()


def served_by(plan: dict) -> dict[str, float]:
    return {r["device"]: r["share"] for r in plan["routes"].get(STREAM, []) if r["share"] > 0.01}


def figures_of(snapshot: dict) -> dict:
    """What the latency model works from: the cam's measured link, both compute times, L and R."""
    devices = {d["id"]: d for d in snapshot["devices"]}
    model = next(m for m in snapshot["models"] if m["name"] == "mobilenet96")
    stream = next(s for s in snapshot["streams"] if s["origin"] == "cam")
    return {"up": devices["cam"]["uplink_mbps"], "down": devices["cam"]["downlink_mbps"],
            "gpu": devices["gpu"], "cam_rtt": devices["cam"]["rtt_ms"],
            "compute_cam": model["compute_ms"]["cam"], "compute_gpu": model["compute_ms"]["gpu"],
            "L": stream["payload_bytes"], "R": stream.get("reply_bytes", 256)}


def crossover_mbps(f: dict) -> float:
    """C* where offloading and serving locally cost the same, with the cam's link at C both ways.

    Offloaded: 8L/C (up) + 8R/C (reply down) + the worker's side (8L/down_gpu
    + 8R/up_gpu + propagation) + compute on the worker; local: compute on the
    cam. Bits over Mbit/s give microseconds / 1000 = ms.
    """
    gpu = f["gpu"]
    worker_side = 8 * f["L"] / (gpu["downlink_mbps"] * 1e3) + 8 * f["R"] / (gpu["uplink_mbps"] * 1e3)
    propagation = (f["cam_rtt"] + gpu["rtt_ms"]) / 2
    saved = f["compute_cam"] - f["compute_gpu"] - worker_side - propagation
    assert saved > 0, f"offloading can never win with these figures: {f}"
    return 8 * (f["L"] + f["R"]) / (saved * 1e3)


def converged(f: dict, capacity: float) -> bool:
    """The cam's measured link is near the configured capacity (tbf delivers ~95% of it as goodput; at
    0.85 Mbit/s a probe once read 1.15x, its burst a larger share of a slow link). Still far from the
    step before (at least 1.6x away), so a plan that passes was made on this link."""
    return all(0.75 * capacity <= f[k] <= 1.25 * capacity for k in ("up", "down"))


def wait_plan(fleet, capacity: float, since: float, timeout: float = 90.0) -> dict:
    """The first plan after *since* made on links measured at *capacity*, with every figure known."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        for row in plans_since(fleet.coordinator_db, since):
            try:
                f = figures_of(row["snapshot"])
            except (StopIteration, KeyError):
                continue
            seen = f
            if converged(f, capacity):
                row["figures"] = f
                return row
        time.sleep(0.5)
        for name in ("cam", "gpu", "coordinator"):
            assert fleet.running(name), f"{name} exited:\n{fleet.log_tails()}"
    raise AssertionError(f"no plan on a link measured near {capacity} Mbit/s within {timeout:.0f} s; "
                         f"last figures: {seen}\n{fleet.log_tails()}")


def wait_served(fleet, device: str, since: float, n: int, timeout: float = 60.0) -> list[tuple]:
    """*n* results computed on *device* captured after *since* (wall time)."""
    deadline = time.monotonic() + timeout
    got: list[tuple] = []
    while time.monotonic() < deadline:
        got = [r for r in results_since(fleet.coordinator_db, since) if r[1] == device]
        if len(got) >= n:
            return got[:n]
        time.sleep(0.5)
    raise AssertionError(f"{len(got)}/{n} results computed on {device} within {timeout:.0f} s\n{fleet.log_tails()}")


def step(fleet, capacity: float) -> dict:
    """Shape the cam's link to *capacity*; wait for a plan made on it and for results served as planned."""
    fleet.shape("cam", up_mbps=capacity, down_mbps=capacity, burst_bytes=BURST)
    row = wait_plan(fleet, capacity, time.time())
    # A later plan may refine the measured figures; the decision is taken from the one in force.
    row = plans_since(fleet.coordinator_db, row["ts"] - 0.001)[-1]
    row["figures"] = figures_of(row["snapshot"])
    routes = served_by(row["plan"])
    where = max(routes, key=routes.get) if routes else "unserved"
    served = wait_served(fleet, where, row["ts"] + 1.0, SAMPLES) if where != "unserved" else []
    f = row["figures"]
    out = {"capacity": capacity, "where": where, "routes": routes, "figures": f, "crossover": crossover_mbps(f),
           # the one capacity both ways that costs what the measured up/down links cost: L up, R down
           "effective": (f["L"] + f["R"]) / (f["L"] / f["up"] + f["R"] / f["down"])}
    if where == "gpu":
        window = plans_since(fleet.coordinator_db, row["ts"] - 0.001)
        predicted = []
        for p in window:
            route = next(r for r in p["plan"]["routes"][STREAM] if r["device"] == "gpu") \
                if "gpu" in served_by(p["plan"]) else None
            if route:
                predicted.append(route["transfer_ms"] + route["propagation_ms"] + route["compute_ms"])
        out["predicted_ms"] = statistics.median(predicted)
        out["measured_ms"] = statistics.median(r[2] for r in served if r[2] is not None)
        out["error"] = out["measured_ms"] / out["predicted_ms"] - 1
    return out


def around(fleet, k: float, crossover: float, tried: list[dict], attempts: int = 3) -> dict:
    """A step at *k* x C*, on the side of the switch *k* names (above it for k > 1).

    C* rests on the cam's measured compute time, which the coordinator keeps
    from the cam's last invokes; when it moved between the step that measured C*
    and this one, the capacity can land on the other side of the new C*. The
    plan is then judged on that step's own figures (the caller checks every
    step), and the step is taken again at k x the new C*.
    """
    for _ in range(attempts):
        s = step(fleet, round(k * crossover, 2))
        tried.append(s)
        if (s["effective"] > s["crossover"]) == (k > 1):
            return s
        crossover = s["crossover"]
    raise AssertionError(f"C* kept moving: {[round(t['crossover'], 2) for t in tried]} Mbit/s; "
                         f"no step landed {'above' if k > 1 else 'below'} it")


def print_steps(steps: list[dict]) -> None:
    print("\ncapacity Mbit/s | measured up/down | served on | C* (D = L/C) | predicted ms | measured ms | error")
    for s in steps:
        f = s["figures"]
        print(f"{s['capacity']:>15} | {f['up']:6.2f}/{f['down']:6.2f}   | {s['where']:>9} | {s['crossover']:12.2f} | "
              f"{s.get('predicted_ms', float('nan')):12.1f} | {s.get('measured_ms', float('nan')):11.1f} | "
              f"{s.get('error', float('nan')):+.1%}")


def test_offload_latency_matches_the_plan_and_switches_at_the_crossover(fleet_factory, capsys, long_run):
    fleet = fleet_factory(devices=["cam", "gpu"])
    fleet.start_broker()
    fleet.start_counter()
    fleet.start_coordinator(overrides=COORDINATOR)
    fleet.shape("cam", up_mbps=OFFLOADED_AT[0], down_mbps=OFFLOADED_AT[0], burst_bytes=BURST)
    fleet.start_agent("gpu", overrides=WORKER)
    fleet.start_agent("cam", rate_hz=RATE_HZ, model="mobilenet96",
                      overrides={**CAM, "runtime": {"slowdown": cam_slowdown()}})

    offloaded = OFFLOADED_AT if long_run else OFFLOADED_AT[:1]  # 6 and 3 Mbit/s with --long
    steps = [step(fleet, c) for c in offloaded]
    crossover = steps[-1]["crossover"]
    tried: list[dict] = []  # every step taken, re-aimed ones included
    for k in AROUND:
        steps.append(around(fleet, k, crossover, tried))
        crossover = steps[-1]["crossover"]
    steps.append(step(fleet, OFFLOADED_AT[0]))

    with capsys.disabled():  # the figures are the point: shown with or without -s
        print_steps(steps[:len(offloaded)] + tried + steps[-1:])

    for s in steps[:len(offloaded)] + tried + steps[-1:]:
        # the plan works from the measured links, not the configured capacity: judge it on the same figures
        expected = "gpu" if s["effective"] > s["crossover"] else "cam"
        assert s["where"] == expected, (
            f"at {s['capacity']} Mbit/s (measured {s['effective']:.2f}) D = L/C puts the switch at "
            f"{s['crossover']:.2f} Mbit/s, so the stream belongs on {expected}; the plan served it on {s['routes']}")
    # Both sides of the switch were exercised, and it went both ways.
    assert [s["where"] for s in steps] == ["gpu"] * (len(offloaded) + 1) + ["cam", "gpu"]
    for s in steps[:len(offloaded) + 1]:
        assert abs(s["error"]) <= TOLERANCE, (
            f"at {s['capacity']} Mbit/s measured {s['measured_ms']:.1f} ms against {s['predicted_ms']:.1f} ms predicted")
