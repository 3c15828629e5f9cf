"""Model delivery: fetch a placed model over HTTP(S), verify it, install it atomically.

``placement/desired`` names each model by name, version, size, sha256 and the
URLs of its file and signed manifest. ``Fetcher.ensure(ref)`` returns a
verified registry Entry for it:

1. A copy already here (the shipped zoo, ``models.dir``, or the cache of
   earlier downloads) with the same version and sha256 that verifies is used
   as it is: nothing is downloaded.
2. A version older than the newest this device already trusts is refused
   before any byte is fetched (a replayed old model never replaces a newer one).
3. Otherwise the signed manifest is fetched first (it must describe the
   name, version, size and sha256 placement named), then the file is
   downloaded to ``<cache_dir>/.downloads/*.part``;
   an interrupted download resumes with a ``Range`` request (``If-Range`` on
   the sha256 ETag, so a resume never mixes two files), the part file is
   fsynced and checked against the reference's size and sha256, then
   ``Registry(cache_dir).install`` checks the manifest's signature against the
   trusted keys, the file again and the version, and moves it into place with
   a staged directory, fsync and rename. A crash at any point leaves the old
   version or the new one in the cache, never a part of one.

Every refusal is a ModelError naming the check that failed. Downloads of at
least ``MIN_SAMPLE_BYTES`` feed the downlink estimate (``links``).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError, ModelError
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_MANIFEST_BYTES = 1 << 20
MIN_SAMPLE_BYTES = 32 * 1024  # smaller downloads say more about latency than throughput
PROGRESS_EVERY_S = 2.0
KEEP_VERSIONS = 2  # cached versions kept per model (besides those in use): the newest and the one before
STALE_PART_S = 7 * 86400.0  # a part file untouched this long is a download no placement wants any more


def manifest_url(ref: m.ModelRef) -> str:
    """The manifest's URL: the reference's, else ``manifest.json`` beside the model file."""
    return ref.manifest_url or ref.url.rsplit("/", 1)[0] + "/manifest.json"


class Fetcher:
    """Finds, downloads and installs model versions for one device.

    ``local`` are read-only registries searched before downloading (the zoo,
    ``models.dir``); ``cache_dir`` is where downloads are installed.
    ``on_download(nbytes, seconds)`` receives measured transfers (the link
    estimate); ``progress`` holds ``{model: (bytes done, size)}`` while
    downloads run (telemetry reads it).
    """

    def __init__(self, cache_dir: str | Path, trusted_keys: list[Path], local: list[Any] = (),
                 timeout_s: float = 20.0, attempts: int = 4, ca_file: str = "",
                 on_download: Callable[[int, float], None] | None = None, ca_key: str = "models.http_ca") -> None:
        from lepton.models.registry import Registry, zoo_public_key

        self.cache_dir = Path(cache_dir)
        keys = [zoo_public_key(), *[Path(k) for k in trusted_keys]]
        self.cache = Registry(self.cache_dir, trusted_keys=keys)
        self.local = list(local)
        self.timeout_s, self.attempts = timeout_s, attempts
        self.on_download = on_download
        self.progress: dict[str, tuple[int, int]] = {}
        self.downloaded = 0  # files fetched over HTTP (not found locally)
        try:
            self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{ca_key} {ca_file}: cannot be used for model downloads: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None

    @property
    def registries(self) -> list[Any]:
        """Every registry searched, the cache last (it holds what was delivered)."""
        return [*self.local, self.cache]

    # --- looking locally ------------------------------------------------------------
    def find_local(self, ref: m.ModelRef) -> Any | None:
        """A verified local entry with the reference's version and sha256, or None."""
        for registry in self.registries:
            if not registry.root.is_dir():
                continue
            for entry in registry.list():
                if entry.name != ref.name or entry.manifest.sha256 != ref.sha256:
                    continue
                if entry.version != ref.version and str(entry.manifest.parsed_version) != ref.version:
                    continue
                try:
                    registry.verify(entry)
                    return entry
                except ModelError as exc:
                    log.warning("local copy of %s %s does not verify, fetching it again: %s",
                                ref.name, ref.version, exc)
        return None

    def newest_trusted(self, name: str) -> Any | None:
        """The newest version of *name* that verifies in any local registry (a packaging Version), or None."""
        best = None
        for registry in self.registries:
            if not registry.root.is_dir():
                continue
            for entry, reason in registry.check([e for e in registry.list() if e.name == name]):
                if reason is None and (best is None or entry.manifest.parsed_version > best):
                    best = entry.manifest.parsed_version
        return best

    def newest_local(self, name: str) -> list[Any]:
        """Verified local entries of *name*, newest first (what to start with after a restart)."""
        found = []
        for registry in self.registries:
            if registry.root.is_dir():
                found += [e for e, reason in registry.check([e for e in registry.list() if e.name == name])
                          if reason is None]
        return sorted(found, key=lambda e: e.manifest.parsed_version, reverse=True)

    # --- the one entry point ----------------------------------------------------------
    def ensure(self, ref: m.ModelRef) -> Any:
        """A verified Entry for *ref*: found here, else downloaded and installed; ModelError naming the check."""
        entry = self.find_local(ref)
        if entry is not None:
            return entry
        self._check_not_older(ref)
        for url in (ref.url, manifest_url(ref)):
            _check_url(ref, url)
        try:
            manifest = self._manifest(ref)  # small, and it must describe what placement named: before the big file
            part = self._download(ref)
            try:
                entry = self.cache.install(manifest, part)
            finally:
                part.unlink(missing_ok=True)
        except (OSError, ValueError) as exc:  # e.g. the cache cannot be written: a reason, never a crash
            raise ModelError(f"model {ref.name} {ref.version}: could not be installed in {self.cache_dir}: "
                             f"{_why(exc)}") from None
        self.downloaded += 1
        return entry

    def discard(self, entry: Any) -> None:
        """Remove a delivered version that verified but cannot be loaded (it would be retried at every start)."""
        if self._remove(Path(entry.manifest_path).parent):
            log.info("removed %s %s from the model cache: it cannot be loaded", entry.name, entry.version)

    def prune(self, in_use: set[tuple[str, str]], now: float | None = None) -> list[tuple[str, str]]:
        """Delete from the cache what a fleet no longer needs; the (name, version) pairs deleted.

        Per model the cache keeps its ``KEEP_VERSIONS`` newest versions (the
        newest anchors the check that refuses older downloads; the one before
        it is there for a rollback without a download) and every version
        *in_use*. A part file untouched for ``STALE_PART_S`` (a download no
        placement asks for any more) and the leftovers of an interrupted
        removal go too. The zoo and ``models.dir`` are never touched.
        """
        now = time.time() if now is None else now
        removed: list[tuple[str, str]] = []
        if not self.cache_dir.is_dir():
            return removed
        by_name: dict[str, list[Any]] = {}
        for entry in self.cache.list():
            by_name.setdefault(entry.name, []).append(entry)
        for name, entries in sorted(by_name.items()):
            entries.sort(key=lambda e: e.manifest.parsed_version, reverse=True)
            for entry in entries[KEEP_VERSIONS:]:
                if (entry.name, entry.version) in in_use:
                    continue
                if self._remove(Path(entry.manifest_path).parent):
                    removed.append((entry.name, entry.version))
                    log.info("removed %s %s from the model cache: %d newer version(s) kept", name, entry.version,
                             KEEP_VERSIONS)
        for leftover in self.cache_dir.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for part in (self.cache_dir / ".downloads").glob("*.part"):
            try:
                if now - part.stat().st_mtime > STALE_PART_S:
                    part.unlink()
                    log.info("removed the abandoned download %s", part.name)
            except OSError:
                pass
        return removed

    def _remove(self, directory: Path) -> bool:
        """Move a version directory of the cache out of sight, then delete it (a crash leaves only a .trash-*)."""
        if self.cache_dir.resolve() not in directory.resolve().parents:
            return False  # never touch the zoo or models.dir
        trash = self.cache_dir / f".trash-{directory.parent.name}-{directory.name}"
        try:
            os.replace(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return True
        except OSError as exc:
            log.warning("could not remove %s from the model cache: %s", directory, exc)
            return False

    def _check_not_older(self, ref: m.ModelRef) -> None:
        from packaging.version import InvalidVersion, Version

        try:
            wanted = Version(ref.version)
        except InvalidVersion:
            raise ModelError(f"model {ref.name} {ref.version}: version check failed: not a PEP 440 version") from None
        newest = self.newest_trusted(ref.name)
        if newest is not None and wanted < newest:
            raise ModelError(f"model {ref.name} {ref.version}: version check failed: older than version {newest}, "
                             "which this device already trusts")

    # --- HTTP -----------------------------------------------------------------------------
    def _open(self, url: str, headers: dict[str, str]) -> Any:
        request = urllib.request.Request(url, headers={"User-Agent": "lepton-agent", **headers})
        return urllib.request.urlopen(request, timeout=self.timeout_s, context=self._ssl)

    def _manifest(self, ref: m.ModelRef) -> bytes:
        url = manifest_url(ref)
        last = ""
        for attempt in range(self.attempts):
            try:
                with self._open(url, {}) as response:
                    data = response.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise ModelError(f"model {ref.name} {ref.version}: manifest {url} is larger than {MAX_MANIFEST_BYTES} bytes")
                self._check_manifest_matches(ref, data)
                return data
            except urllib.error.HTTPError as exc:
                raise ModelError(f"model {ref.name} {ref.version}: download failed: {url}: HTTP {exc.code} {exc.reason}") from None
            except ValueError as exc:  # urllib's refusal of the URL itself: no use trying again
                raise ModelError(f"model {ref.name} {ref.version}: URL check failed: {url}: {exc}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                last = _why(exc)
                time.sleep(min(2.0, 0.25 * 2 ** attempt))
        raise ModelError(f"model {ref.name} {ref.version}: download failed: {url}: {last}")

    @staticmethod
    def _check_manifest_matches(ref: m.ModelRef, data: bytes) -> None:
        from lepton.models.manifest import parse_manifest

        manifest = parse_manifest(data, where=f"manifest of {ref.name} {ref.version}")
        said = (manifest.name, manifest.sha256, manifest.size)
        if said != (ref.name, ref.sha256, ref.size) or str(manifest.parsed_version) != str(_version(ref.version)):
            raise ModelError(f"model {ref.name} {ref.version}: manifest check failed: the manifest describes "
                             f"{manifest.name} {manifest.version} (sha256 {manifest.sha256[:12]}, {manifest.size} bytes), "
                             f"placement asked for sha256 {ref.sha256[:12]}, {ref.size} bytes")

    def _part_path(self, ref: m.ModelRef) -> Path:
        directory = self.cache_dir / ".downloads"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"model {ref.name} {ref.version}: cannot write the model cache: {directory}: "
                             f"{exc.strerror or exc}") from None
        return directory / f"{ref.name}-{ref.version}-{ref.sha256[:16]}.part"

    def _download(self, ref: m.ModelRef) -> Path:
        """The model file in a fsynced part file with the reference's size and sha256; resumes after failures."""
        part = self._part_path(ref)
        last = ""
        for attempt in range(self.attempts):
            try:
                self._fetch_into(ref, part)
                break
            except urllib.error.HTTPError as exc:
                part.unlink(missing_ok=True)
                if exc.code == 416:  # the server's file is not the one the part was cut from
                    total = _total_from_range(exc.headers.get("Content-Range", "") if exc.headers else "")
                    if total is not None and total != ref.size:
                        self.progress.pop(ref.name, None)
                        raise _wrong_size(ref, total) from None
                    last = "HTTP 416: range not satisfiable"
                    continue
                raise ModelError(f"model {ref.name} {ref.version}: download failed: {ref.url}: "
                                 f"HTTP {exc.code} {exc.reason}") from None
            except ValueError as exc:  # urllib's refusal of the URL itself: no use trying again
                self.progress.pop(ref.name, None)
                raise ModelError(f"model {ref.name} {ref.version}: URL check failed: {ref.url}: {exc}") from None
            except ModelError:
                part.unlink(missing_ok=True)
                self.progress.pop(ref.name, None)
                raise
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                last = _why(exc)
                have = part.stat().st_size if part.exists() else 0
                log.warning("download of %s %s interrupted at %d of %d bytes (%s); resuming",
                            ref.name, ref.version, have, ref.size, last)
                time.sleep(min(2.0, 0.25 * 2 ** attempt))
        else:
            self.progress.pop(ref.name, None)
            raise ModelError(f"model {ref.name} {ref.version}: download failed after {self.attempts} attempts: {last}")
        self.progress.pop(ref.name, None)
        self._check_part(ref, part)
        return part

    def _fetch_into(self, ref: m.ModelRef, part: Path) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > ref.size:
            part.unlink()
            have = 0
        if have == ref.size:
            return
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{ref.sha256}"'} if have else {}
        started = time.monotonic()
        with self._open(ref.url, headers) as response:
            if response.status != 206:  # the whole file: start over
                have = 0
            total = _offered_size(response)
            if total is not None and total != ref.size:  # no use downloading (or resuming) what cannot match
                raise _wrong_size(ref, total)
            got = self._copy(ref, response, part, have)
        seconds = time.monotonic() - started
        log.info("downloaded %s %s: %d bytes in %.2f s%s", ref.name, ref.version, got, seconds,
                 f" (resumed at byte {have})" if have else "")
        if got >= MIN_SAMPLE_BYTES and self.on_download is not None:
            self.on_download(got, seconds)

    def _copy(self, ref: m.ModelRef, response: Any, part: Path, have: int) -> int:
        """Append the body to the part file (or rewrite it from *have* = 0); bytes received."""
        got, next_log = 0, time.monotonic() + PROGRESS_EVERY_S
        with open(part, "r+b" if have and part.exists() else "wb") as fh:
            fh.seek(have)
            fh.truncate()
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                if have + got + len(chunk) > ref.size:
                    raise ModelError(f"model {ref.name} {ref.version}: size check failed: the server sent more "
                                     f"than the {ref.size} bytes placement named")
                fh.write(chunk)
                got += len(chunk)
                self.progress[ref.name] = (have + got, ref.size)
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + PROGRESS_EVERY_S
                    log.info("downloading %s %s: %d of %d bytes (%.0f%%)", ref.name, ref.version, have + got,
                             ref.size, 100.0 * (have + got) / max(ref.size, 1))
            fh.flush()
            os.fsync(fh.fileno())
        if have + got < ref.size:
            raise OSError(f"connection closed at byte {have + got} of {ref.size}")
        return got

    @staticmethod
    def _check_part(ref: m.ModelRef, part: Path) -> None:
        size = part.stat().st_size
        digest = hashlib.sha256()
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        problem = ""
        if size != ref.size:
            problem = f"size check failed: downloaded {size} bytes, placement named {ref.size}"
        elif digest.hexdigest() != ref.sha256:
            problem = f"sha256 check failed: downloaded file has sha256 {digest.hexdigest()}, placement named {ref.sha256}"
        if problem:
            part.unlink(missing_ok=True)  # a bad prefix must not be resumed from
            raise ModelError(f"model {ref.name} {ref.version}: {problem}")


def _check_url(ref: m.ModelRef, url: str) -> None:
    """Models come over HTTP(S) only: a relative URL (a coordinator without a public base URL) or another
    scheme (file:, ftp:) is refused before anything is opened."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ModelError(f"model {ref.name} {ref.version}: URL check failed: {url!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ModelError(f"model {ref.name} {ref.version}: URL check failed: {url!r} is not an http:// or "
                         "https:// URL with a host")


def _wrong_size(ref: m.ModelRef, total: int) -> ModelError:
    return ModelError(f"model {ref.name} {ref.version}: size check failed: the server's file is {total} bytes, "
                      f"placement named {ref.size}")


def _total_from_range(content_range: str) -> int | None:
    """The whole file's size in a ``Content-Range`` header (``bytes 0-9/1234``, ``bytes */1234``)."""
    total = content_range.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _offered_size(response: Any) -> int | None:
    """The size of the whole file as the server states it, when it does: the total of a 206's
    ``Content-Range``, or the ``Content-Length`` of a plain 200."""
    headers = response.headers
    if response.status == 206:
        return _total_from_range(headers.get("Content-Range", ""))
    if headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        return None  # the length is of the encoded body
    length = (headers.get("Content-Length") or "").strip()
    return int(length) if length.isdigit() else None


def _version(text: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return text


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or getattr(exc, "strerror", None) or exc or type(exc).__name__)
