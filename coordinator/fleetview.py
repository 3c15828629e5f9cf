"""The live fleet as a planner snapshot (the JSON ``lepton plan --snapshot`` reads).

Everything comes from the fleet registry, so ``lepton coordinator snapshot``
writes exactly what the rebalancer planned on, and any live decision can be
replayed offline. Where a figure comes from, in order of trust:

- compute time of model m on device d: the median of d's recent measurements
  (telemetry, reported invoke time); else the model's bench profile from the
  registry (else ``default_compute_ms``) times the device's ``compute_scale``:
  how d's measured times of other models compare with their bench profiles,
  or, for a device that has run nothing yet, the median of devices of its
  kind (arch, cores, CPU share, threads, runtime and version, memory), else
  1: the first device of a kind is tried at the bench profile's speed (it
  may be planned streams it gives back once it measured itself); the rest
  of its kind are then known. The bench profile was measured on the machine
  that built the zoo; taken as it was, a camera that had just joined looked
  as fast as that machine, was planned a score of streams, and lost them all
  two seconds later when it measured 300x that.
- links: the device's measured rtt / up / down; else the hints in its birth
  (``capabilities.link``); else ``DEFAULT_LINK``.
- streams: from the devices' births, at the rate telemetry measured once it
  has (else the configured one); a stream whose origin is not online
  produces nothing and is left out; so is one whose model the registry lacks.
- current: the models each device reported loaded.
- routes: the devices each stream is served on by the placement last
  published to its origin (``params.route_hold`` keeps a stream there unless
  another device is that much faster).
- failures count per model version, for ``exclude_failed_s``: a device whose
  newest version of a model failed there is to hold the newest that did not
  (``FleetView.versions``); a (model, device) where every version in the
  registry failed gets no compute time there (and the model no default),
  which the snapshot format reads as "cannot run on that device": the next
  plan avoids it.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field

from lepton.coordinator.registry import FleetRegistry

DEFAULT_LINK = {"up_mbps": 10.0, "down_mbps": 10.0, "rtt_ms": 20.0}  # a modest broadband link


@dataclass
class FleetView:
    """A snapshot (plain JSON) plus how its stream ids map back to (origin, stream)."""

    snapshot: dict
    streams: dict[str, tuple[str, str]] = field(default_factory=dict)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (model, device): no version of it can run there
    # (device, model) -> the models row to hold there instead of the newest, which failed there
    versions: dict[tuple[str, str], dict] = field(default_factory=dict)
    known: dict[str, dict] = field(default_factory=dict)  # newest version of each model, read with the rest
    skipped: list[str] = field(default_factory=list)  # why a stream was left out


def stream_keys(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Snapshot ids for (origin, stream): the bare stream id where it is unique in the fleet, else
    ``origin.stream``, made unique again where that equals another stream's own id."""
    counts: dict[str, int] = {}
    for _, sid in pairs:
        counts[sid] = counts.get(sid, 0) + 1
    keys = {(o, s): s for o, s in pairs if counts[s] == 1}
    used = set(keys.values())
    for o, s in sorted(p for p in pairs if counts[p[1]] > 1):
        key, salt = _qualified(o, s), 0
        while key in used:  # e.g. device "cam" stream "door" beside device "gate" stream "cam.door"
            salt += 1
            key = f"{s[:55]}.{hashlib.sha1(f'{o}/{s}/{salt}'.encode()).hexdigest()[:8]}"
        used.add(key)
        keys[(o, s)] = key
    return keys


def _qualified(origin: str, stream: str) -> str:
    key = f"{origin}.{stream}"
    if len(key) <= 64:
        return key
    return f"{stream[:55]}.{hashlib.sha1(origin.encode()).hexdigest()[:8]}"  # ids are at most 64 characters


