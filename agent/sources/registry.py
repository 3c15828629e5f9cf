"""The one registry from a config ``type`` to (config class, source class).

Config is validated here, once, with unknown keys refused; every error names
the source, the key and the value. Building a source opens no device: that
happens in its thread after ``start()``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from lepton.agent.sources.base import BaseSource, SourceConfig
from lepton.agent.sources.capture import CameraConfig, CameraSource, VideoConfig, VideoSource
from lepton.agent.sources.sensor import SensorConfig, SensorSource
from lepton.agent.sources.synthetic import SyntheticConfig, SyntheticSource
from lepton.errors import ConfigError

SOURCE_TYPES: dict[str, tuple[type[BaseModel], type]] = {
    "camera": (CameraConfig, CameraSource),
    "video": (VideoConfig, VideoSource),
    "synthetic": (SyntheticConfig, SyntheticSource),
    "sensor": (SensorConfig, SensorSource),
}


def validate_source_config(config: dict[str, Any]) -> SourceConfig:
    """The typed config of one ``[[sources]]`` entry, or ConfigError naming the bad key, type or value."""
    if not isinstance(config, dict):
        raise ConfigError(f"a source must be a table of keys, not {type(config).__name__}")
    where = f"source {config['id']!r}" if isinstance(config.get("id"), str) else "source"
    kind = config.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing key 'type' (one of {', '.join(SOURCE_TYPES)})")
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"{where}: unknown type {kind!r} (one of {', '.join(SOURCE_TYPES)})")
    config_class = SOURCE_TYPES[kind][0]
    try:
        return config_class.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(f"{where} ({kind}): {describe_errors(exc, config_class)}") from None


def build_source(config: dict[str, Any]) -> BaseSource:
    """A ready-to-start source for one ``[[sources]]`` entry; ConfigError naming the bad key, type or value."""
    typed = validate_source_config(config)
    return SOURCE_TYPES[typed.type][1](typed)


def describe_errors(exc: ValidationError, config_class: type[BaseModel]) -> str:
    """pydantic's errors as one line: key, what is wrong, the value given."""
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            known = ", ".join(config_class.model_fields)
            parts.append(f"unknown key {key!r} (known: {known})")
        elif error["type"] == "missing":
            parts.append(f"missing key {key!r}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            if key:
                parts.append(f"{key}: {message} (got {error['input']!r})")
            else:
                parts.append(message)
    return "; ".join(parts)
