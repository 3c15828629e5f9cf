"""Build the small .tflite models the runtime tests use, into tests/data/.

Run with a Python that has TensorFlow (never a runtime dependency):

    /opt/tfbuild/bin/python models/build/test_models.py

Weights come from a fixed seed, so the models are reproducible in content
(the converter may not be byte-for-byte stable across TensorFlow versions;
tests/data/SHA256SUMS records the committed files). Dense weights are also
saved as .npz so tests can compute a hand-written numpy reference.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "data"
SEED = 20240611

# The "dense" models: a non-square colour image, flattened, one dense layer.
# Any mistake in colour order, layout, resize or normalisation changes the output.
DENSE_HW = (12, 16)
DENSE_CLASSES = 5


def _convert(model: tf.keras.Model, quant: str | None = None, rep=None, io_dtype=tf.uint8) -> bytes:
    """Convert a Keras model; quant="int8" gives full-integer with io_dtype in/out."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = rep
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    return converter.convert()


def _rep(rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float, n: int = 64):
    def gen():
        for _ in range(n):
            yield [rng.uniform(low, high, size=(1, *shape)).astype(np.float32)]

    return gen


def _dense_model(input_shape: tuple[int, ...], w: np.ndarray, b: np.ndarray) -> tf.keras.Model:
    inp = tf.keras.Input(shape=input_shape, batch_size=1, name="image")
    out = tf.keras.layers.Dense(w.shape[1], name="logits")(tf.keras.layers.Flatten()(inp))
    model = tf.keras.Model(inp, out)
    model.layers[-1].set_weights([w, b])
    return model


def build_dense(rng: np.random.Generator) -> dict[str, bytes]:
    """Float NHWC, float NCHW, uint8-io int8 ([0,1] input) and int8-io int8 ([-1,1] input)."""
    h, w = DENSE_HW
    weights = rng.normal(0, 0.05, size=(h * w * 3, DENSE_CLASSES)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=(DENSE_CLASSES,)).astype(np.float32)
    # The NCHW model sees the same pixels in channel-major order, so the same
    # logits need the weight rows permuted from (h, w, c) to (c, h, w).
    nchw_rows = np.arange(h * w * 3).reshape(h, w, 3).transpose(2, 0, 1).reshape(-1)
    np.savez(OUT / "dense_weights.npz", w=weights, b=bias, hw=np.array(DENSE_HW))
    nhwc = _dense_model((h, w, 3), weights, bias)
    nchw = _dense_model((3, h, w), weights[nchw_rows], bias)
    return {
        "dense_float.tflite": _convert(nhwc),
        "dense_float_nchw.tflite": _convert(nchw),
        "dense_uint8.tflite": _convert(nhwc, "int8", _rep(rng, (h, w, 3), 0.0, 1.0), tf.uint8),
        "dense_int8_sym.tflite": _convert(nhwc, "int8", _rep(rng, (h, w, 3), -1.0, 1.0), tf.int8),
    }


def build_detector() -> bytes:
    """A float 128x128x3 'detector' expecting [-1,1]: boxes (1,4,4) and scores (1,4)."""
    inp = tf.keras.Input(shape=(128, 128, 3), batch_size=1, name="image")
    x = tf.keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    boxes = tf.keras.layers.Reshape((4, 4), name="boxes")(tf.keras.layers.Dense(16, activation="sigmoid")(x))
    scores = tf.keras.layers.Dense(4, activation="sigmoid", name="scores")(x)
    return _convert(tf.keras.Model(inp, [boxes, scores]))


def build_classifier224(rng: np.random.Generator) -> bytes:
    """A uint8 224x224x3 classifier (strided conv + pooling + dense, softmax), full int8."""
    inp = tf.keras.Input(shape=(224, 224, 3), batch_size=1, name="image")
    x = tf.keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inp)
    x = tf.keras.layers.MaxPooling2D(2)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return _convert(tf.keras.Model(inp, out), "int8", _rep(rng, (224, 224, 3), 0.0, 1.0, n=16), tf.uint8)


def build_windows(rng: np.random.Generator) -> dict[str, bytes]:
    """Sensor models: an FFT-feature autoencoder (float) and a raw-window scorer (int8)."""
    bins, channels = 65, 3  # rfft of a 128-sample window
    inp = tf.keras.Input(shape=(bins, channels), batch_size=1, name="spectrum")
    x = tf.keras.layers.Dense(8, activation="relu")(tf.keras.layers.Flatten()(inp))
    out = tf.keras.layers.Reshape((bins, channels), name="reconstruction")(tf.keras.layers.Dense(bins * channels)(x))
    autoencoder = tf.keras.Model(inp, out)

    inp = tf.keras.Input(shape=(128, channels), batch_size=1, name="window")
    x = tf.keras.layers.Conv1D(4, 8, strides=4, activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    score = tf.keras.layers.Dense(1, activation="sigmoid", name="score")(x)
    scorer = tf.keras.Model(inp, score)
    return {
        "window_fft_ae.tflite": _convert(autoencoder),
        "window_score_int8.tflite": _convert(scorer, "int8", _rep(rng, (128, channels), -3.0, 3.0), tf.uint8),
    }


def main() -> int:
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    models = build_dense(rng)
    models["detector128_float.tflite"] = build_detector()
    models["classifier224_uint8.tflite"] = build_classifier224(rng)
    models.update(build_windows(rng))
    sums = []
    for name, data in sorted(models.items()):
        (OUT / name).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
        print(f"{name}: {len(data)} bytes")
    weights = (OUT / "dense_weights.npz").read_bytes()
    sums.append(f"{hashlib.sha256(weights).hexdigest()}  dense_weights.npz")
    (OUT / "SHA256SUMS").write_text("\n".join(sorted(sums, key=lambda s: s.split()[1])) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
