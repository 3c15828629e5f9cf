"""Registry trust: signatures, sizes, hashes, versions, keys, atomic installs (real zoo files, real crypto)."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest

from lepton.errors import ConfigError, ModelError
from lepton.models.manifest import build_manifest, load_manifest, parse_manifest, write_manifest
from lepton.models.registry import Registry, zoo_dir, zoo_public_key
from lepton.models.signing import generate_keypair, load_private_key, sign_manifest, verify_manifest

DIGITS_SPEC = {
    "family": "digits",
    "labels": [str(i) for i in range(10)],
    "preprocess": {"kind": "image", "image": {"color": "gray", "interpolation": "area"}},
    "postprocess": {"kind": "classification"},
}


@pytest.fixture
def zoo_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped zoo to break things in."""
    return Path(shutil.copytree(zoo_dir(), tmp_path / "zoo"))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "fleet.key", tmp_path / "keys" / "fleet.pub"
    private.parent.mkdir()
    generate_keypair(private, public)
    return private, public


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _reason(registry: Registry, name: str) -> str | None:
    return {e.name: why for e, why in registry.verify_all()}[name]


def test_shipped_zoo_verifies_with_the_zoo_key():
    results = Registry(zoo_dir()).verify_all()
    names = {e.name for e, _ in results}
    assert {"digits", "digits-int8", "vibration", "vibration-int8", "mobilenet96", "mobilenet224"} <= names
    assert [(e.label(), why) for e, why in results if why] == []


def test_one_flipped_model_byte_is_refused_naming_the_hash_check(zoo_copy):
    model = zoo_copy / "digits-int8" / "model.tflite"
    _flip(model, model.stat().st_size // 2)
    registry = Registry(zoo_copy, [zoo_copy / "zoo.pub"])
    reason = _reason(registry, "digits-int8")
    assert "digits-int8 1.0.0: sha256 check failed" in reason and str(model) in reason
    assert _reason(registry, "digits") is None  # the others are untouched
    assert "digits-int8" not in {e.name for e in registry.list(verified=True)}


def test_truncated_model_is_refused_naming_the_size_check(zoo_copy):
    model = zoo_copy / "vibration" / "model.tflite"
    model.write_bytes(model.read_bytes()[:-100])
    assert "size check failed" in _reason(Registry(zoo_copy, [zoo_copy / "zoo.pub"]), "vibration")


def test_flipped_signature_bit_is_refused(zoo_copy):
    path = zoo_copy / "digits" / "manifest.json"
    data = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(data["signature"]))
    raw[10] ^= 0x01
    data["signature"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(data))
    reason = _reason(Registry(zoo_copy, [zoo_copy / "zoo.pub"]), "digits")
    assert "signature check failed" in reason and "does not match" in reason


def test_edited_manifest_field_breaks_the_signature(zoo_copy):
    path = zoo_copy / "vibration-int8" / "manifest.json"
    data = json.loads(path.read_text())
    data["postprocess"]["threshold"] = 0.99  # quietly make the detector blind
    path.write_text(json.dumps(data))
    assert "signature check failed" in _reason(Registry(zoo_copy, [zoo_copy / "zoo.pub"]), "vibration-int8")


def test_wrong_key_is_refused_naming_the_signer(zoo_copy, keys):
    registry = Registry(zoo_copy, [keys[1]])
    reason = _reason(registry, "digits")
    signer = load_manifest(zoo_copy / "digits" / "manifest.json").key_id
    assert f"signed by key {signer}, which is not trusted" in reason


def test_unsigned_and_keyless_checks(zoo_copy):
    manifest = load_manifest(zoo_copy / "digits" / "manifest.json")
    with pytest.raises(ModelError, match="not signed"):
        verify_manifest(manifest.model_copy(update={"signature": ""}), [zoo_public_key()])
    with pytest.raises(ModelError, match="no trusted public key"):
        verify_manifest(manifest, [])
    with pytest.raises(ModelError, match="not valid base64"):
        verify_manifest(manifest.model_copy(update={"signature": "@@@"}), [zoo_public_key()])


def test_manifest_round_trips_and_refuses_bad_fields(zoo_copy, tmp_path):
    path = zoo_copy / "digits" / "manifest.json"
    manifest = load_manifest(path)
    write_manifest(manifest, tmp_path / "m.json")
    verify_manifest(load_manifest(tmp_path / "m.json"), [zoo_public_key()])  # the file form keeps the signature valid
    data = json.loads(path.read_text())
    for field, value, expected in (("file", "../../etc/passwd", "plain file name"), ("version", "one", "PEP 440"),
                                   ("sha256", "abc", "sha256"), ("surprise", 1, "surprise")):
        with pytest.raises(ModelError, match=expected):
            parse_manifest({**data, field: value})
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_manifest(b"{nope")


