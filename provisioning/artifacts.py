"""Files derived from the fleet's keys: CA, CRL, broker files, configs, bundles.

Each function writes only what changed and returns the paths it wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from lepton.provisioning import broker_conf, configs, pki
from lepton.provisioning.bundle import Member, build, template
from lepton.provisioning.files import make_dir, write_if_changed, write_private
from lepton.provisioning.signing import generate_signing_keypair
from lepton.provisioning.store import IdentityRecord

if TYPE_CHECKING:
    from lepton.provisioning.fleet import Fleet

AGENT_UNIT = "lepton-agent.service"
COORDINATOR_UNIT = "lepton-coordinator.service"


def init_files(fleet: "Fleet") -> list[Path]:
    """The CA, the model-signing key pair and the agent template, if missing."""
    lay, written = fleet.layout, []
    make_dir(lay.ca_dir, private=True)
    if not (lay.ca_key.exists() and lay.ca_cert.exists()):
        ca = pki.CA.create(f"{fleet.settings.name} CA", fleet.settings.pki.ca_days)
        write_private(lay.ca_key, pki.key_pem(ca.key))
        write_if_changed(lay.ca_cert, pki.cert_pem(ca.cert))
        written += [lay.ca_key, lay.ca_cert]
    if not lay.signing_key.exists():
        make_dir(lay.signing_key.parent, private=True)
        generate_signing_keypair(lay.signing_key, lay.signing_pub)
        written += [lay.signing_key, lay.signing_pub]
    tpl = lay.root / configs.TEMPLATES_DIR / configs.AGENT_TEMPLATE
    if not tpl.exists():
        make_dir(tpl.parent)
        write_if_changed(tpl, configs.AGENT_TEMPLATE_TEXT.encode())
        written.append(tpl)
    return written


def write_crl(fleet: "Fleet", renew: bool = False) -> list[Path]:
    """ca/crl.pem from ca/revoked.json, issued now and numbered above the one it replaces; rebuilt only
    when the list changed or the file is unreadable (the signature is randomised, so an unchanged CRL is
    not re-signed), or, with *renew*, in any case: its next update moves crl_days ahead."""
    lay = fleet.layout
    entries = lay.read_revoked()
    revoked = [(int(e["serial"], 16), dt.datetime.fromisoformat(e["revoked_at"])) for e in entries]
    number = 0
    if lay.crl.exists():
        try:
            current = x509.load_pem_x509_crl(lay.crl.read_bytes())
            number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            if not renew and {r.serial_number for r in current} == {s for s, _ in revoked}:
                return []
        except (ValueError, x509.ExtensionNotFound):
            pass  # unreadable: rebuild it
    write_if_changed(lay.crl, pki.crl_pem(fleet.ca.crl(revoked, fleet.settings.pki.crl_days, number)))
    return [lay.crl]


def _server_cert_ok(fleet: "Fleet", out: Path) -> bool:
    try:
        cert = pki.load_cert(out / "server.crt")
        pki.load_key(out / "server.key")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # missing, unreadable, no SAN: issue a new one
        return False
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    issued_by_ca = cert.issuer == fleet.ca.cert.subject
    return issued_by_ca and names == set(fleet.settings.broker.names)


def write_broker(fleet: "Fleet", out: Path, rotate: bool = False) -> list[Path]:
    """Everything the broker host needs: CA, server key and cert, CRL, ACL, mosquitto.conf.

    They live in the fleet's broker/ directory; a different *out* gets a copy
    (the same server key, not a new one). *rotate*: a new server key and
    certificate (before the old one expires; cert_days from now).
    """
    home = fleet.layout.broker_dir
    make_dir(home, private=True)
    written = []
    if rotate or not _server_cert_ok(fleet, home):
        key = pki.new_key()
        names = tuple(fleet.settings.broker.names)
        cert = fleet.ca.issue(key.public_key(), names[0], fleet.settings.pki.cert_days, server_names=names)
        write_private(home / "server.key", pki.key_pem(key))
        write_if_changed(home / "server.crt", pki.cert_pem(cert))
        written += [home / "server.key", home / "server.crt"]
    records = fleet.records()
    idents = [broker_conf.Identity(r.name, r.role, r.revoked) for r in records]
    active_devices = sum(1 for r in records if r.role == "device" and not r.revoked)
    files = {
        "ca.crt": fleet.layout.ca_cert.read_bytes(),
        "crl.pem": fleet.layout.crl.read_bytes(),
        "acl": broker_conf.acl_text(fleet.settings, idents).encode(),
        "mosquitto.conf": broker_conf.mosquitto_conf_text(fleet.settings, active_devices).encode(),
    }
    for name, data in files.items():
        if write_if_changed(home / name, data):
            written.append(home / name)
    if Path(out).resolve() != home:
        make_dir(Path(out), private=True)
        for name in (*files, "server.crt", "server.key"):
            if write_if_changed(Path(out) / name, (home / name).read_bytes(), private=name == "server.key"):
                written.append(Path(out) / name)
    return written


def _identity_json(record: IdentityRecord, role: str) -> bytes:
    return (json.dumps({"name": record.name, "role": role, "tags": record.tags}, indent=2, sort_keys=True) + "\n").encode()


def write_device_files(fleet: "Fleet", record: IdentityRecord) -> list[Path]:
    """A device's agent.toml and bundle (and its identity record if it changed)."""
    cfg = configs.agent_config(fleet.settings, fleet.layout.root, record.name, record.tags)
    toml = configs.toml_bytes(cfg, f"lepton agent config for device {record.name} (fleet {fleet.settings.name})")
    extra = [Member(AGENT_UNIT, template(AGENT_UNIT)), Member("jetson.conf", template("jetson.conf"))]
    return _write_role_files(fleet, record, "agent", toml, (configs.CERT_FILE, configs.KEY_FILE), extra)


