"""``vibration`` and ``vibration-int8``: bearing-fault detection from accelerometer windows.

Windows come from models/synth.py (normal: shaft harmonics + noise; fault:
bearing impulses ringing a resonance + a raised noise floor, of random
severity). Features are what the manifest's preprocessing spec produces:
each channel standardised with the training set's mean and std, then
|rfft| / length. A small dense network maps them to a fault probability; the
postprocessing flags a window when it exceeds 0.5. A held-out set from
another seed is saved as heldout.npz (float16 windows, fault labels); the
packaging step measures precision and recall on it with the shipped files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcommon import SEED, convert, load_synth, representative, write_info, write_model

LENGTH, CHANNELS, FS = 256, 3, 1000.0
TRAIN_WINDOWS, HELDOUT_WINDOWS = 4000, 300
EPOCHS = 40


def features(windows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """The manifest spec's window features, as lepton.models.preprocess computes them."""
    x = (windows.astype(np.float32) - mean) / std
    return (np.abs(np.fft.rfft(x, axis=1)) / LENGTH).astype(np.float32)


def _model(batch_size: int | None = 1) -> tf.keras.Model:
    inp = tf.keras.Input(shape=(LENGTH // 2 + 1, CHANNELS), batch_size=batch_size, name="spectrum")
    x = tf.keras.layers.Flatten()(inp)
    x = tf.keras.layers.Dense(32, activation="relu")(x)
    x = tf.keras.layers.Dense(16, activation="relu")(x)
    out = tf.keras.layers.Dense(1, activation="sigmoid", name="fault")(x)
    return tf.keras.Model(inp, out, name="vibration_mlp")


def _describe(mean: np.ndarray, std: np.ndarray, keras_acc: float, train_samples: int) -> dict:
    """What both variants share in their manifests."""
    return {
        "family": "vibration",
        "task": "anomaly",
        "trained": True,
        "preprocess": {"kind": "window", "window": {
            "length": LENGTH, "channels": CHANNELS, "fft": True,
            "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}},
        "postprocess": {"kind": "anomaly", "score": "output", "threshold": 0.5},
        "heldout": "heldout.npz",
        "train_metrics": {"keras_accuracy": keras_acc, "train_samples": train_samples},
    }


def build(out: Path) -> None:
    """Generate windows, train, convert both variants, save the held-out split; write vibration.json."""
    synth = load_synth()
    x_train, y_train = synth.vibration_set(np.random.default_rng(SEED), TRAIN_WINDOWS, 0.5, LENGTH, FS, CHANNELS)
    x_test, y_test = synth.vibration_set(np.random.default_rng(SEED + 1), HELDOUT_WINDOWS, 0.5, LENGTH, FS, CHANNELS)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "heldout.npz", x=x_test.astype(np.float16), y=y_test, kind=np.array("windows"))
    mean = x_train.mean(axis=(0, 1)).astype(np.float32)
    std = x_train.std(axis=(0, 1)).astype(np.float32)
    f_train = features(x_train, mean, std)
    trainer = _model(batch_size=None)
    trainer.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    trainer.fit(f_train, y_train, epochs=EPOCHS, batch_size=64, shuffle=True, verbose=0)
    model = _model()
    model.set_weights(trainer.get_weights())
    predicted = trainer.predict(features(x_test.astype(np.float16).astype(np.float32), mean, std), verbose=0)[:, 0]
    keras_acc = float(np.mean((predicted > 0.5) == (y_test == 1)))
    print(f"vibration: keras held-out accuracy {keras_acc:.4f} on {len(y_test)}", flush=True)
    common = _describe(mean, std, keras_acc, len(y_train))
    note = ("Bearing-fault detector for a 3-axis accelerometer sampled at {fs:g} Hz, {n}-sample windows in g. "
            "Trained on {t} synthetic windows (lepton.models.synth, seed {seed}): shaft harmonics + noise vs. "
            "outer-race impulses ringing a resonance, random severity. Score = fault probability. {q}")
    fmt = {"fs": FS, "n": LENGTH, "t": len(y_train), "seed": SEED}
    # The spec rounds mean/std to 6 digits: calibrate on exactly those features.
    spec_mean = np.asarray(common["preprocess"]["window"]["mean"], np.float32)
    spec_std = np.asarray(common["preprocess"]["window"]["std"], np.float32)
    calib = features(x_train[:400], spec_mean, spec_std)
    models = [
        write_model(out, "vibration", convert(model), common | {
            "variant": "float32", "notes": note.format(**fmt, q="Float32.")}),
        write_model(out, "vibration-int8", convert(model, representative(calib, 400), tf.uint8), common | {
            "variant": "int8", "notes": note.format(**fmt, q="Full-integer int8 (uint8 input and output).")}),
    ]
    write_info(out, "vibration", models)
