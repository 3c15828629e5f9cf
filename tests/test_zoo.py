"""The shipped zoo: real models measured now, artifacts as committed, synthetic inputs as documented."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lepton.errors import ModelError
from lepton.models.evaluate import evaluate, evaluate_runner, load_heldout
from lepton.models.metadata import read_metadata
from lepton.models.registry import Registry, zoo_dir
from lepton.models.runner import ModelRunner
from lepton.models.synth import digit_frame, digits_heldout, vibration_set, vibration_window

ZOO_BUDGET_BYTES = 15 * 1000 * 1000


@pytest.fixture(scope="module")
def zoo() -> Registry:
    return Registry(zoo_dir())


@pytest.mark.parametrize("name", ["digits", "digits-int8"])
def test_digits_accuracy_measured_now(zoo, name):
    entry = zoo.get(name)
    measured = evaluate(entry, zoo)
    assert measured["samples"] == 360
    assert measured["accuracy"] >= 0.97
    assert measured["accuracy"] == pytest.approx(entry.manifest.metrics["accuracy"], abs=1e-6)


def test_digits_int8_is_full_integer_with_uint8_io(zoo):
    meta = read_metadata(zoo.get("digits-int8").path)
    assert [t.dtype for t in meta.inputs + meta.outputs] == ["uint8", "uint8"]
    assert meta.inputs[0].scale > 0 and meta.outputs[0].scale > 0


def test_digits_spec_maps_a_camera_frame_to_what_the_model_trained_on(zoo):
    runner = ModelRunner.from_entry(zoo.get("digits"))
    images, _ = digits_heldout()
    for image in images[:20]:
        tensor = runner.preprocess(digit_frame(image, 48, 40))
        # Trained on X / 16; the frame went through 0..255 and back, so within one 8-bit step.
        np.testing.assert_allclose(tensor[0, :, :, 0], image / 16.0, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("name", ["vibration", "vibration-int8"])
def test_vibration_flags_faults_on_the_heldout_split(zoo, name):
    entry = zoo.get(name)
    measured = evaluate(entry, zoo)
    stated = entry.manifest.metrics
    assert measured["precision"] >= stated["precision"] - 1e-6
    assert measured["recall"] >= stated["recall"] - 1e-6
    assert stated["precision"] >= 0.9 and stated["recall"] >= 0.9


def test_vibration_int8_generalises_to_fresh_windows(zoo, tmp_path):
    """Windows from a seed neither training nor the held-out split used, as the agent's sensor makes them."""
    entry = zoo.get("vibration-int8")
    x, y = vibration_set(np.random.default_rng(777), 200)
    np.savez(tmp_path / "fresh.npz", x=x, y=y, kind=np.array("windows"))
    measured = evaluate_runner(ModelRunner.from_entry(entry), tmp_path / "fresh.npz", "anomaly")
    margin = 0.08
    assert measured["precision"] >= entry.manifest.metrics["precision"] - margin
    assert measured["recall"] >= entry.manifest.metrics["recall"] - margin


def test_mobilenets_say_they_are_untrained_and_cost_more_at_224(zoo):
    small, large = zoo.get("mobilenet96").manifest, zoo.get("mobilenet224").manifest
    for manifest, size in ((small, 96), (large, 224)):
        assert manifest.trained is False and "UNTRAINED" in manifest.notes
        assert manifest.inputs[0].shape == [1, size, size, 3] and manifest.inputs[0].dtype == "uint8"
        assert manifest.size < 3_000_000
    assert large.memory_mb > small.memory_mb
    with pytest.raises(ModelError, match="untrained"):
        evaluate(zoo.get("mobilenet96"), zoo)


def test_manifest_tensors_are_read_from_the_file(zoo):
    for entry in zoo.list():
        meta = read_metadata(entry.path)
        assert [t.info() for t in entry.manifest.inputs] == list(meta.inputs)
        assert [t.info() for t in entry.manifest.outputs] == list(meta.outputs)
        assert entry.manifest.memory_mb > entry.manifest.size / (1 << 20)


def test_sha256sums_match_and_zoo_fits_the_budget():
    root = zoo_dir()
    lines = (root / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, lines):
        digest, name = line.split("  ", 1)
        listed[name] = digest
    for name, digest in listed.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    models = {p.relative_to(root).as_posix() for p in root.glob("*/model.tflite")}
    assert models <= set(listed) and len(models) >= 6
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < ZOO_BUDGET_BYTES


def test_heldout_files_are_well_formed():
    x, y, kind = load_heldout(zoo_dir() / "digits" / "heldout.npz")
    assert kind == "digits8x8" and x.shape[1:] == (8, 8) and x.max() <= 16
    assert set(np.unique(y)) == set(range(10))
    x, y, kind = load_heldout(zoo_dir() / "vibration" / "heldout.npz")
    assert kind == "windows" and x.shape[1:] == (256, 3) and 0.3 < y.mean() < 0.7


def test_vibration_window_is_seeded_and_faults_ring_high():
    a = vibration_window(np.random.default_rng(5), True)
    b = vibration_window(np.random.default_rng(5), True)
    assert a.shape == (256, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert abs(float(a[:, 2].mean()) - 1.0) < 0.1  # gravity on the vertical axis
    x, y = vibration_set(np.random.default_rng(6), 200)
    spectrum = np.abs(np.fft.rfft(x - x.mean(axis=1, keepdims=True), axis=1))
    high = spectrum[:, 64:, :2].sum(axis=(1, 2))  # above 250 Hz, radial axes: where the resonance rings
    assert np.median(high[y == 1]) > 2 * np.median(high[y == 0])
    other = vibration_window(np.random.default_rng(1), False, length=128, fs=200.0, channels=1)
    assert other.shape == (128, 1) and np.isfinite(other).all()
    with pytest.raises(ValueError):
        vibration_window(np.random.default_rng(1), False, length=1)


def test_digit_frame_is_a_bgr_camera_frame():
    images, labels = digits_heldout()
    frame = digit_frame(images[0], 64, 64)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame[:, :, 0].tolist() == frame[:, :, 2].tolist()
    assert frame.max() == round(images[0].max() * 255 / 16)
