"""A model registry: a directory of signed model versions.

Layout: each model version is a directory holding ``manifest.json`` and the
.tflite it names, either ``<root>/<name>/`` (the shipped zoo: one version per
model) or ``<root>/<name>/<version>/`` (what :meth:`Registry.add` and
:meth:`Registry.install` write). Directories starting with ``.`` are staging
areas and never listed.

Trust: a version is trusted when its manifest is signed by a trusted key and
the file's size and sha256 match it. A version older than the newest trusted
version of the same model is refused, so a replayed old (perhaps vulnerable)
model cannot replace a newer one. Installs are atomic (staged, fsynced,
renamed), so a crash leaves the old version or the new one, never a part.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import Version

from lepton.errors import ModelError
from lepton.models.manifest import (
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    load_manifest,
    parse_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

ENV_DIR = "LEPTON_MODELS_DIR"


def zoo_dir() -> Path:
    """The shipped zoo (models/zoo)."""
    return Path(__file__).resolve().parent / "zoo"


def zoo_public_key() -> Path:
    """The key the zoo's manifests are signed with (models/zoo/zoo.pub)."""
    return zoo_dir() / "zoo.pub"


def default_registry() -> "Registry":
    """``$LEPTON_MODELS_DIR`` if set, else the shipped zoo, trusting the zoo key."""
    return Registry(Path(os.environ.get(ENV_DIR) or zoo_dir()))


@dataclass(frozen=True)
class Entry:
    """One model version in a registry."""

    manifest: Manifest
    path: Path  # the .tflite
    manifest_path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def directory(self) -> Path:
        return self.manifest_path.parent

    def label(self) -> str:
        """``name version`` for messages."""
        return f"{self.manifest.name} {self.manifest.version}"


def check_file(manifest: Manifest, model_path: Path) -> None:
    """ModelError unless the file has the manifest's size and sha256 (named as the failed check)."""
    from lepton.models.metadata import sha256_file

    what = f"model {manifest.name} {manifest.version}"
    try:
        size = model_path.stat().st_size
    except OSError as exc:
        raise ModelError(f"{what}: file check failed: {model_path} cannot be read: {exc.strerror or exc}") from None
    if size != manifest.size:
        raise ModelError(f"{what}: size check failed: {model_path} is {size} bytes, the manifest says {manifest.size}")
    digest = sha256_file(model_path)
    if digest != manifest.sha256:
        raise ModelError(
            f"{what}: sha256 check failed: {model_path} has sha256 {digest}, the manifest says {manifest.sha256}"
        )


