"""Bundles: one tar.gz per identity with everything its host needs to join.

The archive is byte-for-byte reproducible (sorted entries, fixed times and
owners, gzip without a timestamp), so re-provisioning an unchanged device
rewrites nothing. It holds exactly one private key: its own.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from importlib import resources

# A fixed, plausible time for every entry (2024-01-01): archives stay
# reproducible and tar does not warn about timestamps in the future or at 0.
FIXED_MTIME = 1704067200


@dataclass(frozen=True)
class Member:
    """A file in a bundle: path relative to the bundle's top directory."""

    path: str
    data: bytes
    mode: int = 0o644


def template(name: str) -> bytes:
    """A file shipped in lepton.provisioning/templates (install.sh, units)."""
    return resources.files("lepton.provisioning").joinpath("templates", name).read_bytes()


def build(top: str, members: list[Member]) -> bytes:
    """A reproducible tar.gz of *members* under directory *top*."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({f"{top}/{m.path}".rsplit("/", 1)[0] for m in members} | {top})
        for d in dirs:
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o700 if d != top else 0o755, 0))
        for m in sorted(members, key=lambda m: m.path):
            tar.addfile(_info(f"{top}/{m.path}", tarfile.REGTYPE, m.mode, len(m.data)), io.BytesIO(m.data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def list_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    """Name -> TarInfo of the regular files in a bundle (for checks and tests)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers() if m.isfile()}
