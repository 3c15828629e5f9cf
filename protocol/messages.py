"""Message schemas (v1) for every topic, with validation and encode/decode.

Every JSON payload carries ``"v": 1``. ``decode(kind, payload)`` returns a
validated message or raises ProtocolError naming what is wrong; a payload that
fails is logged by the receiver and dropped, and never changes state.
Unknown fields are refused, so a typo cannot pass as a default.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from lepton.errors import ProtocolError
from lepton.protocol.topics import ID_PATTERN

SCHEMA_VERSION = 1
MAX_JSON_BYTES = 256 * 1024  # a JSON message above this is refused unread
MAX_DEPTH = 16  # nesting deeper than this is refused before parsing

Id = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_INT = 2**63 - 1  # SQLite's INTEGER: every count and sequence number is stored there
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Positive = Annotated[int, Field(ge=1, le=MAX_INT)]


class Message(BaseModel):
    """Base: strict about unknown keys, NaN and infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="null")
    v: Literal[1] = SCHEMA_VERSION


# --- device status (birth / last will) --------------------------------------


class StreamInfo(BaseModel):
    """A data stream a device originates: what the planner needs to place it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Id
    model: Id
    rate_hz: NonNeg
    payload_bytes: Count
    reply_bytes: Count = 256
    slo_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # as the planner's snapshot


class Capabilities(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu_count: Positive
    memory_mb: NonNeg
    arch: str
    runtime: str
    runtime_version: str
    threads: Positive = 1
    cpu_share: Annotated[float, Field(gt=0, le=1024)] = 1.0  # usable cores for inference
    models: list[Id] = []
    link: dict[str, NonNeg] = {}  # configured link hints: up_mbps, down_mbps, rtt_ms


class Status(Message):
    device: Id
    state: Literal["online", "offline"]
    ts: NonNeg
    reason: str = ""
    agent_version: str = ""
    capabilities: Capabilities | None = None
    streams: list[StreamInfo] = []


# --- telemetry ----------------------------------------------------------------


class ModelTiming(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    p50_ms: NonNeg
    p95_ms: NonNeg
    count: Count


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rtt_ms: NonNeg | None = None
    up_mbps: NonNeg | None = None
    down_mbps: NonNeg | None = None


class SourceHealth(BaseModel):
    """One source of the device: whether its camera, file or sensor is open, and when it last gave a frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    connected: bool = True
    frames_in: Count = 0
    frames_dropped: Count = 0
    reconnects: Count = 0
    last_frame_s: NonNeg | None = None  # seconds since its newest frame; None: none yet
    down_s: NonNeg | None = None  # seconds it has not been delivering (since its start, if it never did); None: up


