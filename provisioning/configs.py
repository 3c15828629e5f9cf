"""The TOML configs provisioning writes for the agent and the coordinator.

A device's agent config is the fleet's template (``templates/agent.toml``)
with, in order, ``templates/tag-<tag>.toml`` for each of its tags merged in
(tables merge, arrays of tables such as ``[[sources]]`` append, other values
replace), then the identity and broker settings, which no template overrides.
Credentials are read from the directory systemd's ``LoadCredential=`` fills.
"""

from __future__ import annotations

import re
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


def template_names(tags: list[str]) -> list[str]:
    """The template files a device with *tags* is built from, in merge order."""
    return [AGENT_TEMPLATE] + [f"tag-{tag}.toml" for tag in tags]


def tags_without_template(root: Path, tags: list[str]) -> list[str]:
    """Tags with no ``templates/tag-<tag>.toml``: they add nothing to a device's agent config."""
    return [tag for tag in tags if not (Path(root) / TEMPLATES_DIR / f"tag-{tag}.toml").exists()]


def agent_config(settings: FleetSettings, root: Path, device_id: str, tags: list[str]) -> dict:
    """The agent config (as a dict) for one device."""
    data: dict = {}
    for name in template_names(tags):
        data = merge(data, load_template(root, name))
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


def check_agent_config(settings: FleetSettings, root: Path, device_id: str, tags: list[str]) -> dict:
    """The agent config for one device, checked by the agent's own config model.

    ConfigError names the template file the bad key or value comes from. Only
    the config is checked: the credential, password and model files it names
    exist on the device, not here.
    """
    cfg = agent_config(settings, root, device_id, tags)
    try:
        from lepton.agent.config import load_config
    except ModuleNotFoundError:  # pragma: no cover - an install without the agent part
        return cfg
    try:
        load_config(data=cfg)
    except ConfigError as exc:
        problem = str(exc).removeprefix("config: ")
        where, problem = _blame(root, tags, cfg, problem)
        raise ConfigError(f"{where}: {problem} (nothing written for device {device_id})") from None
    return cfg


def _blame(root: Path, tags: list[str], cfg: dict, problem: str) -> tuple[str, str]:
    """The template a config problem comes from, and the problem with indices local to that file."""
    names = template_names(tags)
    files = {name: load_template(root, name) for name in names}

    def template(name: str) -> str:
        return f"template {Path(root) / TEMPLATES_DIR / name}"

    loc = _error_loc(cfg)
    match = re.match(r"(sources|streams)\[(\d+)\]", problem)
    if match:
        key, index, written, form = match.group(1), int(match.group(2)), match.group(0), "{}[{}]"
    elif len(loc) > 1 and loc[0] in ("sources", "streams") and isinstance(loc[1], int):
        key, index, written, form = loc[0], loc[1], f"{loc[0]}.{loc[1]}", "{}.{}"
    else:
        key = None
    if key is not None:  # arrays of tables append in merge order: count through the files
        for name in names:
            entries = files[name].get(key)
            count = len(entries) if _table_array(entries) else 0
            if index < count:
                return template(name), problem.replace(written, form.format(key, index), 1)
            index -= count
    else:
        path = tuple(p for p in loc if isinstance(p, str))
        depth = {name: _depth(files[name], path) for name in names}
        best = max(depth.values(), default=0)
        if best:
            return template([n for n in names if depth[n] == best][-1]), problem
    return "templates " + ", ".join(str(Path(root) / TEMPLATES_DIR / n) for n in names) + " (merged)", problem


def _error_loc(cfg: dict) -> tuple:
    """Where the agent's config model finds its first problem (keys and indices), or ()."""
    from pydantic import ValidationError

    from lepton.agent.config import AgentConfig

    try:
        AgentConfig.model_validate(cfg)
    except ValidationError as exc:
        return tuple(exc.errors()[0]["loc"])
    return ()


def _depth(data: dict, path: tuple) -> int:
    """How many keys of *path* (tables, then a key) *data* holds, from the top."""
    node: object = data
    for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            return depth
        node = node[key]
    return len(path)


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
        "models": {"trusted_keys": trusted_keys(settings), **({"dir": settings.models.dir} if settings.models.dir else {})},
    }


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def toml_bytes(data: dict, header: str) -> bytes:
    # Top-level scalars first: TOML puts them before any table.
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _table_array(v)}
    tables = {k: v for k, v in data.items() if k not in scalars}
    return (f"# {header}\n\n" + tomli_w.dumps({**scalars, **tables})).encode()
