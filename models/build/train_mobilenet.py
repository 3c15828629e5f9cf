"""``mobilenet96`` and ``mobilenet224``: MobileNetV2-shaped int8 classifiers, UNTRAINED.

Keras' MobileNetV2 (width multiplier 0.35, 1000 classes) with random
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


def _mobilenet(size: int) -> tf.keras.Model:
    inp = tf.keras.Input(shape=(size, size, 3), batch_size=1, name="image")
    return tf.keras.applications.MobileNetV2(
        input_tensor=inp, alpha=ALPHA, weights=None, classes=CLASSES, classifier_activation="softmax"
    )


def build(out: Path) -> None:
    """Build both sizes; write mobilenet.json."""
    rng = np.random.default_rng(SEED)
    models = []
    for size in (96, 224):
        name = f"mobilenet{size}"
        model = _mobilenet(size)
        calib = rng.uniform(-1.0, 1.0, size=(CALIBRATION, size, size, 3)).astype(np.float32)
        info = {
            "family": "mobilenet",
            "variant": f"int8-{size}",
            "task": "classification",
            "trained": False,
            "preprocess": {"kind": "image", "image": {"resize": "stretch", "color": "rgb", "normalize": "symmetric"}},
            "postprocess": {"kind": "classification", "top_k": 5},
            "notes": (f"UNTRAINED: MobileNetV2 architecture (alpha {ALPHA}, {size}x{size}x3 input in [-1, 1], "
                      f"{CLASSES} classes) with random weights (seed {SEED}), full-integer int8 with uint8 input "
                      "and output, calibrated on random images. Its outputs mean nothing; it is here to measure "
                      "compute and memory cost."),
            "train_metrics": {},
        }
        models.append(write_model(out, name, convert(model, representative(calib, CALIBRATION), tf.uint8), info))
    write_info(out, "mobilenet", models)
