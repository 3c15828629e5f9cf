"""The agent's configuration: one TOML file, validated once at start-up.

Unknown keys are refused (a typo never passes as a default) and every field
has a default and a description. ``lepton agent --check-config FILE`` exits 0,
or 2 with one line naming the bad key. Each ``[[sources]]`` entry is checked
by the source registry; each ``[[streams]]`` entry must name a source that
exists (and, in ``check_references``, a model the registry holds).
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lepton.errors import ConfigError, as_value_error, describe_config_error
from lepton.protocol import DEFAULT_PREFIX, Topics
from lepton.protocol.topics import ID_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _check_id(value: str) -> str:
    if not ID_PATTERN.match(value):
        raise ValueError("use 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit (ids appear in topics)")
    return value


def default_device_id() -> str:
    """The host name, cut to what a topic id allows."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].lstrip("._-")
    return name or "device"


class _Section(BaseModel):
    # Every float is finite: inf passes a "> 0" bound, then fails where the value is used (the birth
    # message the protocol refuses, a deadline every frame misses). Strict: TOML is typed, so
    # `fps = true` or `port = "1883"` is a mistake to name, not a value to coerce (true read as 1.0).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class BrokerConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port (8883 is usual with TLS)")
    keepalive: int = Field(10, ge=1, le=3600, description="MQTT keepalive (s); the broker publishes the last will after 1.5x without traffic")
    client_id: str = Field("", description="MQTT client id; empty: the device id")
    username: str = Field("", description="broker user name, if the broker asks for one")
    password_file: str = Field("", description="file holding the broker password (never the password itself)")
    mqtt_version: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version")
    tls_ca: str = Field("", description="CA certificate file; set to use TLS")
    tls_cert: str = Field("", description="client certificate file (TLS)")
    tls_key: str = Field("", description="client private key file (TLS)")
    reconnect_min_s: float = Field(0.5, gt=0, le=600, description="first reconnect delay (s); doubles per failure, with jitter")
    reconnect_max_s: float = Field(10.0, gt=0, le=3600, description="longest reconnect delay (s)")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="TCP/TLS connect timeout (s)")
    ready_timeout_s: float = Field(10.0, ge=0, le=3600, description="at start-up, wait this long for the broker before reporting ready anyway (results wait in the outbox)")

    @model_validator(mode="after")
    def _check(self) -> "BrokerConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("tls_cert needs tls_ca (the CA the broker's certificate is checked against)")
        return self


class OutboxConfig(_Section):
    path: str = Field("/var/lib/lepton/outbox.db", description="the SQLite outbox (WAL, synchronous=FULL); results wait here until the coordinator acknowledges them")
    max_rows: int = Field(100000, ge=1, description="most results kept; beyond it the policy applies")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="most payload bytes kept; beyond it the policy applies")
    policy: Literal["drop-oldest"] = Field("drop-oldest", description="when full: drop the oldest result (counted and reported in telemetry)")
    resend_after_s: float = Field(30.0, gt=0, description="re-send unacknowledged results that waited this long for an ack (a broker may drop queued messages silently)")
    inflight: int = Field(1000, ge=1, le=65535, description="most results published and not yet PUBACKed by the broker")
    ack_window: int = Field(200, ge=1, le=1000000, description="with a coordinator: most results published past the oldest it has not acknowledged (the broker queues them for it and drops past max_queued_messages without a word; lepton provision allows 200 per device)")
    batch_max: int = Field(256, ge=1, le=100000, description="most results committed in one transaction")


class RuntimeConfig(_Section):
    threads: int = Field(1, ge=1, le=256, description="interpreter threads per model")
    delegate: str = Field("", description="TFLite delegate library (e.g. libedgetpu.so.1); empty: CPU")
    workers: int = Field(1, ge=1, le=64, description="inference worker threads per stream")
    warmup: int = Field(3, ge=1, le=1000, description="invokes at load time; their median is the first compute-time estimate")
    stall_s: float = Field(30.0, gt=0, description="a pipeline busy on one frame this long is stuck: systemd watchdog pings stop")
    cpu_share: float = Field(0.0, ge=0, le=1024, description="cores the planner may use for inference; 0: all of them")
    slowdown: float = Field(1.0, ge=1, le=10000, description="emulate a slower CPU on one machine: each invoke takes slowdown x the median of the last 15 invoke times on this host (a pause after the invoke), and reports that. For demos and tests")


class TelemetryConfig(_Section):
    interval_s: float = Field(2.0, gt=0, le=3600, description="telemetry period (s); the coordinator judges liveness by it (docs/reliability.md: stale_after_s <= 1.5 x keepalive - interval_s - 2 s)")
    window_s: float = Field(60.0, gt=0, le=86400, description="window of the invoke-time percentiles and rates (s)")
    version: Literal[1, 2] = Field(1, description="telemetry schema written: 2 adds each source's health (camera or sensor down, last frame); set it once the coordinator reads v2 (this release's does; an older one refuses it)")


class MetricsConfig(_Section):
    port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port; 0 is off")
    bind: str = Field("127.0.0.1", description="metrics address")


