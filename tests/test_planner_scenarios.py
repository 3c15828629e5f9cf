"""Planner vs greedy where fast capacity is contended, and the synthetic fleets' scenarios."""

from __future__ import annotations

import hashlib
import json

import pytest

from lepton.coordinator.planner import greedy, plan
from lepton.coordinator.planner.synthetic import SCENARIOS, random_fleet
from lepton.coordinator.snapshot import load_snapshot


def _dev(id, cpu, mem=1024.0):
    return {"id": id, "cpu": cpu, "memory_mb": mem, "uplink_mbps": 100.0, "downlink_mbps": 100.0, "rtt_ms": 10.0}


def test_one_box_for_two_cameras_goes_to_the_stream_that_gains_most_per_ms_of_it():
    """A Jetson-class box (cpu 0.25: 200 ms of inference per second under the 0.8 cap) and two cameras:
    a Pi-class camera at 10 Hz through a light model (35 ms at home, 30.2 ms on the box) and a camera
    board at 2 Hz through a heavier one (300 ms at home; the Pi has no memory for it, so the box is the
    board's only way out). The box takes 20 ms per input of either: it can carry all of the Pi's stream
    (200 ms/s), or all of the board's (40 ms/s) and 80% of the Pi's.

    Greedy takes streams by decreasing rate: the Pi's stream first, its cheapest route is the box
    (30.2 < 35), which it fills; the board then runs at home, 300 ms. The optimum gives the box to the
    board's stream, which saves 270 ms per input against the Pi's 4.8, for the same 20 ms of box time."""
    devices = [_dev("box", 0.25), _dev("pi", 2.0, mem=150.0), _dev("board", 1.0)]
    snap = {
        "devices": devices,
        "models": [{"name": "light", "memory_mb": 100.0, "compute_ms": {"box": 20.0, "pi": 35.0, "board": 210.0}},
                   {"name": "heavy", "memory_mb": 200.0, "compute_ms": {"box": 20.0, "pi": 35.0, "board": 300.0}}],
        "streams": [
            {"id": "pi-cam", "origin": "pi", "model": "light", "rate_hz": 10.0, "payload_bytes": 1000},
            {"id": "board-cam", "origin": "board", "model": "heavy", "rate_hz": 2.0, "payload_bytes": 1000},
        ],
        "current": {"pi": ["light"], "board": ["heavy"], "box": ["light", "heavy"]},
        "params": {"migration_penalty_ms": 0.0, "mip_gap": 0.0},
    }
    # offloaded: 1000 bytes up and down at 100 Mbit/s, 256 back, (10 + 10) / 2 ms, 20 ms on the box
    away = 8 * (1000 + 1000 + 256 + 256) / 100 / 1000 + 10.0 + 20.0  # 30.2 ms
    w_pi, w_board = 10.0 / 6.0, 2.0 / 6.0  # rate / mean rate
    greedy_obj = (w_pi * away + w_board * 300.0) / 2  # 75.17 ms
    best_obj = (w_board * away + w_pi * (0.8 * away + 0.2 * 35.0)) / 2  # 31.00 ms

    g = greedy(snap)
    assert g.objective == pytest.approx(greedy_obj, rel=1e-6)
    assert [(r.device, round(r.share, 6)) for r in g.routes["pi-cam"]] == [("box", 1.0)]
    assert [(r.device, round(r.share, 6)) for r in g.routes["board-cam"]] == [("board", 1.0)]

    p = plan(snap)
    assert p.objective == pytest.approx(best_obj, rel=1e-6)
    assert p.objective <= 0.45 * g.objective  # 59% better than greedy
    assert {r.device: round(r.share, 6) for r in p.routes["board-cam"]} == {"box": 1.0}
    assert {r.device: round(r.share, 6) for r in p.routes["pi-cam"]} == {"box": 0.8, "pi": 0.2}


def _digest(fleet: dict) -> str:
    return hashlib.sha256(json.dumps(fleet, sort_keys=True).encode()).hexdigest()


def test_the_default_fleet_is_unchanged_by_the_scenarios():
    """random_fleet's default output, bit for bit, as it was before scenarios existed (the benchmark's
    default figures and other tests depend on it)."""
    f = random_fleet(60, n_models=5, seed=1)
    assert f["devices"][0] == {"id": "pi-0", "cpu": 2.01, "memory_mb": 3599.0, "uplink_mbps": 26.23,
                               "downlink_mbps": 192.19, "rtt_ms": 16.57}
    assert f["streams"][0] == {"id": "s-0", "origin": "pi-0", "model": "model-2", "rate_hz": 1.998,
                               "payload_bytes": 45292}
    assert _digest(f) == "0a327f729ea1603351ecb381023fb86991aa3dfc85a6817f6fd81587640bf43a"
    assert _digest(random_fleet(100, n_models=20, seed=1)) == (
        "263502889e8f2bcf7793111eeb417208428bd1fbfa6d33573418aaf5414c65cf")
    assert random_fleet(60, n_models=5, seed=1, scenario="default", capacity=3.0) == f


@pytest.mark.parametrize("scenario, cameras", [("provisioned", {"small", "pi"}), ("provisioned-weak", {"small"})])
@pytest.mark.parametrize("capacity", [0.8, 1.5])
def test_provisioned_fleets_are_cameras_plus_boxes_sized_to_the_demand(scenario, cameras, capacity):
    f = random_fleet(300, n_models=8, seed=4, scenario=scenario, capacity=capacity)
    kinds = {d["id"]: d["id"].split("-")[0] for d in f["devices"]}
    boxes = [d for d in f["devices"] if kinds[d["id"]] == "jetson"]
    assert len(f["devices"]) == 300 and boxes
    assert {kinds[s["origin"]] for s in f["streams"]} <= cameras
    assert len(f["streams"]) == 300 - len(boxes)  # every camera one stream, the boxes none
    assert {s["payload_bytes"] for s in f["streams"]} and min(s["payload_bytes"] for s in f["streams"]) >= 10_000
    # the boxes' CPU under the cap carries about `capacity` of the cameras' demand on them
    models = {m["name"]: m for m in f["models"]}
    demand = sum(s["rate_hz"] * sum(models[s["model"]]["compute_ms"][b["id"]] for b in boxes) / len(boxes)
                 for s in f["streams"])
    supply = sum(1000.0 * b["cpu"] * 0.8 for b in boxes)
    assert 0.75 * capacity <= supply / demand <= 1.5 * capacity
    snap = load_snapshot(f)
    assert snap.devices  # a valid snapshot


def test_on_a_small_provisioned_fleet_the_plan_is_never_worse_than_greedy():
    f = random_fleet(120, n_models=6, seed=2, scenario="provisioned-weak", capacity=0.8, time_limit_s=5.0)
    p, g = plan(f), greedy(f)
    assert p.objective <= g.objective + 1e-9


def test_unknown_scenario_is_refused():
    assert SCENARIOS[0] == "default"
    with pytest.raises(ValueError, match="unknown scenario"):
        random_fleet(10, scenario="nope")
