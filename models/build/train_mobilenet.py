"""``mobilenet96`` and ``mobilenet224``: MobileNetV2-shaped int8 classifiers, UNTRAINED.

Keras' MobileNetV2 (width multiplier 0.35, 1000 logits: a softmax of 1000
near-equal random scores would quantise to all zeros) with random
weights from a fixed seed, fully quantised to int8 with uint8 input and
output. No dataset bundled with the build tools fits ImageNet-style
training, so these models classify nothing: they exist so that compute and
memory cost differ realistically between models (96x96 vs 224x224) and
devices. Their manifests say ``trained: false``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tfcommon import SEED, convert, representative, write_info, write_model

ALPHA = 0.35
CLASSES = 1000
CALIBRATION = 16


def _mobilenet(size: int, batch_size: int | None = 1) -> tf.keras.Model:
    inp = tf.keras.Input(shape=(size, size, 3), batch_size=batch_size, name="image")
    return tf.keras.applications.MobileNetV2(
        input_tensor=inp, alpha=ALPHA, weights=None, classes=CLASSES, classifier_activation=None
    )


def _calibrate_batchnorm(model: tf.keras.Model, images: np.ndarray) -> None:
    """Set each BatchNormalization's moving statistics from random images, in graph order.

    Random weights with identity statistics shrink the signal layer by layer
    until the logits are ~1e-6 and ignore the input; normalising every layer
    keeps activations at unit scale, as in a trained network, so outputs
    (and int8 ranges) depend on the image.
    """
    for layer in model.layers:
        if not isinstance(layer, tf.keras.layers.BatchNormalization):
            continue
        probe = tf.keras.Model(model.inputs, layer.input)
        acts = probe(images, training=False).numpy()
        gamma, beta, _, _ = layer.get_weights()
        axes = tuple(range(acts.ndim - 1))
        layer.set_weights([gamma, beta, acts.mean(axis=axes), acts.var(axis=axes) + 1e-3])


def build(out: Path) -> None:
    """Build both sizes; write mobilenet.json."""
    rng = np.random.default_rng(SEED)
    models = []
    for size in (96, 224):
        name = f"mobilenet{size}"
        calib = rng.uniform(-1.0, 1.0, size=(CALIBRATION, size, size, 3)).astype(np.float32)
        batched = _mobilenet(size, batch_size=None)  # calibrated on a whole batch at once, then copied
        _calibrate_batchnorm(batched, calib)
        model = _mobilenet(size)
        model.set_weights(batched.get_weights())
        info = {
            "family": "mobilenet",
            "variant": f"int8-{size}",
            "task": "classification",
            "trained": False,
            "preprocess": {"kind": "image", "image": {"resize": "stretch", "color": "rgb", "normalize": "symmetric"}},
            "postprocess": {"kind": "classification", "top_k": 5, "logits": True},
            "notes": (f"UNTRAINED: MobileNetV2 architecture (alpha {ALPHA}, {size}x{size}x3 input in [-1, 1], "
                      f"{CLASSES} logits) with random weights (seed {SEED}; batch-norm statistics set from random images), full-integer int8 with uint8 input "
                      "and output, calibrated on random images. Its outputs mean nothing; it is here to measure "
                      "compute and memory cost."),
            "train_metrics": {},
        }
        models.append(write_model(out, name, convert(model, representative(calib, CALIBRATION), tf.uint8), info))
    write_info(out, "mobilenet", models)