def test_add_signs_installs_and_refuses_older_versions(tmp_path, keys):
    private, public = keys
    source = zoo_dir() / "digits-int8" / "model.tflite"
    registry = Registry(tmp_path / "reg", [public])
    entry = registry.add(source, "digits-fleet", "1.9.0", DIGITS_SPEC, private)
    assert entry.path == tmp_path / "reg" / "digits-fleet" / "1.9.0" / "model.tflite"
    assert entry.manifest.inputs[0].dtype == "uint8" and entry.manifest.task == "classification"
    registry.verify(entry)
    newer = registry.add(source, "digits-fleet", "1.10.0", DIGITS_SPEC, private)  # PEP 440: 1.10 > 1.9
    assert registry.get("digits-fleet").version == "1.10.0" == newer.version
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*"))
    with pytest.raises(ModelError, match=r"version check failed: older than version 1\.10\.0"):
        registry.add(source, "digits-fleet", "1.2.0", DIGITS_SPEC, private)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "reg").rglob("*")) == before  # nothing written
    # The same version again: identical content is a no-op, different content is refused.
    assert registry.add(source, "digits-fleet", "1.10.0", DIGITS_SPEC, private).manifest_path == newer.manifest_path
    with pytest.raises(ModelError, match="already installed with different content"):
        registry.add(source, "digits-fleet", "1.10.0", {**DIGITS_SPEC, "notes": "changed"}, private)


def test_install_refuses_a_bad_file_and_keeps_the_old_version(tmp_path, keys):
    private, public = keys
    registry = Registry(tmp_path / "reg", [public])
    old = registry.add(zoo_dir() / "digits-int8" / "model.tflite", "m", "1.0.0", DIGITS_SPEC, private)
    manifest = sign_manifest(
        build_manifest(zoo_dir() / "digits" / "model.tflite", "m", "2.0.0", DIGITS_SPEC), load_private_key(private)
    )
    corrupt = tmp_path / "download.tflite"
    corrupt.write_bytes((zoo_dir() / "digits" / "model.tflite").read_bytes())
    _flip(corrupt, 1000)
    with pytest.raises(ModelError, match="sha256 check failed"):
        registry.install(manifest, corrupt)
    assert [e.version for e in registry.list(verified=True)] == ["1.0.0"]
    registry.verify(old)
    shutil.copyfile(zoo_dir() / "digits" / "model.tflite", corrupt)
    assert registry.install(manifest, corrupt).version == "2.0.0"
    assert [e.version for e in registry.list(verified=True)] == ["1.0.0", "2.0.0"]
    # Tampered on disk afterwards: the newest trusted version is the one before it.
    _flip(tmp_path / "reg" / "m" / "2.0.0" / "model.tflite", 500)
    assert registry.get("m").version == "2.0.0"
    assert registry.get("m", verified=True).version == "1.0.0"


def test_install_ignores_and_cleans_half_finished_staging(tmp_path, keys):
    private, public = keys
    root = tmp_path / "reg"
    (root / ".staging-999999-deadbeef").mkdir(parents=True)  # left by a process that died mid-install
    (root / ".staging-999999-deadbeef" / "manifest.json").write_text("{}")
    registry = Registry(root, [public])
    assert registry.list() == []
    registry.add(zoo_dir() / "digits-int8" / "model.tflite", "m", "1.0.0", DIGITS_SPEC, private)
    assert not (root / ".staging-999999-deadbeef").exists()


def test_add_refuses_a_spec_that_cannot_feed_the_model(tmp_path, keys):
    private, public = keys
    registry = Registry(tmp_path / "reg", [public])
    source = zoo_dir() / "digits-int8" / "model.tflite"
    with pytest.raises(ModelError, match="'postprocess' is required"):
        registry.add(source, "m", "1.0.0", {"preprocess": {"kind": "image"}}, private)
    with pytest.raises(ModelError, match="channel"):  # rgb is 3 channels, the model takes 1
        registry.add(source, "m", "1.0.0", {**DIGITS_SPEC, "preprocess": {"kind": "image"}}, private)
    with pytest.raises(ModelError, match="unknown key"):
        registry.add(source, "m", "1.0.0", {**DIGITS_SPEC, "sha256": "0" * 64}, private)
    assert not (tmp_path / "reg").exists() or registry.list() == []


def test_get_names_what_is_missing():
    registry = Registry(zoo_dir())
    with pytest.raises(ModelError, match="no model named 'nope'.*digits"):
        registry.get("nope")
    with pytest.raises(ModelError, match="has no version '9.9'"):
        registry.get("digits", "9.9")


def test_keys_private_mode_and_no_overwrite(tmp_path, keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(private, public)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_private_key(public)
    with pytest.raises(ConfigError, match="cannot be read"):
        Registry(zoo_dir(), [tmp_path / "missing.pub"]).verify_all()