def write_coordinator_files(fleet: "Fleet", record: IdentityRecord) -> list[Path]:
    """The coordinator's coordinator.toml and bundle."""
    toml = configs.toml_bytes(configs.coordinator_config(fleet.settings), f"lepton coordinator config (fleet {fleet.settings.name})")
    extra = [Member(COORDINATOR_UNIT, template(COORDINATOR_UNIT))]
    return _write_role_files(fleet, record, "coordinator", toml, (configs.COORD_CERT_FILE, configs.COORD_KEY_FILE), extra)


def _write_role_files(
    fleet: "Fleet", record: IdentityRecord, role: str, toml: bytes, names: tuple[str, str], extra: list[Member]
) -> list[Path]:
    """Write ``<role>.toml`` next to the identity and its bundle; return what changed."""
    lay, written = fleet.layout, []
    if lay.write_record(record):
        written.append(lay.record_path(record.name))
    config_path = lay.identity_dir(record.name) / f"{role}.toml"
    if write_if_changed(config_path, toml):
        written.append(config_path)
    cert_name, key_name = names
    members = [
        Member(f"{role}.toml", toml),
        Member(configs.MODELS_PUB, lay.signing_pub.read_bytes()),
        Member("identity.json", _identity_json(record, role)),
        Member(f"credentials/{configs.CA_FILE}", lay.ca_cert.read_bytes()),
        Member(f"credentials/{cert_name}", lay.cert(record.name).read_bytes()),
        Member(f"credentials/{key_name}", lay.key(record.name).read_bytes(), 0o600),
        Member("install.sh", template("install.sh"), 0o755),
        *extra,
    ]
    zoo = configs.zoo_key()
    if fleet.settings.models.trust_zoo and zoo is not None:
        members.append(Member(configs.ZOO_PUB, zoo))
    make_dir(lay.bundles_dir, private=True)
    # The bundle holds a private key: it is a secret file itself.
    if write_private(lay.bundle(record.name), build(f"lepton-{record.name}", members)):
        written.append(lay.bundle(record.name))
    return written
