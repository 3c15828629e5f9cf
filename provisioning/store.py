"""The fleet directory on disk: where each piece lives, and identity records.

    fleet.toml                     settings (provisioning/settings.py)
    ca/ca.key ca.crt               the CA (key 0600)
    ca/revoked.json crl.pem        revocations and the CRL built from them
    signing/models.key models.pub  Ed25519 model-signing key pair
    templates/agent.toml           base of every agent config (+ tag-<tag>.toml)
    identities/<name>/             key.pem (0600), cert.pem, identity.json, config
    broker/                        what the broker host needs (mosquitto.conf, acl, ...)
    bundles/<name>.tar.gz          what a device or the coordinator host needs (0600)
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from lepton.errors import ConfigError
from lepton.provisioning.files import make_dir, write_if_changed


@dataclass
class IdentityRecord:
    """What the fleet knows about one identity besides its key and certificate."""

    name: str
    role: str  # "device" | "coordinator" | "observer"
    tags: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)  # hex, every certificate ever issued to it
    revoked: bool = False

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Layout:
    """Paths inside one fleet directory."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def revoked(self) -> Path:
        return self.ca_dir / "revoked.json"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing" / "models.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing" / "models.pub"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    def identity_dir(self, name: str) -> Path:
        return self.root / "identities" / name

    def key(self, name: str) -> Path:
        return self.identity_dir(name) / "key.pem"

    def cert(self, name: str) -> Path:
        return self.identity_dir(name) / "cert.pem"

    def record_path(self, name: str) -> Path:
        return self.identity_dir(name) / "identity.json"

    def bundle(self, name: str) -> Path:
        return self.bundles_dir / f"{name}.tar.gz"

    # --- identity records -------------------------------------------------
    def read_record(self, name: str) -> IdentityRecord | None:
        try:
            data = json.loads(self.record_path(name).read_text())
            return IdentityRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read {self.record_path(name)}: {exc}") from None

    def write_record(self, record: IdentityRecord) -> bool:
        make_dir(self.identity_dir(record.name), private=True)
        return write_if_changed(self.record_path(record.name), record.to_bytes())

    def records(self) -> list[IdentityRecord]:
        base = self.root / "identities"
        if not base.is_dir():
            return []
        found = (self.read_record(p.name) for p in sorted(base.iterdir()) if p.is_dir())
        return [r for r in found if r is not None]

    # --- revocations --------------------------------------------------------
    def read_revoked(self) -> list[dict]:
        try:
            return json.loads(self.revoked.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.revoked}: {exc}") from None

    def write_revoked(self, entries: list[dict]) -> bool:
        return write_if_changed(self.revoked, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode())

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the fleet's lock: two provision commands never interleave writes."""
        make_dir(self.root)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
