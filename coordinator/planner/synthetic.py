"""Seeded synthetic fleets: for the planner benchmark, tests and demos.

A fleet mixes four kinds of device: small camera boards (Pi Zero-class, on
Wi-Fi or LTE: slow, little memory, a limited uplink and a long way to the
broker), Pi-class boards, Jetson-class boxes on wired site networks, and a
few edge/cloud servers next to the broker (fast links, a few ms away).
Links and round-trip times are the device's path to the broker, which sits
with the coordinator in the cloud (docs/planner.md, latency model), so they
are drawn per kind, log-uniform within the kind's range: a camera board and
a server in a data centre do not share one link distribution.

Models are image models (60%: 10-80 KB preprocessed inputs, 10-300 MB,
5-60 ms base inference time) or sensor models (a few KB of window, 1-10 MB,
0.5-5 ms), like the shipped zoo (mobilenet96/224 vs vibration, digits);
each device scales the base time by its slowness, with noise. Every device
originates one stream. ``current`` holds each stream's model on its origin
where it fits, as a fleet that starts by running its own models would.

Scenario "provisioned" (opt-in; ``scenario="default"`` is the fleet above,
unchanged): a camera fleet whose inference boxes were bought for it. Every
stream is a camera's, through an image model (same sizes, times and rates
as above); the cameras are the small boards and Pi-class boards of the
default mix, in its proportions (40:45), and the rest of the fleet is
Jetson-class boxes, added one at a time until their CPU under the
utilisation cap could run ``capacity`` (default 0.9) of what the cameras
ask for, at each model's base time scaled by the box's speed. No server
sits next to the broker. That is how an operator sizes a deployment:
"one Jetson per N cameras", with N chosen so the boxes run near their cap
when the cameras send everything, because spare accelerators cost money.
The cameras can still run their models, slowly (4-8x, 1.5-3x), so a
capacity below 1 leaves some inference on them and the boxes are contended;
above about 1.5 there is room for every stream worth offloading.
``scenario="provisioned-weak"`` is the same with small camera boards only
(cheap Pi Zero-class cameras): their own CPUs are 4-8x slow and there are no
Pi-class boards with spare cores to offload to, so the boxes are all the
fast capacity there is. ``n_devices`` counts cameras and boxes together.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# kind: share of the fleet, cpu (cores), memory MB, slowness factor,
#       uplink Mbit/s, downlink Mbit/s, rtt to the broker ms (ranges)
KINDS = {
    "small": (0.40, (0.5, 1.0), (256, 512), (4.0, 8.0), (2, 20), (10, 100), (20, 100)),
    "pi": (0.45, (2.0, 4.0), (1024, 4096), (1.5, 3.0), (5, 50), (20, 300), (10, 60)),
    "jetson": (0.12, (4.0, 6.0), (4096, 8192), (0.25, 0.5), (20, 200), (50, 500), (5, 40)),
    "server": (0.03, (8.0, 16.0), (16384, 32768), (0.1, 0.2), (500, 1000), (500, 1000), (1, 5)),
}
IMAGE_SHARE = 0.6
# (base inference ms, memory MB, payload bytes) ranges per model class
IMAGE = ((5, 60), (10, 300), (10_000, 80_000))
SENSOR = ((0.5, 5), (1, 10), (500, 8_000))


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


SCENARIOS = ("default", "provisioned", "provisioned-weak")
CAMERA_KINDS = {"provisioned": ("small", "pi"), "provisioned-weak": ("small",)}


def random_fleet(n_devices: int, n_models: int = 20, seed: int = 0, *, scenario: str = "default",
                 capacity: float = 0.9, **params: Any) -> dict[str, Any]:
    """A snapshot dict of a heterogeneous fleet; `params` go to the snapshot's params.

    `scenario` picks the fleet (module docstring); `capacity` is the provisioned
    scenarios' accelerator capacity over the cameras' demand (ignored by "default").
    """
    if scenario == "default":
        return _default_fleet(n_devices, n_models, seed, params)
    if scenario not in CAMERA_KINDS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    if capacity <= 0:
        raise ValueError("capacity must be > 0")
    return _provisioned_fleet(n_devices, n_models, seed, CAMERA_KINDS[scenario], capacity, params)


def _device(rng: np.random.Generator, kind: str, i: int) -> tuple[dict[str, Any], float]:
    """One device of a kind, drawn as the default fleet draws it: (spec, slowness)."""
    _, cpu, mem, factor, up, down, rtt = KINDS[kind]
    slow = rng.uniform(*factor)
    return {
        "id": f"{kind}-{i}", "cpu": round(float(rng.uniform(*cpu)), 2),
        "memory_mb": float(rng.integers(*mem)),
        "uplink_mbps": round(float(_loguniform(rng, *up, 1)[0]), 2),
        "downlink_mbps": round(float(_loguniform(rng, *down, 1)[0]), 2),
        "rtt_ms": round(float(_loguniform(rng, *rtt, 1)[0]), 2),
    }, slow


def _provisioned_fleet(n_devices: int, n_models: int, seed: int, camera_kinds: tuple[str, ...], capacity: float,
                       params: dict[str, Any]) -> dict[str, Any]:
    """Cameras with image streams, plus Jetson-class boxes sized to `capacity` x their demand."""
    rng = np.random.default_rng(seed)
    share = np.array([KINDS[k][0] for k in camera_kinds])
    kinds = rng.choice(camera_kinds, size=n_devices, p=share / share.sum())
    drawn = [_device(rng, str(k), i) for i, k in enumerate(kinds)]
    base = _loguniform(rng, *IMAGE[0], n_models)
    mem = _loguniform(rng, *IMAGE[1], n_models)
    payload = _loguniform(rng, *IMAGE[2], n_models).astype(int)
    popularity = 1.0 / np.arange(1, n_models + 1)
    chosen = rng.choice(n_models, size=n_devices, p=popularity / popularity.sum())
    rates = _loguniform(rng, 0.5, 10, n_devices)
    demand = np.cumsum(rates * base[chosen])  # base-time ms per second of the first i+1 cameras
    cap = float(params.get("utilization_cap", 0.8))
    boxes, supply = [], 0.0  # supply: base-time ms per second the boxes run under the cap
    while len(boxes) < n_devices - 1 and supply < capacity * demand[n_devices - len(boxes) - 1]:
        spec, slow = _device(rng, "jetson", n_devices - len(boxes) - 1)
        boxes.append((spec, slow))
        supply += 1000.0 * spec["cpu"] * cap / slow
    n_cams = n_devices - len(boxes)
    devices = drawn[:n_cams] + boxes[::-1]
    specs = [d for d, _ in devices]
    models = _models(rng, specs, np.array([s for _, s in devices]), base, mem)
    streams, current = _streams(specs[:n_cams], chosen, rates, payload, mem)
    return {"devices": specs, "models": models, "streams": streams, "current": current, "params": dict(params)}


def _models(rng: np.random.Generator, devices: list[dict[str, Any]], slow: np.ndarray, base: np.ndarray,
            mem: np.ndarray) -> list[dict[str, Any]]:
    """Each model's compute time on each device: its base time x the device's slowness, with noise."""
    models = []
    for m in range(len(base)):
        noise = rng.uniform(0.8, 1.25, len(devices))
        times = np.round(base[m] * slow * noise, 3)
        models.append({
            "name": f"model-{m}", "memory_mb": round(float(mem[m]), 1),
            "compute_ms": {d["id"]: float(t) for d, t in zip(devices, times)},
        })
    return models


def _streams(origins: list[dict[str, Any]], chosen: np.ndarray, rates: np.ndarray, payload: np.ndarray,
             mem: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """One stream per origin, and ``current``: its model held on its origin where it fits."""
    streams, current = [], {}
    for i, d in enumerate(origins):
        m = int(chosen[i])
        streams.append({
            "id": f"s-{i}", "origin": d["id"], "model": f"model-{m}", "rate_hz": round(float(rates[i]), 3),
            "payload_bytes": int(payload[m]),
        })
        if mem[m] <= d["memory_mb"]:
            current[d["id"]] = [f"model-{m}"]
    return streams, current


def _default_fleet(n_devices: int, n_models: int, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(KINDS), size=n_devices, p=[k[0] for k in KINDS.values()])
    drawn = [_device(rng, str(kind), i) for i, kind in enumerate(kinds)]
    devices, slow = [d for d, _ in drawn], np.array([s for _, s in drawn])
    image = rng.random(n_models) < IMAGE_SHARE
    pick = lambda i: np.where(image, _loguniform(rng, *IMAGE[i], n_models), _loguniform(rng, *SENSOR[i], n_models))  # noqa: E731
    base, mem, payload = pick(0), pick(1), pick(2).astype(int)
    models = _models(rng, devices, slow, base, mem)
    popularity = 1.0 / np.arange(1, n_models + 1)
    chosen = rng.choice(n_models, size=n_devices, p=popularity / popularity.sum())
    rates = _loguniform(rng, 0.5, 10, n_devices)
    streams, current = _streams(devices, chosen, rates, payload, mem)
    return {"devices": devices, "models": models, "streams": streams, "current": current, "params": dict(params)}
