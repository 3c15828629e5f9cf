"""``digits`` and ``digits-int8``: a small CNN on scikit-learn's bundled 8x8 digits.

The held-out fifth of the data (stratified, fixed seed) is saved as
``heldout.npz`` (x: N x 8 x 8 uint8 in 0..16, y: labels) and never trained
on; the packaging step measures accuracy on it with the shipped .tflite files.
The model sees X / 16 in [0, 1], which is what the manifest's preprocessing
spec produces from a camera frame: gray, area-resize to 8x8, unit
normalisation of 0..255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tfcommon import SEED, convert, representative, write_info, write_model

EPOCHS = 60


def _model(batch_size: int | None = 1) -> tf.keras.Model:
    inp = tf.keras.Input(shape=(8, 8, 1), batch_size=batch_size, name="image")
    x = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.MaxPooling2D(2)(x)
    x = tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.MaxPooling2D(2)(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dropout(0.3)(x)
    x = tf.keras.layers.Dense(64, activation="relu")(x)
    out = tf.keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return tf.keras.Model(inp, out, name="digits_cnn")


def _train(x: np.ndarray, y: np.ndarray) -> tf.keras.Model:
    # Trained with a free batch dimension; the weights then go into the batch-1 model that is converted.
    model = _model(batch_size=None)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=EPOCHS, batch_size=32, shuffle=True, verbose=0)
    return model


def build(out: Path) -> None:
    """Train, convert both variants, save the held-out split; write digits.json."""
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=SEED
    )
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "heldout.npz", x=x_test, y=y_test.astype(np.int64), kind=np.array("digits8x8"))
    features = (x_train.astype(np.float32) / 16.0)[..., None]
    trained = _train(features, y_train)
    model = _model()
    model.set_weights(trained.get_weights())
    test = (x_test.astype(np.float32) / 16.0)[..., None]
    keras_acc = float(np.mean(np.argmax(trained.predict(test, verbose=0), axis=1) == y_test))
    print(f"digits: keras held-out accuracy {keras_acc:.4f} on {len(y_test)}", flush=True)
    common = {
        "family": "digits",
        "task": "classification",
        "trained": True,
        "labels": [str(i) for i in range(10)],
        "preprocess": {"kind": "image", "image": {"resize": "stretch", "interpolation": "area", "color": "gray",
                                                  "normalize": "unit"}},
        "postprocess": {"kind": "classification", "top_k": 3},
        "heldout": "heldout.npz",
        "train_metrics": {"keras_accuracy": keras_acc, "train_samples": len(y_train)},
    }
    note = ("CNN trained on scikit-learn's 8x8 handwritten digits ({n} training images, seed {seed}); "
            "input is a grayscale 8x8 image scaled to [0, 1] (the 0..16 digit levels / 16). {q}")
    models = [
        write_model(out, "digits", convert(model), common | {
            "variant": "float32", "notes": note.format(n=len(y_train), seed=SEED, q="Float32 weights and activations.")}),
        write_model(out, "digits-int8", convert(model, representative(features, 300), tf.uint8), common | {
            "variant": "int8", "notes": note.format(n=len(y_train), seed=SEED, q=(
                "Full-integer int8 (uint8 input and output), calibrated on 300 training images."))}),
    ]
    write_info(out, "digits", models)