class ModelsConfig(_Section):
    dir: str = Field("", description="local model registry directory; empty: the shipped zoo")
    cache_dir: str = Field("/var/lib/lepton/models", description="where delivered models are kept")
    trusted_keys: list[str] = Field(default_factory=list, description="public keys whose manifest signatures are trusted (the zoo key is trusted for the zoo)")
    http_ca: str = Field("", description="CA certificate for HTTPS model downloads; empty: broker.tls_ca if set, else the system's CAs")
    download_timeout_s: float = Field(20.0, gt=0, le=600, description="a model download that receives nothing this long is retried (resuming where it stopped)")
    download_attempts: int = Field(4, ge=1, le=100, description="tries per model download before the model is reported failed")


class LinkConfig(_Section):
    up_mbps: float | None = Field(None, gt=0, description="uplink capacity hint (Mbit/s), used until measured")
    down_mbps: float | None = Field(None, gt=0, description="downlink capacity hint (Mbit/s)")
    rtt_ms: float | None = Field(None, ge=0, description="round-trip time hint to the broker (ms), used until measured")
    measure: bool = Field(True, description="measure the link from real traffic and a small probe; false: report the hints only (e.g. links emulated in a demo)")
    probe_interval_s: float = Field(60.0, ge=0, description="at most one link probe this often, skipped while real traffic measures both directions; 0: no probe")
    probe_bytes: int = Field(32768, ge=1024, le=1048576, description="size of the link probe message")
    window_s: float = Field(60.0, ge=1, le=86400, description="each direction's estimate is the median of the samples of this many seconds; shorter follows a changing link sooner, longer rides out bursts")


class OffloadConfig(_Section):
    timeout_s: float = Field(0.0, ge=0, le=600, description="an offloaded input not answered this long falls back to local inference (or counts as failed); 0: 2 x the expected round trip + 1 s")
    expected_ms: float = Field(500.0, gt=0, description="round trip assumed for a target before one was measured (sets the automatic timeout)")
    max_timeout_s: float = Field(10.0, gt=0, le=600, description="longest automatic timeout")
    max_inflight: int = Field(4, ge=1, le=1024, description="most unanswered inputs per target; a worker waits for a slot (its source drops stale frames meanwhile)")
    serve_queue: int = Field(32, ge=1, le=10000, description="inputs from other devices queued here; beyond it they are answered 'busy' at once")


class StreamConfig(_Section):
    id: str = Field(description="stream id (appears in the results topic)")
    source: str = Field(description="id of the [[sources]] entry that feeds it")
    model: str = Field(description="model name in the registry, e.g. digits-int8")
    version: str = Field("", description="model version; empty: the newest")
    deadline_s: float = Field(0.0, ge=0, description="a result not sent this long after capture is expired (counted, not sent); 0: never")
    slo_ms: float | None = Field(None, gt=0, description="latency objective the planner is told about")
    offload_jpeg_quality: int = Field(0, ge=0, le=100, description="image models only: frames offloaded to another device travel as a JPEG of this quality (1-100) at the model's input size, instead of the exact tensor bytes; 0: exact tensor")

    @field_validator("id", "source", "model")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id(value)


class AgentConfig(_Section):
    device_id: str = Field(default_factory=default_device_id, description="this device's id (topics, results); default: the host name")
    prefix: str = Field(DEFAULT_PREFIX, description="MQTT topic prefix")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="the MQTT broker")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="the result outbox")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="inference")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="telemetry")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint; every metric in [metrics.md](metrics.md)")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="model registry")
    link: LinkConfig = Field(default_factory=LinkConfig, description="link hints for the planner")
    offload: OffloadConfig = Field(default_factory=OffloadConfig, description="running inputs on other devices, and theirs here")
    sources: list[dict[str, Any]] = Field(default_factory=list, description="[[sources]]: camera, video, synthetic, sensor")
    streams: list[StreamConfig] = Field(default_factory=list, description="[[streams]]: source -> model -> results")

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        as_value_error(Topics, value)
        return value

    @property
    def client_id(self) -> str:
        """The MQTT client id in use."""
        return self.broker.client_id or self.device_id


def _check_sources_and_streams(cfg: AgentConfig) -> None:
    from lepton.agent.sources import validate_source_config

    seen: set[str] = set()
    for index, entry in enumerate(cfg.sources):
        try:
            typed = validate_source_config(entry)
        except ConfigError as exc:
            raise ConfigError(f"sources[{index}]: {exc}") from None
        if typed.id in seen:
            raise ConfigError(f"sources[{index}]: duplicate source id {typed.id!r}")
        seen.add(typed.id)
    streams: set[str] = set()
    for index, stream in enumerate(cfg.streams):
        if stream.id in streams:
            raise ConfigError(f"streams[{index}].id: duplicate stream id {stream.id!r}")
        streams.add(stream.id)
        if stream.source not in seen:
            known = ", ".join(sorted(seen)) or "none defined"
            raise ConfigError(f"streams[{index}].source: no source {stream.source!r} (sources: {known})")


def load_config(path: str | Path | None = None, data: dict | None = None) -> AgentConfig:
    """Read and validate a config file (or a dict); ConfigError names the file and the bad key."""
    where = f"config {path}" if path else "config"
    if data is None:
        if path is None:
            raise ConfigError("no config file given (use --config FILE)")
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_config_error(exc)}") from None
    try:
        _check_sources_and_streams(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


def source_config(cfg: AgentConfig, source_id: str) -> dict[str, Any]:
    """The ``[[sources]]`` entry with *source_id*."""
    return next(s for s in cfg.sources if s.get("id") == source_id)