class Telemetry(Message):
    device: Id
    ts: NonNeg
    load1: NonNeg = 0.0
    cpu_percent: NonNeg = 0.0
    memory_used_mb: NonNeg = 0.0
    memory_total_mb: NonNeg = 0.0
    temperature_c: Finite | None = None
    models: dict[Id, ModelTiming] = {}
    frames_in: Count = 0
    frames_dropped: Count = 0
    results: Count = 0
    outbox_depth: Count = 0
    outbox_dropped: Count = 0
    outbox_expired: Count = 0
    offload_failed: Count = 0
    link: Link = Link()
    streams: dict[Id, NonNeg] = {}  # measured rate per stream (Hz)
    downloads: dict[Id, Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = {}  # model -> share fetched


class TelemetryV2(Telemetry):
    """Telemetry v2: v1 plus each source's health. Coordinators of this release read both; an agent writes v2
    only when ``[telemetry] version = 2`` says its coordinator reads it (docs/protocol.md, versions)."""

    v: Literal[2] = 2
    sources: dict[Id, SourceHealth] = {}


# --- placement ----------------------------------------------------------------


class ModelRef(BaseModel):
    """A model version as the device must fetch and verify it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Id
    version: Annotated[str, Field(min_length=1, max_length=64)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Count
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    manifest_url: str = ""


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Id
    share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Desired(Message):
    device: Id
    generation: Count
    ts: NonNeg
    models: list[ModelRef] = []
    routes: dict[Id, list[Route]] = {}  # own stream id -> where it is served
    serve: dict[Id, list[Id]] = {}  # origin device -> its streams this device serves


class ModelState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    state: Literal["loading", "loaded", "failed"]
    version: str = ""
    sha256: str = ""
    reason: str = ""
    invoke_ms: NonNeg | None = None


class Reported(Message):
    device: Id
    generation: Count
    ts: NonNeg
    models: dict[Id, ModelState] = {}


# --- results and acks ---------------------------------------------------------


class ModelId(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Id
    version: str
    sha256: str


class Result(Message):
    device: Id
    stream: Id
    seq: Positive
    floor: Positive = 1  # every seq below is acked or counted dropped
    model: ModelId
    captured_at: NonNeg
    inferred_at: NonNeg
    infer_ms: NonNeg
    computed_on: Id
    rtt_ms: NonNeg | None = None
    deadline: NonNeg | None = None
    output: dict[str, Any]

    @field_validator("output")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_finite(value)
        return value

    @model_validator(mode="after")
    def _floor_at_most_seq(self) -> "Result":
        # The floor is the lowest seq the device still holds, this one included: a floor above it would
        # move the device's ack past results it never sent.
        if self.floor > self.seq:
            raise ValueError(f"floor {self.floor} is above seq {self.seq}")
        return self


class Ack(Message):
    device: Id
    seq: Count  # highest contiguous committed


class CoordinatorStatus(Message):
    state: Literal["online", "offline"]
    ts: NonNeg
    http: str = ""  # model registry base URL


class Reply(Message):
    """The output for an offloaded input, sent back to its origin."""

    server: Id
    origin: Id
    request: Count
    model: Id
    version: str = ""  # the model version that ran it (results name it)
    sha256: str = ""
    infer_ms: NonNeg = 0.0
    error: str = ""
    output: dict[str, Any] = {}


KINDS: dict[str, type[Message]] = {
    "status": Status,
    "telemetry": Telemetry,
    "desired": Desired,
    "reported": Reported,
    "results": Result,
    "acks": Ack,
    "coordinator": CoordinatorStatus,
    "replies": Reply,
}

# Kinds with more than one schema version: ``"v"`` picks the schema. KINDS names the v1 one.
VERSIONS: dict[str, dict[int, type[Message]]] = {"telemetry": {1: Telemetry, 2: TelemetryV2}}


def _version(data: Any) -> str:
    """The schema version a payload names (1 when it names none, as v1's default says)."""
    return str(data.get("v", 1) if isinstance(data, dict) else getattr(data, "v", 1))


_VERSIONED = {kind: TypeAdapter(Annotated[Union[tuple(Annotated[cls, Tag(str(v))] for v, cls in classes.items())],
                                          Discriminator(_version)])
              for kind, classes in VERSIONS.items()}

AnyMessage = Union[Status, Telemetry, TelemetryV2, Desired, Reported, Result, Ack, CoordinatorStatus, Reply]


def _check_finite(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN or infinity in output")
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, depth + 1)


_STRUCTURAL = re.compile(rb'["\\\[\]{}]')  # the only bytes that matter for nesting depth


def too_deep(raw: bytes) -> bool:
    """*raw* JSON nests deeper than MAX_DEPTH (decode refuses it before parsing)."""
    # Fewer opening brackets in all than the limit cannot nest past it: most payloads stop here.
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    in_str = False
    escaped_at = -1
    for match in _STRUCTURAL.finditer(raw):  # visits only quotes, backslashes and brackets
        i = match.start()
        if i == escaped_at:
            continue
        ch = raw[i]
        if in_str:
            if ch == 0x5C:
                escaped_at = i + 1
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return False


def encode(message: Message) -> bytes:
    """Serialise a message to compact JSON bytes."""
    return message.model_dump_json(exclude_none=True).encode()


def decode(kind: str, payload: bytes | str) -> AnyMessage:
    """Validate *payload* as a message of *kind*; ProtocolError names what is wrong."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"no JSON schema for topic kind {kind!r}")
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw) > MAX_JSON_BYTES:
        raise ProtocolError(f"{kind}: payload of {len(raw)} bytes exceeds {MAX_JSON_BYTES}")
    if not raw:
        raise ProtocolError(f"{kind}: empty payload")
    if too_deep(raw):
        raise ProtocolError(f"{kind}: JSON nested deeper than {MAX_DEPTH}")
    versioned = _VERSIONED.get(kind)
    try:
        return versioned.validate_json(raw) if versioned is not None else cls.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc", ())
        if versioned is not None:
            if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # a "v" no schema has
                versions = ", ".join(str(v) for v in VERSIONS[kind])
                raise ProtocolError(f"{kind}: v: schema version {_version(json.loads(raw))} is not one this "
                                    f"release reads ({versions})") from None
            if loc and str(loc[0]) in {str(v) for v in VERSIONS[kind]}:
                loc = loc[1:]  # the schema version the union picked, not a key of the payload
        where = ".".join(str(p) for p in loc) or "payload"
        raise ProtocolError(f"{kind}: {where}: {first.get('msg')} ({exc.error_count()} error(s))") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind}: {exc}") from None


def to_json(message: Message) -> dict[str, Any]:
    """The message as a plain dict, as it travels."""
    return json.loads(encode(message))
