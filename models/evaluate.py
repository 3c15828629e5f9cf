"""Measure a model on its held-out split, through the same path the agent runs.

Each sample goes through ``ModelRunner.run``: a camera-like frame or a
sensor window, the manifest's preprocessing, the runtime, the manifest's
postprocessing. So the figure covers the spec as much as the weights.

Held-out files are ``.npz`` with ``x`` (samples), ``y`` (labels) and
``kind``: ``digits8x8`` (8x8 digits in 0..16, rendered as 32x32 BGR frames
the way the synthetic camera renders them), ``frames`` (HxWx3 uint8 BGR) or
``windows`` ((length, channels) sensor windows; ``y`` 1 marks an anomaly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from lepton.errors import ModelError
from lepton.models.synth import digit_frame

DIGIT_FRAME = (32, 32)  # width, height of a rendered held-out digit
KINDS = ("digits8x8", "frames", "windows")


def load_heldout(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, kind) from a held-out .npz; ModelError naming the file if malformed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y, kind = data["x"], data["y"], str(data["kind"]) if "kind" in data else "frames"
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"held-out data {path}: cannot be read: {exc}") from None
    if kind not in KINDS:
        raise ModelError(f"held-out data {path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if len(x) != len(y) or len(x) == 0:
        raise ModelError(f"held-out data {path}: {len(x)} samples for {len(y)} labels")
    return x, y, kind


def _sample(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "digits8x8":
        return digit_frame(x, *DIGIT_FRAME)
    if kind == "windows":
        return np.asarray(x, dtype=np.float32)
    return x


def _anomaly_metrics(truth: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float(np.mean(flagged == truth)),
            "positives": int(truth.sum())}


def evaluate_runner(runner, heldout: str | os.PathLike, task: str,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Metrics of a ModelRunner on a held-out file.

    ``task`` is the postprocess kind: accuracy for classification;
    precision, recall, f1 and accuracy for anomaly.
    """
    x, y, kind = load_heldout(heldout)
    predictions = np.empty(len(y), dtype=np.int64)
    times = np.empty(len(y))
    for i in range(len(y)):
        result, times[i] = runner.run(_sample(x[i], kind))
        if task == "classification":
            predictions[i] = result["top"][0]["index"]
        elif task == "anomaly":
            predictions[i] = int(bool(result["anomaly"]))
        else:
            raise ModelError(f"{runner.name}: postprocess kind {task!r} has no metric to evaluate")
        if progress:
            progress(1)
    metrics = {"samples": len(y), "invoke_ms_median": float(np.median(times))}
    if task == "classification":
        metrics["accuracy"] = float(np.mean(predictions == y))
    else:
        metrics.update(_anomaly_metrics(np.asarray(y).astype(bool), predictions.astype(bool)))
    return metrics


def evaluate(entry, registry, num_threads: int = 1, progress: Callable[[int], None] | None = None) -> dict:
    """Measure a registry Entry now; ModelError if it has no held-out split."""
    from lepton.models.runner import ModelRunner

    path = registry.heldout_path(entry)
    if path is None:
        why = "it is untrained (random weights)" if not entry.manifest.trained else "its manifest names no held-out file"
        if entry.manifest.heldout:
            why = f"held-out file {entry.manifest.heldout} is missing"
        raise ModelError(f"model {entry.label()}: nothing to evaluate: {why}")
    runner = ModelRunner.from_entry(entry, num_threads=num_threads)
    return evaluate_runner(runner, path, entry.manifest.postprocess.kind, progress)


def heldout_count(path: str | os.PathLike | Path) -> int:
    """Samples in a held-out file (for a progress bar)."""
    return len(load_heldout(path)[1])