def build(registry: FleetRegistry, params: dict, default_compute_ms: float = 50.0,
          exclude_failed_s: float = 600.0, now: float | None = None) -> FleetView:
    """The registry's fleet as a snapshot dict, ready for ``load_snapshot``."""
    now = now or time.time()
    devices = registry.devices()
    online = {d["id"] for d in devices if d["liveness"] == "online"}
    versions = registry.known_versions()  # one read: the newest, and the fallbacks, from the same rows
    known = {name: rows[0] for name, rows in versions.items()}
    links = registry.links()
    view = FleetView(snapshot={}, known=known)
    measured = registry.compute()
    placements = registry.placements()  # one read: what devices hold (reported) and where streams go (desired)
    scales = compute_scales([d for d in devices if d["capabilities"]], measured, known)
    snap_devices = [_device(d, links.get(d["id"]), d["id"] in online, scales[d["id"]])
                    for d in devices if d["capabilities"]]
    ids = [d["id"] for d in snap_devices]
    snap_streams = _streams(registry, view, online, set(ids), known)
    view.excluded, view.versions = _failed(registry, versions, ids, now - exclude_failed_s)
    used = sorted({s["model"] for s in snap_streams})
    measured = {k: v for k, v in measured.items() if k[0] in ids}
    snap_models = [_model(known[name], measured, default_compute_ms, view.excluded, ids, scales) for name in used]
    view.snapshot = {
        "v": 1,
        "ts": now,
        "devices": snap_devices,
        "models": snap_models,
        "streams": snap_streams,
        "current": _current(placements, set(ids), set(used)),
        "routes": _routes(placements, view, set(ids)),
        "params": params,
    }
    return view


def _routes(placements: dict[str, dict], view: FleetView, devices: set[str]) -> dict[str, list[str]]:
    """Stream key -> the devices the placement in force (as last published to its origin) serves it on."""
    out: dict[str, list[str]] = {}
    for key, (origin, sid) in view.streams.items():
        desired = (placements.get(origin) or {}).get("desired")
        if not desired:
            continue
        on = sorted({r["device"] for r in json.loads(desired).get("routes", {}).get(sid) or []
                     if r.get("device") in devices})
        if on:
            out[key] = on
    return out


def _failed(registry: FleetRegistry, versions: dict[str, list[dict]], ids: list[str], since: float):
    """From the failures since *since*: the (model, device) pairs no known version can serve (excluded), and
    per (device, model) the newest version that did not fail there, where the newest did. A device that
    refuses a new version (bad signature, cannot load it) keeps the one before, instead of the stream
    moving to other devices that would be sent the same new version."""
    bad: dict[tuple[str, str], set[str]] = {}
    for f in registry.failures(since=since):
        if f["device"] in ids:
            bad.setdefault((f["model"], f["device"]), set()).add(f["version"] or "")
    excluded, fallback = [], {}
    for (model, dev), failed in sorted(bad.items()):
        rows = versions.get(model, [])
        usable = [r for r in rows if r["version"] not in failed]
        if rows and not usable:
            excluded.append((model, dev))
        elif usable and usable[0]["version"] != rows[0]["version"]:
            fallback[(dev, model)] = usable[0]
    return excluded, fallback


def _streams(registry: FleetRegistry, view: FleetView, online: set[str], planned: set[str],
             known: dict) -> list[dict]:
    """Streams of online devices in the snapshot whose model the registry has; fills ``view.streams``
    and ``view.skipped``."""
    streams = []
    for row in registry.streams():
        if row["device"] not in online:
            continue
        if row["device"] not in planned:  # a birth without capabilities: the device is not in the snapshot
            view.skipped.append(f"{row['device']}/{row['stream']}: the device announced no capabilities")
            continue
        if row["model"] not in known:
            view.skipped.append(f"{row['device']}/{row['stream']}: model {row['model']} is not in the registry")
            continue
        streams.append(row)
    keys = stream_keys([(r["device"], r["stream"]) for r in streams])
    out = []
    for row in streams:
        key = keys[(row["device"], row["stream"])]
        view.streams[key] = (row["device"], row["stream"])
        rate = row["rate_hz"] if row.get("measured_hz") is None else row["measured_hz"]
        spec = {"id": key, "origin": row["device"], "model": row["model"], "rate_hz": rate,
                "payload_bytes": row["payload_bytes"], "reply_bytes": row["reply_bytes"]}
        if row["slo_ms"] is not None:
            spec["slo_ms"] = row["slo_ms"]
        out.append(spec)
    return out


