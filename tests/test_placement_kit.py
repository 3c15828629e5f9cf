"""Helpers for the placement tests: signed model versions (good and bad), a model store, a placement publisher.

``Store`` is the coordinator's own HTTP model server (``coordinator.http``)
over a catalog the test fills, so it can serve files the coordinator would
never offer (a tampered copy, a version signed by a stranger).
``Placer`` is a real paho client that publishes retained ``placement/desired``
generations to agents and records what they report, as the coordinator does.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lepton.coordinator.catalog import Catalog, CatalogModel
from lepton.coordinator.http import ModelServer, model_url
from lepton.models.manifest import load_manifest, write_manifest
from lepton.models.registry import Entry, Registry, zoo_dir
from lepton.models.signing import generate_keypair, load_private_key, sign_manifest
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

DIGITS_SPEC = {
    "family": "digits",
    "labels": [str(i) for i in range(10)],
    "preprocess": {"kind": "image", "image": {"color": "gray", "interpolation": "area"}},
    "postprocess": {"kind": "classification"},
}
INT8_FILE = zoo_dir() / "digits-int8" / "model.tflite"


def make_keys(directory: Path, name: str = "fleet") -> tuple[Path, Path]:
    """(private, public) key files."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    generate_keypair(private, public)
    return private, public


def build_version(root: Path, name: str, version: str, private: Path, public: Path,
                  tflite: Path = INT8_FILE) -> Entry:
    """A signed model version in its own registry directory under *root*."""
    registry = Registry(root / f"{name}-{version}", trusted_keys=[public])
    return registry.add(tflite, name, version, DIGITS_SPEC, private)


def unloadable_version(root: Path, name: str, version: str, private: Path, size: int = 4096) -> Entry:
    """A correctly signed version whose file is not a model (it verifies, it cannot load)."""
    base = load_manifest(zoo_dir() / "digits-int8" / "manifest.json")
    data = os.urandom(size)
    import hashlib

    manifest = base.model_copy(update={"name": name, "version": version, "size": size,
                                       "sha256": hashlib.sha256(data).hexdigest(), "metrics": {}})
    signed = sign_manifest(manifest, load_private_key(private))
    directory = root / f"{name}-{version}" / name / version
    directory.mkdir(parents=True)
    (directory / signed.file).write_bytes(data)
    write_manifest(signed, directory / "manifest.json")
    return Entry(signed, directory / signed.file, directory / "manifest.json")


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


class Store:
    """The coordinator's model HTTP server over hand-picked files."""

    def __init__(self) -> None:
        self.catalog = Catalog(zoo_dir())
        self.server = ModelServer(self.catalog, "127.0.0.1", 0).start()

    @property
    def url(self) -> str:
        return self.server.url

    def serve(self, entry: Entry, sha256: str | None = None) -> m.ModelRef:
        """Offer *entry*; its reference (with *sha256* instead of the manifest's, to lie)."""
        man = entry.manifest
        self.catalog.add(CatalogModel(name=man.name, version=man.version, sha256=man.sha256, size=man.size,
                                      path=Path(entry.path), manifest_path=Path(entry.manifest_path)))
        return m.ModelRef(name=man.name, version=man.version, sha256=sha256 or man.sha256, size=man.size,
                          url=model_url(self.url, man.name, man.version),
                          manifest_url=model_url(self.url, man.name, man.version, "manifest.json"))

    def close(self) -> None:
        self.server.stop()


class Placer:
    """Publishes desired placements (retained) and records reported ones, as the coordinator does."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.reported: dict[str, list[m.Reported]] = {}
        self.generations: dict[str, int] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"placer-{os.getpid()}-{id(self)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{topics.prefix}/devices/+/placement/reported", 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        report = decode("reported", msg.payload)
        with self.lock:
            self.reported.setdefault(report.device, []).append(report)

    def place(self, device: str, models: list[m.ModelRef], routes: dict | None = None,
              serve: dict | None = None) -> int:
        """Publish the next generation for *device*; its number."""
        gen = self.generations.get(device, 0) + 1
        self.generations[device] = gen
        routes = {sid: [m.Route(device=d, share=s) for d, s in rs] for sid, rs in (routes or {}).items()}
        msg = m.Desired(device=device, generation=gen, ts=time.time(), models=models, routes=routes,
                        serve=serve or {})
        self.client.publish(self.topics.desired(device), encode(msg), qos=1, retain=True).wait_for_publish(5)
        return gen

    def report(self, device: str, generation: int) -> m.Reported | None:
        """The first report of *device* for *generation*."""
        with self.lock:
            return next((r for r in self.reported.get(device, []) if r.generation == generation), None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_kit_builds_distinct_verifiable_versions(tmp_path):
    """The versions the placement tests swap between really differ, and the bad ones are bad the right way."""
    private, public = make_keys(tmp_path / "keys")
    good = build_version(tmp_path / "store", "digits", "2.0.0", private, public)
    Registry(good.manifest_path.parents[2], trusted_keys=[public]).verify(good)
    zoo = Registry(zoo_dir()).get("digits")
    assert good.manifest.sha256 != zoo.manifest.sha256
    junk = unloadable_version(tmp_path / "store", "digits", "2.3.0", private)
    Registry(junk.manifest_path.parents[2], trusted_keys=[public]).verify(junk)
