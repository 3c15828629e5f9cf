"""Ed25519 keys and manifest signatures.

Keys are PEM files: the private key PKCS#8 (unencrypted, written mode 0600),
the public key SubjectPublicKeyInfo. A manifest names the key that signed it
by ``key_id`` (the first 16 hex digits of the sha256 of the raw public key),
so a verifier with several trusted keys can say which one is missing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Iterable, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lepton.errors import ConfigError, ModelError
from lepton.models.manifest import Manifest

PublicKeyLike = Union[Ed25519PublicKey, str, os.PathLike]
SIGNATURE_BYTES = 64


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"key file {path}: cannot be written: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_TRUNC


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair (private mode 0600); returns its key id.

    Refuses to overwrite existing files unless ``overwrite``: losing a signing
    key means re-signing every manifest a fleet trusts.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise ConfigError(f"key file {path} already exists; refusing to overwrite it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600, overwrite)
    _write_new(public_path, public_pem, 0o644, overwrite)
    return key_id(key.public_key())


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; ConfigError naming the file otherwise."""
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"private key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path}: is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ConfigError naming the file otherwise."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path}: is a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """A copy of ``manifest`` with ``key_id`` set and signed; the original is not changed."""
    unsigned = manifest.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": ""})
    signature = private_key.sign(unsigned.canonical_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def _public(key: PublicKeyLike) -> Ed25519PublicKey:
    return key if isinstance(key, Ed25519PublicKey) else load_public_key(key)


def _signature_bytes(manifest: Manifest, what: str) -> bytes:
    if not manifest.signature:
        raise ModelError(f"{what}: signature check failed: the manifest is not signed")
    try:
        raw = base64.b64decode(manifest.signature, validate=True)
    except (binascii.Error, ValueError):
        raise ModelError(f"{what}: signature check failed: the signature is not valid base64") from None
    if len(raw) != SIGNATURE_BYTES:
        raise ModelError(
            f"{what}: signature check failed: the signature is {len(raw)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}"
        )
    return raw


def verify_manifest(manifest: Manifest, public_keys: Iterable[PublicKeyLike]) -> None:
    """Return if a trusted key signed exactly this manifest; else ModelError saying why."""
    what = f"model {manifest.name} {manifest.version}"
    keys = [_public(k) for k in public_keys]
    if not keys:
        raise ModelError(f"{what}: signature check failed: no trusted public key is configured")
    signature = _signature_bytes(manifest, what)
    by_id = {key_id(k): k for k in keys}
    if manifest.key_id:
        if manifest.key_id not in by_id:
            raise ModelError(
                f"{what}: signature check failed: signed by key {manifest.key_id}, which is not trusted "
                f"(trusted: {', '.join(sorted(by_id))})"
            )
        candidates = [by_id[manifest.key_id]]
    else:
        candidates = keys
    payload = manifest.canonical_bytes()
    for key in candidates:
        try:
            key.verify(signature, payload)
            return
        except InvalidSignature:
            continue
    raise ModelError(
        f"{what}: signature check failed: the signature does not match the manifest "
        "(the manifest or its signature was altered after signing)"
    )
