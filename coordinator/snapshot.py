"""The fleet snapshot: everything the planner needs, as one JSON document.

A snapshot is what ``lepton plan --snapshot FILE`` reads and what
``lepton coordinator snapshot`` writes from the live fleet, so any placement
decision can be replayed and explained offline. Units are milliseconds,
megabytes and Mbit/s throughout.

Decisions written down here (and in docs/planner.md):

- A model runs on a device with the compute time ``compute_ms[device]``
  (measured by telemetry, or a bench profile). Where that entry is missing it
  runs in ``default_compute_ms`` times the device's ``compute_scale`` (how
  its measured times compare with the bench profiles; 1 by default) if the
  model gives one. The core count does not scale it: a single inference
  runs on one thread, so a device's core count sets how many inferences per
  second it sustains (the CPU constraint), not how long one takes. With
  neither, the model cannot run on that device.
- Every id named anywhere (a stream's origin or model, a ``compute_ms`` key,
  a ``current`` or ``routes`` entry) must be declared; a typo is an error, never a silent
  "device unknown, skip".
- A link of 0 Mbit/s means "no link": that device neither offloads nor
  serves offloaded inputs. A device with ``cpu`` 0 serves nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lepton.errors import ConfigError, validation_message
from lepton.protocol.topics import ID_PATTERN

Id = Annotated[str, Field(pattern=ID_PATTERN.pattern, description="id: letters, digits, _ . -; at most 64")]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]

SNAPSHOT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSpec(_Strict):
    """A device of the fleet: its capacity and its link to the broker."""

    id: Id
    cpu: NonNeg = Field(description="usable cores for inference (1.0 = one full core); 0 serves nothing")
    memory_mb: NonNeg = Field(description="memory available for models, MB")
    uplink_mbps: NonNeg = Field(description="device -> broker capacity, Mbit/s (0: no link)")
    downlink_mbps: NonNeg = Field(description="broker -> device capacity, Mbit/s (0: no link)")
    rtt_ms: NonNeg = Field(0.0, description="round-trip time device <-> broker, ms")
    online: bool = Field(True, description="offline devices serve nothing and their streams are not planned")
    compute_scale: Positive = Field(
        1.0, description="inference time here against the bench profile, for a model with no compute_ms entry "
        "for this device: default_compute_ms x compute_scale")


class ModelSpec(_Strict):
    """A model: its memory footprint and its inference time per device."""

    name: Id
    memory_mb: NonNeg = Field(description="memory the loaded model takes, MB")
    compute_ms: dict[str, NonNeg] = Field(
        default_factory=dict, description="inference time of one input per device id, ms (measured or profiled)"
    )
    default_compute_ms: NonNeg | None = Field(
        None, description="inference time on devices missing from compute_ms; unset: the model cannot run there"
    )


class StreamSpec(_Strict):
    """A data stream: inputs produced at ``origin`` that ``model`` must process."""

    id: Id
    origin: Id = Field(description="device producing the inputs")
    model: Id = Field(description="model that processes them")
    rate_hz: NonNeg = Field(description="inputs per second")
    payload_bytes: Annotated[int, Field(ge=0, description="bytes of one preprocessed input sent when offloaded")]
    reply_bytes: Annotated[int, Field(ge=0, description="bytes of one reply sent back")] = 256
    slo_ms: Positive | None = Field(None, description="latency bound: devices whose static latency exceeds it are excluded")


class Params(_Strict):
    """Planner parameters."""

    utilization_cap: float = Field(
        0.8, gt=0, le=1, description="fraction of each device's CPU time and link capacity the plan may use"
    )
    migration_penalty_ms: NonNeg = Field(
        20.0, description="cost of one model load not in `current`, in ms of latency on one average-rate stream"
    )
    unserved_penalty_ms: Positive = Field(
        10000.0, description="cost of leaving a stream unserved, ms (keep it above any real latency)"
    )
    route_hold: float = Field(
        0.05, ge=0, le=1, description="a stream that has `routes` moves to another device only if it is more "
        "than this fraction faster there (its new routes cost 1 + route_hold times their latency), so that "
        "measurement noise does not move streams between equal devices; 0: no hold"
    )
    time_limit_s: Positive = Field(5.0, description="wall-clock budget of the solver")
    queueing: bool = Field(False, description="add the M/D/1 queueing delay (piecewise-linear) to the objective")
    candidates_k: Annotated[int, Field(ge=1, le=1024)] = Field(
        16, description="devices considered per stream: the K of lowest static latency (+ origin, + current holders)"
    )
    mip_gap: float = Field(1e-4, ge=0, lt=1, description="relative optimality gap at which the MILP stops")
    exact_max_binaries: Annotated[int, Field(ge=0)] = Field(
        1000, description="up to this many x[m,d] the whole MILP is branched on; above it, relax-and-fix"
    )
    large_fleet_streams: Annotated[int, Field(ge=1)] = Field(
        4000, description="above this many active streams: greedy, then blocks re-solved as MILPs (path lns)"
    )
    block_streams: Annotated[int, Field(ge=1)] = Field(
        1000, description="streams per block on the large-fleet path"
    )


class Snapshot(_Strict):
    """The fleet at one instant: devices, models, streams, current placement, parameters."""

    v: Literal[1] = SNAPSHOT_VERSION
    ts: NonNeg | None = Field(None, description="when the snapshot was taken, Unix seconds")
    devices: list[DeviceSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    streams: list[StreamSpec] = Field(default_factory=list)
    current: dict[str, list[str]] = Field(default_factory=dict, description="device id -> models it holds now")
    routes: dict[str, list[str]] = Field(
        default_factory=dict, description="stream id -> devices the plan in force serves it on (see params.route_hold)")
    params: Params = Field(default_factory=Params)

    @model_validator(mode="after")
    def _references(self) -> "Snapshot":
        for field, ids in (
            ("devices", [d.id for d in self.devices]),
            ("models", [m.name for m in self.models]),
            ("streams", [s.id for s in self.streams]),
        ):
            dups = sorted(k for k, n in Counter(ids).items() if n > 1)
            if dups:
                raise ValueError(f"{field}: duplicate id {dups[0]!r}")
        devices = {d.id for d in self.devices}
        models = {m.name for m in self.models}
        for i, s in enumerate(self.streams):
            if s.origin not in devices:
                raise ValueError(f"streams[{i}].origin: unknown device {s.origin!r} (stream {s.id!r})")
            if s.model not in models:
                raise ValueError(f"streams[{i}].model: unknown model {s.model!r} (stream {s.id!r})")
        for i, m in enumerate(self.models):
            for dev in m.compute_ms:
                if dev not in devices:
                    raise ValueError(f"models[{i}].compute_ms: unknown device {dev!r} (model {m.name!r})")
        streams = {s.id for s in self.streams}
        for field, mapping, keys, key_kind, values, value_kind in (
            ("current", self.current, devices, "device", models, "model"),  # device -> models it holds
            ("routes", self.routes, streams, "stream", devices, "device"),  # stream -> devices serving it
        ):
            for key, named in mapping.items():
                if key not in keys:
                    raise ValueError(f"{field}: unknown {key_kind} {key!r}")
                for name in named:
                    if name not in values:
                        raise ValueError(f"{field}[{key!r}]: unknown {value_kind} {name!r}")
        return self


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = validation_message(err)
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def load_snapshot(path_or_dict: str | Path | dict[str, Any] | Snapshot) -> Snapshot:
    """Read and validate a snapshot from a JSON file path or a dict.

    Raises ConfigError naming the file and the bad field.
    """
    if isinstance(path_or_dict, Snapshot):
        return path_or_dict
    where = "snapshot"
    if isinstance(path_or_dict, dict):
        data = path_or_dict
    else:
        where = str(path_or_dict)
        try:
            data = json.loads(Path(path_or_dict).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object at the top level")
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None


def snapshot_json_schema() -> dict[str, Any]:
    """The JSON Schema of the snapshot format (docs/snapshot.schema.json)."""
    schema = Snapshot.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lepton-edge fleet snapshot"
    return schema
