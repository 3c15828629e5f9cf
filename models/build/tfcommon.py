"""What every zoo training script shares: seeds, conversion to TFLite, synth.py.

Runs under a Python with TensorFlow (never a runtime dependency), which need
not have lepton's own dependencies: nothing here imports ``lepton``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1]
SEED = 20240611


def seed_everything(seed: int = SEED) -> None:
    """Same seed, same weights: Python, NumPy and TF seeds, deterministic TF kernels.

    The session is cleared too: Keras numbers layers per process, and those
    names end up in the .tflite, so a family built after another would
    otherwise differ in bytes (not in weights) from one built alone.
    """
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def load_synth():
    """models/synth.py loaded by path (the TF environment may not have lepton installed)."""
    spec = importlib.util.spec_from_file_location("lepton_zoo_synth", MODELS_DIR / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def representative(samples: np.ndarray, count: int = 200) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Calibration data for full-integer quantisation: the first ``count`` samples, one per batch."""

    def gen():
        for sample in samples[:count]:
            yield [sample[None].astype(np.float32)]

    return gen


def convert(model: tf.keras.Model, rep=None, io_dtype=tf.uint8) -> bytes:
    """Keras -> .tflite bytes: float32, or full int8 (``io_dtype`` in/out) when ``rep`` is given."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if rep is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = rep
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_dtype
        converter.inference_output_type = io_dtype
    return converter.convert()


def write_model(out: Path, name: str, data: bytes, info: dict) -> dict:
    """Write ``<name>.tflite`` and return the info the packaging step turns into a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.tflite").write_bytes(data)
    info = {"name": name, "file": f"{name}.tflite", **info}
    print(f"{name}: {len(data)} bytes", flush=True)
    return info


def write_info(out: Path, family: str, models: list[dict], extra: dict | None = None) -> None:
    """``<family>.json``: what the training step hands to the packaging step."""
    record = {"family": family, "tensorflow": tf.__version__, "seed": SEED, "models": models, **(extra or {})}
    (out / f"{family}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
