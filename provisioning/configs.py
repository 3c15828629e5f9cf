"""The TOML configs provisioning writes for the agent and the coordinator.

A device's agent config is the fleet's template (``templates/agent.toml``)
with, in order, ``templates/tag-<tag>.toml`` for each of its tags merged in
(tables merge, arrays of tables such as ``[[sources]]`` append, other values
replace), then the identity and broker settings, which no template overrides.
Credentials are read from the directory systemd's ``LoadCredential=`` fills.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import tomli_w

from lepton.errors import ConfigError
from lepton.provisioning.settings import FleetSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEMPLATES_DIR = "templates"
AGENT_TEMPLATE = "agent.toml"
MODELS_PUB = "models.pub"
ZOO_PUB = "zoo.pub"
# File names under the credentials directory (bundle: credentials/).
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "device.crt", "device.key"
COORD_CERT_FILE, COORD_KEY_FILE = "coordinator.crt", "coordinator.key"
COORDINATOR_CREDENTIALS = "/run/credentials/lepton-coordinator.service"
# The unit's StateDirectory=lepton-coordinator: not /var/lib/lepton, which an agent
# on the same host (another dynamic user) owns.
COORDINATOR_DB = "/var/lib/lepton-coordinator/coordinator.db"

AGENT_TEMPLATE_TEXT = """\
# Base of every device's agent config in this fleet. `lepton provision
# device/bulk` merges templates/tag-<tag>.toml for each of a device's tags on
# top, then sets device_id, prefix and [broker]. Example (uncomment):
#
# [[sources]]
# id = "cam0"
# type = "camera"
# device = 0
#
# [[streams]]
# id = "door"
# source = "cam0"
# model = "mobilenet96"
"""


def merge(base: dict, over: dict) -> dict:
    """Deep-merge *over* into a copy of *base*: tables merge, arrays of tables append."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge(old, value)
        elif _table_array(old) and _table_array(value):
            out[key] = list(old) + list(value)
        else:
            out[key] = value
    return out


def _table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def load_template(root: Path, name: str) -> dict:
    """A template from ``root/templates``; {} if absent, ConfigError if malformed."""
    path = Path(root) / TEMPLATES_DIR / name
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read template {path}: {exc}") from None


def agent_config(settings: FleetSettings, root: Path, device_id: str, tags: list[str]) -> dict:
    """The agent config (as a dict) for one device."""
    data = load_template(root, AGENT_TEMPLATE)
    for tag in tags:
        data = merge(data, load_template(root, f"tag-{tag}.toml"))
    creds = settings.agent.credentials_dir.rstrip("/")
    broker = {
        "host": settings.broker.host,
        "port": settings.broker.port,
        "keepalive": settings.agent.keepalive,
        "tls_ca": f"{creds}/{CA_FILE}",
        "tls_cert": f"{creds}/{CERT_FILE}",
        "tls_key": f"{creds}/{KEY_FILE}",
    }
    models = dict(data.get("models", {}))
    extra = [k for k in models.get("trusted_keys", []) if isinstance(k, str)]
    models["trusted_keys"] = list(dict.fromkeys(trusted_keys(settings) + extra))
    fixed = {"device_id": device_id, "prefix": settings.prefix, "broker": merge(data.get("broker", {}), broker), "models": models}
    return merge(data, fixed)


def trusted_keys(settings: FleetSettings) -> list[str]:
    """Model-signing public keys a host trusts: the fleet's, and the zoo's if it ships one."""
    etc = settings.agent.config_dir.rstrip("/")
    keys = [f"{etc}/{MODELS_PUB}"]
    if settings.models.trust_zoo and zoo_key() is not None:
        keys.append(f"{etc}/{ZOO_PUB}")
    return keys


def zoo_key() -> bytes | None:
    """The public key that signs the shipped model zoo, or None if this install has no zoo."""
    try:
        from lepton.models.registry import zoo_public_key

        return Path(zoo_public_key()).read_bytes()
    except (ImportError, OSError):
        pass
    try:
        return resources.files("lepton.models").joinpath("zoo", ZOO_PUB).read_bytes()
    except (ModuleNotFoundError, OSError):
        return None


def coordinator_config(settings: FleetSettings) -> dict:
    """The coordinator's config (as a dict): its identity, the broker, the model server."""
    creds = COORDINATOR_CREDENTIALS
    http = settings.http
    base_url = http.base_url or f"http://{_url_host(settings.broker.host)}:{http.port}"
    return {
        "prefix": settings.prefix,
        "broker": {
            "host": settings.broker.host,
            "port": settings.broker.port,
            "client_id": settings.coordinator,
            "tls_ca": f"{creds}/{CA_FILE}",
            "tls_cert": f"{creds}/{COORD_CERT_FILE}",
            "tls_key": f"{creds}/{COORD_KEY_FILE}",
        },
        "db": {"path": COORDINATOR_DB},
        "http": {"bind": http.bind, "port": http.port, "base_url": base_url},
        "models": {"trusted_keys": trusted_keys(settings)},
    }


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def toml_bytes(data: dict, header: str) -> bytes:
    # Top-level scalars first: TOML puts them before any table.
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _table_array(v)}
    tables = {k: v for k, v in data.items() if k not in scalars}
    return (f"# {header}\n\n" + tomli_w.dumps({**scalars, **tables})).encode()
