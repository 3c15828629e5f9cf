"""The coordinator's configuration: one TOML file, validated once at start.

Unknown keys are refused (a typo never passes as a default); every field has a
default and a description. ``check_files`` checks what start-up needs of the
file system (files readable, TLS material loading, directories there) without
creating anything; ``lepton coordinator --check-config FILE`` runs both and
exits 0, or 2 with one line naming the key.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton.brokerfiles import read_password, readable, reason, tls_context
from lepton.errors import ConfigError, describe_config_error
from lepton.protocol import DEFAULT_PREFIX, Topics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # TOML is typed: `port = "1883"` or `interval_s = true` is a mistake


class BrokerConfig(_Section):
    host: str = Field("127.0.0.1", description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port (8883 is usual with TLS)")
    keepalive: int = Field(10, ge=1, le=3600, description="MQTT keepalive (s); the broker fires the last will after 1.5x")
    client_id: str = Field("lepton-coordinator", min_length=1, description="MQTT client id; the persistent session is kept under it")
    mqtt_version: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version")
    session_expiry_s: int = Field(7 * 86400, ge=0, description="MQTT 5 only: how long the broker keeps the session (and queues) while the coordinator is away")
    tls_ca: str = Field("", description="CA certificate file; set to use TLS")
    tls_cert: str = Field("", description="client certificate file (TLS)")
    tls_key: str = Field("", description="client private key file (TLS)")
    username: str = Field("", description="broker user name, if the broker asks for one")
    password_file: str = Field("", description="file holding the broker password (never the password itself)")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect delay (s)")
    reconnect_max_s: float = Field(10.0, gt=0, description="longest reconnect delay (s)")


class DbConfig(_Section):
    path: str = Field("/var/lib/lepton/coordinator.db", description="the fleet registry and results (SQLite, WAL)")
    synchronous: Literal["NORMAL", "FULL"] = Field("FULL", description="FULL: an acked result survives a power cut; NORMAL: a crash only")
    batch_max: int = Field(2000, ge=1, le=100000, description="most messages committed in one transaction")
    keep_results_days: float = Field(30.0, ge=0, description="results that arrived longer ago than this (days) are deleted; 0 keeps them forever (a stored result takes its payload plus about 100 bytes: 1 GiB holds about 1.8 million digits results)")
    prune_every_s: float = Field(3600.0, gt=0, description="how often old results are deleted (s), a little at a time")


class PlannerConfig(_Section):
    interval_s: float = Field(30.0, gt=0, description="replan at least this often (s); events replan sooner")
    time_limit_s: float = Field(5.0, gt=0, description="solver time limit (s)")
    migration_penalty_ms: float = Field(20.0, ge=0, description="cost of loading a model not already held (keeps the fleet from flapping)")
    route_hold: float = Field(0.05, ge=0, le=1, description="a stream moves off the devices serving it only to one this fraction faster (keeps measurement noise from moving streams); 0: no hold")
    utilization_cap: float = Field(0.8, gt=0, le=1, description="share of a device's CPU the planner may fill")
    unserved_penalty_ms: float = Field(10000.0, ge=0, description="cost of a stream share left unserved")
    default_compute_ms: float = Field(50.0, gt=0, description="inference time assumed when neither telemetry nor a bench profile knows it")
    debounce_s: float = Field(0.2, ge=0, description="events within this window are planned together")
    drift: float = Field(0.25, gt=0, description="relative change of a measured compute time or link that triggers a replan")
    exclude_failed_s: float = Field(600.0, ge=0, description="how long a model version that failed on a device stays out of its plans (an older version serves meanwhile)")
    queueing: bool = Field(False, description="add the planner's queueing term to the objective")


class LivenessConfig(_Section):
    stale_after_s: float = Field(11.0, gt=0, description="an online device silent this long is stale and planned as offline; with the agents' keepalive 10 s and telemetry every 2 s, 11 s notices a silent device within 1.5 x keepalive (docs/reliability.md)")


class HttpConfig(_Section):
    enabled: bool = Field(True, description="serve the model registry over HTTP(S)")
    bind: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(8080, ge=0, le=65535, description="port; 0 picks a free one")
    base_url: str = Field("", description="URL devices fetch models from; default this server. Any HTTP store serving /models/<name>/<version>/... may stand in")
    tls_cert: str = Field("", description="certificate file: serve HTTPS")
    tls_key: str = Field("", description="private key file for tls_cert")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")


class ModelsConfig(_Section):
    dir: str = Field("", description="the fleet's model registry directory (`lepton models add --registry`; SIGHUP reads it again), offered beside the shipped zoo while the zoo's key is trusted; empty: the zoo alone")
    trusted_keys: list[str] = Field(default_factory=list, description="public keys whose manifest signatures are trusted")


class MetricsConfig(_Section):
    port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port; 0 is off")
    bind: str = Field("127.0.0.1", description="metrics address")


class CoordinatorConfig(_Section):
    prefix: str = Field(DEFAULT_PREFIX, description="MQTT topic prefix")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    db: DbConfig = Field(default_factory=DbConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    liveness: LivenessConfig = Field(default_factory=LivenessConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        Topics(value)  # raises on wildcards or a trailing '/'
        return value


def load_config(path: str | Path | None = None, data: dict | None = None) -> CoordinatorConfig:
    """Read and validate a config file (or a dict); ConfigError names the bad key."""
    if data is None:
        if path is None:
            return CoordinatorConfig()
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    name = f"config {path}" if path is not None else "config"
    try:
        return CoordinatorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {describe_config_error(exc)}") from None
    except Exception as exc:  # the prefix check raises ProtocolError
        raise ConfigError(f"{name}: {exc}") from None


# --- what start-up needs of the file system ----------------------------------------------------
def check_files(cfg: CoordinatorConfig) -> None:
    """Everything start-up reads or creates on disk, checked without changing anything: ConfigError
    naming the key (``broker.tls_ca``, ``models.dir``, ``db.path``, ...) for the first problem."""
    b = cfg.broker
    read_password(b.password_file)
    if b.tls_ca:
        tls_context(b)
    elif b.tls_cert or b.tls_key:
        raise ConfigError("broker.tls_ca: empty, so broker.tls_cert/tls_key would not be used (set tls_ca to use TLS)")
    if cfg.http.enabled:
        if cfg.http.tls_cert:
            readable("http.tls_cert", cfg.http.tls_cert)
            if cfg.http.tls_key:
                readable("http.tls_key", cfg.http.tls_key)
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.http.tls_cert, cfg.http.tls_key or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"http.tls_cert/tls_key {cfg.http.tls_cert}: {reason(exc)}") from None
        elif cfg.http.tls_key:
            raise ConfigError("http.tls_key: set without http.tls_cert")
    elif not cfg.http.base_url:
        raise ConfigError("http.enabled is false and http.base_url is empty: devices would have nowhere to fetch models from")
    if cfg.models.dir:
        _directory("models.dir", cfg.models.dir)
    for index, key in enumerate(cfg.models.trusted_keys):
        _public_key(f"models.trusted_keys[{index}]", key)
    _database_path(cfg.db.path)


def _directory(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key} {path}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"{key} {path}: not a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: permission denied")


def _public_key(key: str, path: str) -> None:
    readable(key, path)
    try:
        from lepton.models.signing import load_public_key
    except ModuleNotFoundError:  # the models part is not installed: start-up says so
        return
    try:
        load_public_key(path)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _database_path(path: str) -> None:
    """The database file is there and writable, or its directory is (or can be made: start-up creates it)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"db.path {path}: is a directory, not a file")
    if p.exists():
        if not os.access(p, os.R_OK | os.W_OK):
            raise ConfigError(f"db.path {path}: permission denied (the coordinator writes it)")
        return
    parent = p.absolute().parent
    if parent.is_dir():
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"db.path {path}: cannot create the database in {parent}: permission denied")
        return
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"db.path {path}: directory {parent} does not exist and cannot be created ({ancestor} is not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"db.path {path}: directory {parent} does not exist and cannot be created in {ancestor}: permission denied")