def compute_scales(devices: list[dict], measured: dict[tuple[str, str], float], known: dict) -> dict[str, float]:
    """Per device, its compute time against the bench profiles (see the module doc)."""
    ratios: dict[str, list[float]] = {}
    for (dev, model), ms in measured.items():
        bench = (known.get(model) or {}).get("compute_ms")
        if bench and bench > 0 and ms and ms > 0:
            ratios.setdefault(dev, []).append(ms / bench)
    own = {dev: statistics.median(r) for dev, r in ratios.items()}
    kind = {d["id"]: _kind(json.loads(d["capabilities"])) for d in devices}
    of_kind: dict[tuple, list[float]] = {}
    for dev, scale in own.items():
        if dev in kind:
            of_kind.setdefault(kind[dev], []).append(scale)
    out = {}
    for d in devices:
        dev = d["id"]
        peers = of_kind.get(kind[dev])
        scale = own.get(dev) or (statistics.median(peers) if peers else 1.0)
        out[dev] = float(f"{scale:.4g}")
    return out


def _kind(caps: dict) -> tuple:
    """Devices alike enough to run a model alike: arch, cores, CPU share, interpreter threads, runtime and its
    version (which names an emulated slowdown), memory (to a power of 2)."""
    memory = caps.get("memory_mb") or 0
    return (caps.get("arch"), caps.get("cpu_count"), caps.get("cpu_share"), caps.get("threads"), caps.get("runtime"),
            caps.get("runtime_version"), round(math.log2(memory)) if memory > 0 else 0)


def _device(row: dict, link: dict | None, online: bool, compute_scale: float = 1.0) -> dict:
    caps = json.loads(row["capabilities"])
    hints = caps.get("link") or {}
    measured = link or {}

    def pick(key: str) -> float:
        for source in (measured, hints, DEFAULT_LINK):
            value = source.get(key)
            if value is not None and value > 0:
                return float(value)
        return DEFAULT_LINK[key]

    return {
        "id": row["id"],
        "cpu": float(caps.get("cpu_share") or caps.get("cpu_count") or 1),
        "memory_mb": float(caps.get("memory_mb") or 0),
        "uplink_mbps": pick("up_mbps"),
        "downlink_mbps": pick("down_mbps"),
        "rtt_ms": pick("rtt_ms"),
        "online": online,
        "compute_scale": compute_scale,
    }


def _model(row: dict, measured: dict, default_ms: float, excluded: list[tuple[str, str]], devices: list[str],
           scales: dict[str, float]) -> dict:
    compute = {dev: ms for (dev, model), ms in measured.items() if model == row["name"] and ms and ms > 0}
    default = float(row["compute_ms"] or default_ms)
    banned = {dev for model, dev in excluded if model == row["name"]}
    size_mb = (row["size"] or 0) / 1e6
    spec = {
        "name": row["name"],
        "memory_mb": float(row["memory_mb"] or round(2 * size_mb + 8, 1)),  # no estimate: weights twice + runtime
        "compute_ms": dict(sorted(compute.items())),
        "default_compute_ms": default,
    }
    if banned:
        # The snapshot's way to say "cannot run there": no compute_ms entry and no default.
        spec["compute_ms"] = {d: compute.get(d, default * scales.get(d, 1.0)) for d in devices if d not in banned}
        spec["default_compute_ms"] = None
    return spec


def _current(placements: dict[str, dict], devices: set[str], models: set[str]) -> dict[str, list[str]]:
    current: dict[str, list[str]] = {}
    for dev, row in placements.items():
        if dev not in devices or not row.get("reported"):
            continue
        held = json.loads(row["reported"]).get("models", {})
        loaded = sorted(name for name, state in held.items() if state.get("state") == "loaded" and name in models)
        if loaded:
            current[dev] = loaded
    return current
