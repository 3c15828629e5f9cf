"""A fleet: its CA, identities, revocations, broker files and bundles.

Library first: ``lepton provision`` (provisioning/cli.py) only parses
arguments and calls these methods. Every method is idempotent: what exists
and is right is left alone (same bytes, same mtime); ``rotate=True`` renews.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from cryptography import x509

from lepton.errors import ConfigError, LeptonError
from lepton.protocol import check_id
from lepton.provisioning import artifacts, configs, pki
from lepton.provisioning.files import make_dir, write_if_changed, write_private
from lepton.provisioning.settings import SETTINGS_FILE, FleetSettings, load_settings, settings_toml
from lepton.provisioning.store import IdentityRecord, Layout

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one provisioning step did: created, updated, unchanged, rotated or revoked (and any warnings)."""

    name: str
    action: str
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "action": self.action, "written": [str(p) for p in self.written],
                "warnings": list(self.warnings)}


def device_name(value: str) -> str:
    """A valid device id (no '/', '+', '#'), else ConfigError naming it."""
    try:
        return check_id(value, "device id")
    except LeptonError as exc:
        raise ConfigError(str(exc)) from None


class Fleet:
    """One fleet directory. Load with ``Fleet(root)``, create with ``Fleet.create``."""

    def __init__(self, root: Path):
        self.layout = Layout(Path(root).resolve())
        self.settings: FleetSettings = load_settings(self.layout.root)
        self._ca: pki.CA | None = None
        self._checked_tags: set[tuple[str, ...]] = set()  # tag lists whose agent config passed the agent's model

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def ca(self) -> pki.CA:
        """The CA, read once per process: issuing hundreds of devices reuses it."""
        if self._ca is None:
            self._ca = pki.CA.load(self.layout.ca_key, self.layout.ca_cert)
        return self._ca

    # --- creation -------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, settings: FleetSettings) -> tuple["Fleet", Outcome]:
        """Create a fleet in *root* (CA, broker and coordinator identities, signing key).

        Re-running with the same settings only fills in what is missing; with
        different settings it refuses (edit fleet.toml instead) and changes nothing.
        """
        layout = Layout(Path(root).resolve())
        path = layout.root / SETTINGS_FILE
        if layout.root.is_dir() and not path.exists() and any(layout.root.iterdir()):
            raise ConfigError(f"{layout.root} is not empty and not a fleet directory; choose a new or empty one")
        if path.exists():
            current = load_settings(layout.root)
            if current != settings:
                differ = ", ".join(f"{key} ({was!r} there, {want!r} asked)"
                                   for key, was, want in _differences(current.model_dump(), settings.model_dump()))
                raise ConfigError(f"{layout.root} is already a fleet with other settings: {differ}; edit {path} "
                                  "instead (or run init with its settings)")
        with layout.locked():
            written = [path] if write_if_changed(path, settings_toml(settings)) else []
            fleet = cls(layout.root)
            written += artifacts.init_files(fleet)
            written += fleet._ensure_client(settings.coordinator, "coordinator").written
            written += fleet.write_broker_files()
        return fleet, Outcome(layout.root.name, "created" if written else "unchanged", written)

    # --- identities -------------------------------------------------------------
    def records(self) -> list[IdentityRecord]:
        return self.layout.records()

    def devices(self) -> list[IdentityRecord]:
        return [r for r in self.records() if r.role == "device"]

    def describe(self) -> list[dict]:
        """Every identity: name, role, tags, revoked, current serial, expiry, bundle; then the CA (role
        "ca"), the broker's server certificate (role "broker") and the CRL (role "crl", not_after: its next
        update), which expire too."""
        out = []
        for r in self.records():
            cert_path, bundle = self.layout.cert(r.name), self.layout.bundle(r.name)
            not_after = pki.load_cert(cert_path).not_valid_after_utc.isoformat() if cert_path.exists() else ""
            out.append({
                "name": r.name, "role": r.role, "tags": r.tags, "revoked": r.revoked,
                "serial": r.serials[-1] if r.serials else "", "not_after": not_after,
                "bundle": str(bundle) if bundle.exists() else "",
            })
        ca = self.ca.cert
        out.append({"name": pki.common_name(ca), "role": "ca", "tags": [], "revoked": False,
                    "serial": format(ca.serial_number, "x"), "not_after": ca.not_valid_after_utc.isoformat(),
                    "bundle": ""})
        server = self.layout.broker_dir / "server.crt"
        if server.exists():
            cert = pki.load_cert(server)
            out.append({"name": pki.common_name(cert), "role": "broker", "tags": [], "revoked": False,
                        "serial": format(cert.serial_number, "x"), "not_after": cert.not_valid_after_utc.isoformat(),
                        "bundle": ""})
        if self.layout.crl.exists():
            try:
                crl = x509.load_pem_x509_crl(self.layout.crl.read_bytes())
            except ValueError as exc:
                raise ConfigError(f"cannot read {self.layout.crl}: {exc} (`lepton provision broker-config` "
                                  "rebuilds it from ca/revoked.json)") from None
            out.append({"name": "crl", "role": "crl", "tags": [], "revoked": False, "serial": "",
                        "not_after": crl.next_update_utc.isoformat() if crl.next_update_utc else "", "bundle": ""})
        return out

    def add_device(self, device_id: str, tags: Iterable[str] | None = None, rotate: bool = False, **cert_opts) -> Outcome:
        """Issue (or keep) a device's key, certificate, agent config and bundle.

        *tags* None keeps the tags it has. *cert_opts* (days, not_before) are
        for certificates issued now; an existing one is kept unless *rotate*.
        """
        with self.layout.locked():
            outcome = self._device(device_id, tags, rotate, **cert_opts)
            outcome.written += self.write_broker_files()
        return outcome

    def add_devices(
        self, rows: list[tuple[str, list[str]]], rotate: bool = False, progress: Callable[[Outcome], None] | None = None
    ) -> list[Outcome]:
        """Provision many devices; every row is checked before anything is written."""
        self.check_rows(rows)
        outcomes = []
        with self.layout.locked():
            for device_id, tags in rows:
                outcomes.append(self._device(device_id, tags, rotate))
                if progress:
                    progress(outcomes[-1])
            broker = self.write_broker_files()
        if broker:
            outcomes.append(Outcome("broker", "updated", broker))
        return outcomes

    def check_rows(self, rows: list[tuple[str, list[str]]]) -> None:
        """ConfigError for the first bad row: invalid or duplicate id, a name taken by another role,
        tags whose templates make an agent config the agent would refuse."""
        seen: set[str] = set()
        for device_id, tags in rows:
            self._check_device_name(device_name(device_id))
            self.check_agent_config(device_id, _clean_tags(tags))
            if device_id in seen:
                raise ConfigError(f"device id {device_id!r} appears twice in the inventory")
            seen.add(device_id)

    def check_agent_config(self, device_id: str, tags: list[str]) -> None:
        """ConfigError naming the template if the agent would refuse this device's config (checked once per tag list)."""
        if tuple(tags) not in self._checked_tags:
            configs.check_agent_config(self.settings, self.root, device_id, tags)
            self._checked_tags.add(tuple(tags))

    def update_coordinator(self, rotate: bool = False) -> Outcome:
        """Rewrite the coordinator's config and bundle from fleet.toml; with *rotate*, a new key and certificate."""
        self._check_coordinator()
        with self.layout.locked():
            outcome = self._ensure_client(self.settings.coordinator, "coordinator", rotate=rotate)
        if outcome.action == "unchanged" and outcome.written:
            outcome.action = "updated"
        return outcome

    def add_observer(self, name: str, rotate: bool = False) -> Outcome:
        """A read-only identity (dashboards, `mosquitto_sub` checks): reads the whole prefix. A revoked
        observer is re-admitted only with *rotate* (a new key), as a device is."""
        with self.layout.locked():
            record = self.layout.read_record(device_name(name))
            if record is not None and record.revoked and not rotate:
                raise ConfigError(f"observer {name!r} is revoked; `--rotate` issues it a new identity "
                                  "(then restart the broker)")
            outcome = self._ensure_client(device_name(name), "observer", rotate=rotate)
            outcome.written += self.write_broker_files()
        return outcome

    def revoke(self, name: str, superseded: bool = False) -> Outcome:
        """Revoke every certificate *name* ever had, deny it in the ACL, delete its key and bundle.

        *superseded*: revoke only the certificates a rotation replaced, every one but the
        current; the identity, its key, bundle and ACL entries stay as they are. After
        ``--rotate`` (the coordinator's too) this makes the old key worthless at once,
        instead of when its certificate expires.
        """
        with self.layout.locked():
            record = self.layout.read_record(name)
            if record is None:
                raise ConfigError(f"no identity {name!r} in fleet {self.root}")
            if record.role == "coordinator" and not superseded:
                raise ConfigError(f"{name!r} is the fleet's coordinator and cannot be revoked; rotate it "
                                  f"(`lepton provision coordinator --rotate`), install the new bundle, then "
                                  f"`lepton provision revoke {name} --superseded` puts its old certificates on the CRL")
            serials = record.serials[:-1] if superseded and not record.revoked else record.serials
            entries = self.layout.read_revoked()
            known = {e["serial"] for e in entries}
            now = pki.utcnow().isoformat()
            added = [{"serial": s, "name": name, "revoked_at": now} for s in serials if s not in known]
            written = [self.layout.revoked] if added and self.layout.write_revoked(entries + added) else []
            if not superseded:
                record.revoked = True
                if self.layout.write_record(record):
                    written.append(self.layout.record_path(name))
                for secret in (self.layout.key(name), self.layout.bundle(name)):
                    if secret.exists():
                        secret.unlink()
                        written.append(secret)
            written += self.write_broker_files()
        if added:
            log.info("revoked %s: %d certificate(s)%s", name, len(added), ", superseded ones" if superseded else "")
        warnings = []
        if superseded and record.revoked:
            warnings.append("it is revoked already: all its certificates are on the CRL")
        elif superseded and not serials:
            warnings.append("it has no certificate but its current one: nothing was revoked")
        action = ("superseded certificates revoked" if superseded else "revoked") if written else "unchanged"
        return Outcome(name, action, written, warnings)

    # --- broker -----------------------------------------------------------------
    def write_broker_files(self, out: Path | None = None, rotate: bool = False) -> list[Path]:
        """(Re)write CRL, server certificate, ACL and mosquitto.conf where they changed; *rotate*: a new
        server key and certificate, and the CRL issued now (both good for their full lifetime again)."""
        written = artifacts.write_crl(self, renew=rotate)
        written += artifacts.write_broker(self, out or self.layout.broker_dir, rotate=rotate)
        return written

    def apply(self) -> list[Outcome]:
        """Rewrite every valid identity's config and bundle, and the broker files, from fleet.toml (after an
        edit: a new broker host or port, models settings, templates); keys are kept, unchanged files untouched."""
        valid = [r for r in self.devices() if not r.revoked]
        self._check_coordinator()  # every check before the first write: a bad edit writes nothing
        self.check_rows([(r.name, r.tags) for r in valid])
        with self.layout.locked():
            outcomes = [self._device(r.name, None, False) for r in valid]
            coordinator = self._ensure_client(self.settings.coordinator, "coordinator")
            if coordinator.action == "unchanged" and coordinator.written:
                coordinator.action = "updated"
            outcomes.append(coordinator)
            broker = self.write_broker_files()
        outcomes.append(Outcome("broker", "updated" if broker else "unchanged", broker))
        return outcomes

    # --- internals ----------------------------------------------------------------
    def _check_device_name(self, device_id: str) -> None:
        record = self.layout.read_record(device_id)
        if device_id == self.settings.coordinator:
            raise ConfigError(f"{device_id!r} is the coordinator's name in fleet.toml, not a device")
        if record and record.role != "device":
            raise ConfigError(f"{device_id!r} is the name of {_a(record.role)} identity, not a device")

    def _check_coordinator(self) -> None:
        """fleet.toml's coordinator name is the fleet's coordinator: not another identity's name, not a
        rename (a second coordinator identity would keep the first one's rights, and it cannot be revoked)."""
        name = self.settings.coordinator
        record = self.layout.read_record(name)
        if record is not None and record.role != "coordinator":
            raise ConfigError(f"fleet.toml: coordinator {name!r} is the name of {_a(record.role)} identity")
        others = [r.name for r in self.records() if r.role == "coordinator" and r.name != name]
        if others:
            raise ConfigError(f"fleet.toml: coordinator {name!r}, but the fleet's coordinator is {others[0]!r}; "
                              "a coordinator cannot be renamed: set it back")

    def _device(self, device_id: str, tags: Iterable[str] | None, rotate: bool, **cert_opts) -> Outcome:
        device_id = device_name(device_id)
        self._check_device_name(device_id)
        record = self.layout.read_record(device_id) or IdentityRecord(device_id, "device")
        if record.revoked and not rotate:
            raise ConfigError(f"device {device_id!r} is revoked; `--rotate` issues it a new identity (then restart the broker)")
        if tags is not None:
            record.tags = _clean_tags(tags)
        self.check_agent_config(device_id, record.tags)  # before any key, certificate or config is written
        action, written = self._ensure_keypair(record, rotate, **cert_opts)
        written += artifacts.write_device_files(self, record)
        if action == "unchanged" and written:
            action = "updated"
        warnings = [f"tag {tag!r} has no template {self.layout.root / configs.TEMPLATES_DIR / f'tag-{tag}.toml'}; "
                    "it adds nothing to the agent config" for tag in configs.tags_without_template(self.root, record.tags)]
        return Outcome(device_id, action, written, warnings)

    def _ensure_client(self, name: str, role: str, rotate: bool = False) -> Outcome:
        record = self.layout.read_record(name) or IdentityRecord(name, role)
        if record.role != role:
            raise ConfigError(f"{name!r} is already {_a(record.role)} identity")
        action, written = self._ensure_keypair(record, rotate)
        if role == "coordinator":
            written += artifacts.write_coordinator_files(self, record)
        elif self.layout.write_record(record):
            written.append(self.layout.record_path(name))
        return Outcome(name, action, written)

    def _ensure_keypair(self, record: IdentityRecord, rotate: bool, days: int | None = None,
                        not_before: dt.datetime | None = None) -> tuple[str, list[Path]]:
        """Keep a matching key + certificate, or issue a new pair (rotate, missing, revoked)."""
        key_path, cert_path = self.layout.key(record.name), self.layout.cert(record.name)
        if not rotate and not record.revoked and key_path.exists() and cert_path.exists():
            return "unchanged", []
        existed = bool(record.serials)
        make_dir(self.layout.identity_dir(record.name), private=True)
        key = pki.new_key()
        cert = self.ca.issue(key.public_key(), record.name, days or self.settings.pki.cert_days, not_before=not_before)
        write_private(key_path, pki.key_pem(key))
        write_if_changed(cert_path, pki.cert_pem(cert))
        record.serials.append(format(cert.serial_number, "x"))
        record.revoked = False
        self.layout.write_record(record)
        return ("rotated" if existed else "created"), [key_path, cert_path, self.layout.record_path(record.name)]


def _a(role: str) -> str:
    """'a device', 'an observer'."""
    return f"{'an' if role[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {role}"


def _clean_tags(tags: Iterable[str]) -> list[str]:
    out: list[str] = []
    for tag in tags:
        tag = tag.strip()
        if not tag:
            continue
        try:
            check_id(tag, "tag")
        except LeptonError as exc:
            raise ConfigError(str(exc)) from None
        if tag not in out:
            out.append(tag)
    return out


def _differences(have: dict, want: dict, where: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in *have*, value in *want*) wherever the two settings differ."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append((f"{where}{key}", a, b))
    return out
