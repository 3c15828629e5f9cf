"""The models the coordinator can place: its view of the model registry.

Reads the registry directory (``[models] dir``; default: the shipped zoo)
through ``lepton.models.registry.Registry``, and beside a configured
directory the shipped zoo too, while the zoo's key is trusted (no
``trusted_keys`` given, or the zoo's among them): a fleet that adds its own
models keeps the zoo's, and a version in the directory wins over the same
version in the zoo. Only models whose manifests validate and whose size,
sha256 and signature verify are offered; ``reload`` reads again (the
coordinator does on SIGHUP). Each model's bench
profile (the inference time the planner assumes before any device has
measured it) comes from a ``bench.json`` next to the manifest
(``{"invoke_ms": 3.2}``), else the manifest's ``metrics.invoke_ms``, else the
planner's ``default_compute_ms``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lepton.errors import ConfigError, LeptonError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogModel:
    """One model version as devices fetch it."""

    name: str
    version: str
    sha256: str
    size: int
    path: Path  # the .tflite
    manifest_path: Path
    memory_mb: float | None = None
    compute_ms: float | None = None  # bench profile
    family: str = ""
    variant: str = ""

    def row(self) -> dict:
        """As stored in the fleet registry's ``models`` table."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size,
                "memory_mb": self.memory_mb, "compute_ms": self.compute_ms, "family": self.family, "variant": self.variant}


class Catalog:
    """Model versions by (name, version), reloaded on demand."""

    def __init__(self, root: str | Path = "", trusted_keys: list[str] | tuple = ()):
        self._root = Path(root) if root else None
        self.trusted_keys = [Path(k) for k in trusted_keys]
        self._models: dict[tuple[str, str], CatalogModel] = {}

    @property
    def root(self) -> Path:
        """The registry directory (the shipped zoo unless configured)."""
        if self._root is None:
            self._root = _zoo_dir()
        return self._root

    def roots(self) -> list[Path]:
        """The registry directories read: the configured one, then the zoo while its key is trusted."""
        roots = [self.root]
        if self._root is not None and self._zoo_trusted():
            zoo = _zoo_dir()
            if zoo.is_dir() and zoo.resolve() != self.root.resolve():
                roots.append(zoo)
        return roots

    def _zoo_trusted(self) -> bool:
        if not self.trusted_keys:
            return True  # the registry's default: the zoo key
        try:
            from lepton.models.registry import zoo_public_key

            zoo = Path(zoo_public_key()).read_bytes()
        except (ImportError, OSError):
            return False
        return any(_read(k) == zoo for k in self.trusted_keys)

    def reload(self) -> list[CatalogModel]:
        """Read the registry again; ConfigError if its directory is missing (what was offered stays then)."""
        if not self.root.is_dir():
            raise ConfigError(f"model registry directory {self.root} does not exist")
        try:
            from lepton.models.registry import Registry  # the models part owns manifest validation
        except ModuleNotFoundError:
            raise ConfigError("the model registry (lepton.models.registry) is not installed") from None

        checked = []
        for root in self.roots():
            try:
                checked += Registry(root, trusted_keys=self.trusted_keys or None).verify_all()
            except LeptonError as exc:
                raise ConfigError(f"model registry {root}: {exc}") from None
            except OSError as exc:  # e.g. a file the coordinator's user cannot read
                raise ConfigError(f"model registry {root}: {exc.strerror or exc}"
                                  + (f": {exc.filename}" if exc.filename else "")) from None
        found = {}
        for entry, problem in checked:
            if problem:  # devices would refuse it anyway: never offer it
                log.warning("not offering %s %s: %s", entry.manifest.name, entry.manifest.version, problem)
                continue
            man = entry.manifest
            if any(n == man.name and _same_version(v, man.version) for n, v in found):
                continue  # the configured directory's copy wins over the zoo's (1.0 and 1.0.0 are one version)
            found[(man.name, man.version)] = CatalogModel(
                name=man.name, version=man.version, sha256=man.sha256, size=man.size, path=Path(entry.path),
                manifest_path=Path(entry.manifest_path), memory_mb=getattr(man, "memory_mb", None),
                compute_ms=_bench_ms(Path(entry.manifest_path), getattr(man, "metrics", None) or {}),
                family=getattr(man, "family", "") or "", variant=getattr(man, "variant", "") or "",
            )
        self._models = found
        log.info("model registry %s: %d model versions", " + ".join(str(r) for r in self.roots()), len(found))
        return list(found.values())

    def add(self, model: CatalogModel) -> None:
        """Offer one more model version (e.g. one built in place); the registry directory is not touched."""
        self._models[(model.name, model.version)] = model

    def all(self) -> list[CatalogModel]:
        return sorted(self._models.values(), key=lambda c: (c.name, c.version))

    def get(self, name: str, version: str | None = None) -> CatalogModel | None:
        """That version, or the newest of *name* when *version* is None."""
        if version is not None:
            return self._models.get((name, version))
        versions = [c for (n, _), c in self._models.items() if n == name]
        from lepton.coordinator.registry import _version_key

        return max(versions, key=lambda c: _version_key(c.version), default=None)


def _same_version(a: str, b: str) -> bool:
    from lepton.coordinator.registry import _version_key

    return _version_key(a) == _version_key(b)


def _read(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _zoo_dir() -> Path:
    try:
        from lepton.models.registry import zoo_dir
    except ModuleNotFoundError:
        raise ConfigError("the model registry (lepton.models.registry) is not installed") from None

    return Path(zoo_dir())


def _bench_ms(manifest_path: Path, metrics: dict) -> float | None:
    bench = manifest_path.parent / "bench.json"
    try:
        data = json.loads(bench.read_text()) if bench.exists() else {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable bench profile %s: %s", bench, exc)
        data = {}
    for source in (data, metrics if isinstance(metrics, dict) else {}):
        value = source.get("invoke_ms") or source.get("invoke_ms_median") or source.get("median_ms")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None
