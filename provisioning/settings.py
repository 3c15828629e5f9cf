"""The fleet's settings file, ``fleet.toml``: what every provision command reads.

Written once by ``lepton provision init`` and editable by hand afterwards;
unknown keys are refused so a typo never passes silently as a default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lepton.errors import ConfigError, as_value_error, describe_config_error
from lepton.protocol import DEFAULT_PREFIX, Topics, check_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

SETTINGS_FILE = "fleet.toml"
DEFAULT_COORDINATOR = "lepton-coordinator"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # TOML is typed: a quoted number or a bool for a number is a mistake


class BrokerSettings(_Strict):
    """Where the broker is and how the generated Mosquitto config looks."""

    host: str = Field(description="the name or address devices connect to")
    names: list[str] = Field(min_length=1, description="DNS names and IP addresses in the server certificate")
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    bind: str = Field("", description="address the TLS listener binds; empty: all")
    dir: str = Field(description="directory holding the broker's files on the broker host (paths in mosquitto.conf)")
    user: str = Field("mosquitto", description="user Mosquitto drops to when started as root")
    persistence_dir: str = "/var/lib/mosquitto/"
    queue_per_device: Annotated[int, Field(ge=1)] = 200
    min_queue: Annotated[int, Field(ge=1)] = 1000
    max_packet_mb: Annotated[int, Field(ge=1)] = 8
    autosave_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        10, description="seconds between saves of the broker's queues (a save rewrites all of them)")

    @field_validator("host", "dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _host_named(self) -> "BrokerSettings":
        # Devices check the server certificate against the host they connect to: one it does not name
        # would make every device refuse the broker.
        if self.host not in self.names:
            raise ValueError(f"host {self.host!r} is not one of names {self.names} (the server certificate's): "
                             "add it to names")
        return self


class PKISettings(_Strict):
    """Lifetimes, in days."""

    ca_days: Annotated[int, Field(ge=1)] = 7300
    cert_days: Annotated[int, Field(ge=1)] = 1825
    crl_days: Annotated[int, Field(ge=1)] = 3650


class AgentSettings(_Strict):
    """Paths the generated agent config points at on a device."""

    config_dir: str = "/etc/lepton"
    credentials_dir: str = "/run/credentials/lepton-agent.service"
    keepalive: Annotated[int, Field(ge=1)] = 10


class HttpSettings(_Strict):
    """Where the coordinator serves model files (devices fetch them there)."""

    bind: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    base_url: str = Field("", description="URL devices fetch models from; default http://<broker.host>:<port>")


class ModelKeys(_Strict):
    """Which signatures devices and the coordinator accept on model manifests."""

    trust_zoo: bool = Field(True, description="also trust the key that signs the shipped model zoo")
    dir: str = Field("", description="the coordinator's own model registry on its host (`lepton models add "
                     "--registry` there, then `systemctl reload lepton-coordinator`), offered beside the zoo's "
                     "models while trust_zoo; empty: the zoo alone")


class FleetSettings(_Strict):
    """Everything in fleet.toml."""

    name: str = "lepton-fleet"
    prefix: str = DEFAULT_PREFIX
    coordinator: str = DEFAULT_COORDINATOR
    broker: BrokerSettings
    pki: PKISettings = PKISettings()
    agent: AgentSettings = AgentSettings()
    http: HttpSettings = HttpSettings()
    models: ModelKeys = ModelKeys()

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        as_value_error(Topics, v)
        return v

    @field_validator("coordinator")
    @classmethod
    def _coordinator(cls, v: str) -> str:
        return as_value_error(check_id, v, "coordinator id")


def load_settings(root: Path) -> FleetSettings:
    """Read ``root/fleet.toml``; ConfigError naming the file and field."""
    path = Path(root) / SETTINGS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a fleet directory (no {SETTINGS_FILE}; create one with `lepton provision init`)") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_settings(data, str(path))


def parse_settings(data: dict, where: str = SETTINGS_FILE) -> FleetSettings:
    try:
        return FleetSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_config_error(exc)}") from None


def settings_toml(settings: FleetSettings) -> bytes:
    header = "# lepton fleet settings, read by every `lepton provision` command.\n\n"
    return (header + tomli_w.dumps(settings.model_dump(mode="json"))).encode()


def new_settings(root: Path, hosts: list[str], **options) -> FleetSettings:
    """Settings for a new fleet in *root*: devices connect to ``hosts[0]``, the
    server certificate names every host. *options* are top-level or ``broker.*``
    fields (None: default)."""
    if not hosts:
        raise ConfigError("give the broker's host name or address (--host), as devices will reach it")
    broker_keys = set(BrokerSettings.model_fields)
    broker = {"host": hosts[0], "names": list(dict.fromkeys(hosts)), "dir": str(Path(root).resolve() / "broker")}
    top: dict = {}
    for key, value in options.items():
        if value is not None:
            (broker if key in broker_keys else top)[key] = value
    return parse_settings({**top, "broker": broker}, "fleet settings")
