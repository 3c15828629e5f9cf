"""Seeded synthetic fleets: for the planner benchmark, tests and demos.

A fleet mixes four kinds of device (small boards, Pi-class, Jetson-class,
and a few edge servers) with log-uniform links and round-trip times; each
model has a base inference time scaled per device by its speed, with noise.
Every device originates one stream. ``current`` holds each stream's model
on its origin where it fits, as a fleet that starts by running its own
models would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# kind: (share of the fleet, cpu range, memory MB range, slowness factor range)
KINDS = {
    "small": (0.40, (0.5, 1.0), (256, 512), (4.0, 8.0)),
    "pi": (0.45, (2.0, 4.0), (1024, 4096), (1.5, 3.0)),
    "jetson": (0.12, (4.0, 6.0), (4096, 8192), (0.25, 0.5)),
    "server": (0.03, (8.0, 16.0), (16384, 32768), (0.1, 0.2)),
}


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def random_fleet(n_devices: int, n_models: int = 20, seed: int = 0, **params: Any) -> dict[str, Any]:
    """A snapshot dict of a heterogeneous fleet; `params` go to the snapshot's params."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(KINDS), size=n_devices, p=[k[0] for k in KINDS.values()])
    devices, slow = [], np.empty(n_devices)
    for i, kind in enumerate(kinds):
        _, cpu, mem, factor = KINDS[kind]
        slow[i] = rng.uniform(*factor)
        devices.append({
            "id": f"{kind}-{i}", "cpu": round(float(rng.uniform(*cpu)), 2),
            "memory_mb": float(rng.integers(*mem)),
            "uplink_mbps": round(float(_loguniform(rng, 5, 100, 1)[0]), 2),
            "downlink_mbps": round(float(_loguniform(rng, 10, 300, 1)[0]), 2),
            "rtt_ms": round(float(_loguniform(rng, 2, 80, 1)[0]), 2),
        })
    base = _loguniform(rng, 3, 60, n_models)
    mem = _loguniform(rng, 4, 300, n_models)
    image = rng.random(n_models) < 0.6
    payload = np.where(image, rng.integers(8_000, 80_000, n_models), rng.integers(500, 8_000, n_models))
    models = []
    for m in range(n_models):
        noise = rng.uniform(0.8, 1.25, n_devices)
        times = np.round(base[m] * slow * noise, 3)
        models.append({
            "name": f"model-{m}", "memory_mb": round(float(mem[m]), 1),
            "compute_ms": {d["id"]: float(t) for d, t in zip(devices, times)},
        })
    popularity = 1.0 / np.arange(1, n_models + 1)
    chosen = rng.choice(n_models, size=n_devices, p=popularity / popularity.sum())
    rates = _loguniform(rng, 0.5, 10, n_devices)
    streams, current = [], {}
    for i, d in enumerate(devices):
        m = int(chosen[i])
        streams.append({
            "id": f"s-{i}", "origin": d["id"], "model": f"model-{m}", "rate_hz": round(float(rates[i]), 3),
            "payload_bytes": int(payload[m]),
        })
        if mem[m] <= d["memory_mb"]:
            current[d["id"]] = [f"model-{m}"]
    return {"devices": devices, "models": models, "streams": streams, "current": current, "params": dict(params)}