class Registry:
    """Model versions under ``root``, trusted when signed by one of ``trusted_keys``.

    ``trusted_keys`` None trusts the zoo key (models/zoo/zoo.pub) only.
    """

    def __init__(self, root: str | os.PathLike, trusted_keys: list[Path] | None = None):
        self.root = Path(root)
        self.trusted_keys = [Path(k) for k in trusted_keys] if trusted_keys is not None else [zoo_public_key()]
        self._keys: list[Any] | None = None

    def public_keys(self) -> list[Any]:
        """The trusted keys, loaded once; ConfigError naming a bad key file."""
        if self._keys is None:
            from lepton.models.signing import load_public_key

            self._keys = [load_public_key(p) for p in self.trusted_keys]
        return self._keys

    # -- reading ------------------------------------------------------------

    def _manifest_paths(self) -> list[Path]:
        if not self.root.is_dir():
            raise ModelError(f"model registry {self.root}: not a directory")
        found = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            if (child / MANIFEST_NAME).is_file():
                found.append(child / MANIFEST_NAME)
            found += [g / MANIFEST_NAME for g in sorted(child.iterdir())
                      if not g.name.startswith(".") and (g / MANIFEST_NAME).is_file()]
        return found

    def scan(self) -> tuple[list[Entry], list[tuple[Path, str]]]:
        """(entries whose manifests parse, sorted by name and version; [(manifest path, why not)])."""
        entries: dict[tuple[str, str], Entry] = {}
        problems: list[tuple[Path, str]] = []
        for path in self._manifest_paths():
            try:
                manifest = load_manifest(path)
            except ModelError as exc:
                problems.append((path, str(exc)))
                continue
            key = (manifest.name, str(manifest.parsed_version))
            if key in entries:
                problems.append((path, f"model {manifest.name} {manifest.version} is also at {entries[key].manifest_path}"))
                continue
            entries[key] = Entry(manifest, path.parent / manifest.file, path)
        ordered = sorted(entries.values(), key=lambda e: (e.name, e.manifest.parsed_version))
        return ordered, problems

    def list(self, verified: bool = False) -> list[Entry]:
        """Every model version whose manifest parses (only those that verify, if ``verified``)."""
        entries, problems = self.scan()
        for path, reason in problems:
            log.warning("model registry %s: skipping %s: %s", self.root, path, reason)
        if verified:
            entries = [e for e, reason in self.check(entries) if reason is None]
        return entries

    def names(self) -> list[str]:
        """Model names present."""
        return sorted({e.name for e in self.list()})

    def get(self, name: str, version: str | None = None, verified: bool = False) -> Entry:
        """That version of ``name``, or the newest; ModelError if the registry lacks it.

        ``verified``: choose among versions that verify only, so a tampered
        newer copy does not hide the trusted one before it.
        """
        versions = [e for e in self.list() if e.name == name]
        if not versions:
            have = ", ".join(self.names()) or "none"
            raise ModelError(f"no model named {name!r} in registry {self.root} (models: {have})")
        if verified:
            checked = self.check(versions)
            versions = [e for e, reason in checked if reason is None]
            if not versions:
                raise ModelError(f"no version of model {name} verifies in registry {self.root}: {checked[-1][1]}")
        if version is None:
            return versions[-1]
        wanted = Version(version) if _is_version(version) else None
        for entry in versions:
            if entry.manifest.parsed_version == wanted:
                return entry
        have = ", ".join(e.version for e in versions)
        raise ModelError(f"model {name} has no version {version!r} in registry {self.root} (versions: {have})")

    # -- checking -----------------------------------------------------------

    def verify(self, entry: Entry) -> None:
        """Signature, size, sha256: ModelError naming the check that failed."""
        from lepton.models.signing import verify_manifest

        verify_manifest(entry.manifest, self.public_keys())
        check_file(entry.manifest, entry.path)

    def check(self, entries: list[Entry]) -> list[tuple[Entry, str | None]]:
        """Each entry with None (trusted) or the reason it is not."""
        results = []
        for entry in entries:
            try:
                self.verify(entry)
                results.append((entry, None))
            except ModelError as exc:
                results.append((entry, str(exc)))
        return results

    def verify_all(self) -> list[tuple[Entry, str | None]]:
        """Every parseable entry with None (trusted) or the reason it is not."""
        return self.check(self.list())

    def trusted_version(self, name: str) -> Version | None:
        """The newest version of ``name`` that verifies, or None."""
        good = [e.manifest.parsed_version for e, reason in self.verify_all() if e.name == name and reason is None]
        return max(good, default=None)

    # -- writing ------------------------------------------------------------

    def add(self, tflite_path: str | os.PathLike, name: str, version: str, spec_path_or_dict: Any,
            private_key_path: str | os.PathLike) -> Entry:
        """Describe, sign and install a .tflite as ``name`` ``version``; returns its Entry.

        The spec (a JSON file or dict) gives preprocess, postprocess and
        optionally family, variant, task, labels, metrics, trained, notes.
        Refused (nothing written) if the version is older than one trusted here.
        """
        from lepton.models.signing import load_private_key, sign_manifest

        key = load_private_key(private_key_path)
        manifest = build_manifest(tflite_path, name, version, _read_spec(spec_path_or_dict))
        signed = sign_manifest(manifest, key)
        return self.install(signed, tflite_path, extra_keys=[key.public_key()])

    def install(self, manifest: Manifest | bytes | str | os.PathLike, model_path: str | os.PathLike,
                extra_keys: list[Any] = ()) -> Entry:
        """Verify and atomically install a signed model version; returns its Entry.

        ``manifest`` is a Manifest, its JSON bytes (e.g. as downloaded) or a
        path to a manifest file; ``model_path`` the .tflite. Checks, in order: manifest format, signature (trusted keys +
        ``extra_keys``), the file's size and sha256, and that the version is
        not older than the newest trusted here. Re-installing an identical
        version returns the existing entry. Any failure raises ModelError and
        leaves the registry as it was.
        """
        from lepton.models.signing import verify_manifest

        manifest = _as_manifest(manifest)
        model_path = Path(model_path)
        verify_manifest(manifest, [*self.public_keys(), *extra_keys])
        check_file(manifest, model_path)
        existing = self._check_version(manifest, extra_keys)
        if existing is not None:
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        return self._place(manifest, model_path)

    def _check_version(self, manifest: Manifest, extra_keys: list[Any]) -> Entry | None:
        from lepton.models.signing import verify_manifest

        what = f"model {manifest.name} {manifest.version}"
        trusted = []
        for entry in (e for e in (self.list() if self.root.is_dir() else []) if e.name == manifest.name):
            try:
                verify_manifest(entry.manifest, [*self.public_keys(), *extra_keys])
                check_file(entry.manifest, entry.path)
            except ModelError:
                continue  # an untrusted copy sets no floor
            trusted.append(entry)
        newest = max((e.manifest.parsed_version for e in trusted), default=None)
        if newest is not None and manifest.parsed_version < newest:
            raise ModelError(f"{what}: version check failed: older than version {newest}, which this registry already trusts")
        for entry in trusted:
            if entry.manifest.parsed_version == manifest.parsed_version:
                if entry.manifest.canonical_bytes() == manifest.canonical_bytes():
                    return entry
                raise ModelError(
                    f"{what}: version check failed: this version is already installed with different content "
                    "(publish the change as a new version)"
                )
        return None

    def _place(self, manifest: Manifest, model_path: Path) -> Entry:
        final = self.root / manifest.name / manifest.version
        staging = self.root / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._clean_staging()
        try:
            staging.mkdir()
            target = staging / manifest.file
            shutil.copyfile(model_path, target)
            _fsync(target)
            write_manifest(manifest, staging / MANIFEST_NAME)
            check_file(manifest, target)  # what landed is what was verified
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # an untrusted leftover of the same version: replace it
                trash = self.root / f".trash-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, final)
            _fsync(final.parent)
        except OSError as exc:
            raise ModelError(f"model {manifest.name} {manifest.version}: cannot install into {self.root}: {exc}") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("installed model %s %s into %s", manifest.name, manifest.version, final)
        return Entry(manifest, final / manifest.file, final / MANIFEST_NAME)

    def _clean_staging(self) -> None:
        """Remove staging areas left by a process that died mid-install."""
        for child in self.root.glob(".staging-*"):
            pid = child.name.split("-")[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(child, ignore_errors=True)
        for child in self.root.glob(".trash-*"):
            shutil.rmtree(child, ignore_errors=True)

    def heldout_path(self, entry: Entry) -> Path | None:
        """The entry's held-out data: beside the manifest, else in ``<root>/<family>/``."""
        name = entry.manifest.heldout
        if not name:
            return None
        for directory in (entry.directory, self.root / entry.manifest.family):
            if (directory / name).is_file():
                return directory / name
        return None


def _is_version(text: str) -> bool:
    from packaging.version import InvalidVersion

    try:
        Version(text)
        return True
    except InvalidVersion:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_manifest(manifest: Manifest | bytes | str | os.PathLike) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, bytes):
        return parse_manifest(manifest)
    return load_manifest(manifest)


def _read_spec(spec: Any) -> dict:
    import json

    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelError(f"spec {path}: cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ModelError(f"spec {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"spec {path}: must be a JSON object")
    return data
