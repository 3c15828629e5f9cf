"""Writing fleet files: atomically, only when changed, private keys 0600 from birth.

A private key is created with ``os.open(..., 0o600)`` and never chmod-ed
afterwards, so there is no instant at which another user could read it.
Every write goes to a temporary file in the same directory and is renamed
over the target, so a crash leaves the old file or the new one, never half.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def make_dir(path: Path, private: bool = False) -> Path:
    """Create *path* (and parents); a new private directory is born 0700."""
    path = Path(path)
    if not path.is_dir():
        make_dir(path.parent)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE if private else 0o755)
        except FileExistsError:
            pass
    return path


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Write *data* to *path* through a temporary file created with *mode*."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, data: bytes, private: bool = False) -> bool:
    """Write *data* unless *path* already holds exactly it; True if written.

    Leaving an identical file alone keeps its mtime, which is what makes a
    re-run of provisioning change nothing.
    """
    path = Path(path)
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    write_atomic(path, data, PRIVATE_MODE if private else PUBLIC_MODE)
    return True


def write_private(path: Path, data: bytes) -> bool:
    """Write a secret (private key): mode 0600 from creation."""
    return write_if_changed(path, data, private=True)
