"""Per-frame cost of preprocessing + postprocessing, against bare invoke.

    python benchmarks/preprocess.py [--frames N]

For each case: p50/p95 of preprocess (640x480 BGR frame or a sensor window
-> input tensor) and postprocess, the bare invoke p50 of the same model
measured in the same run, and the ratio overhead / invoke. The agent's
budget is <= 1 ms of overhead beyond invoke for a 96x96 model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from lepton.models.metadata import TensorInfo
from lepton.models.preprocess import Preprocessor
from lepton.models.runner import ModelRunner
from lepton.models.spec import parse_preprocess

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"

CASES = [
    # (label, model file, preprocess spec, postprocess spec)
    ("uint8 224 classifier, stretch", "classifier224_uint8.tflite", {"kind": "image"}, {"kind": "classification"}),
    (
        "float 128 detector, letterbox [-1,1]",
        "detector128_float.tflite",
        {"kind": "image", "image": {"resize": "letterbox", "normalize": "symmetric"}},
        {"kind": "raw"},
    ),
    (
        "uint8 12x16 dense, meanstd",
        "dense_uint8.tflite",
        {"kind": "image", "image": {"normalize": "meanstd", "mean": [0.485, 0.456, 0.406], "std": [0.23, 0.22, 0.23]}},
        {"kind": "classification", "logits": True},
    ),
    (
        "sensor 128x3 window, standardise + FFT",
        "window_fft_ae.tflite",
        {"kind": "window", "window": {"length": 128, "channels": 3, "standardize": True, "fft": True}},
        {"kind": "anomaly", "score": "reconstruction"},
    ),
]


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def _time_ms(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def bench(label: str, model: str, pre: dict, post: dict, frames: int) -> None:
    runner = ModelRunner(DATA / model, pre, post)
    runner.warmup(10)
    rng = np.random.default_rng(0)
    frame = rng.normal(size=(256, 3)) if pre["kind"] == "window" else rng.integers(0, 256, (480, 640, 3), np.uint8)
    tensor = runner.preprocess(frame)
    outputs = runner.invoke(tensor)
    pre_ms = _time_ms(lambda: runner.preprocess(frame), frames)
    post_ms = _time_ms(lambda: runner.postprocess(outputs, tensor), frames)
    invoke_ms = _time_ms(lambda: runner.invoke(tensor), frames)
    overhead = statistics.median(pre_ms) + statistics.median(post_ms)
    invoke = statistics.median(invoke_ms)
    print(
        f"{label:40s} pre p50 {statistics.median(pre_ms):6.3f} p95 {_p(pre_ms, 0.95):6.3f} | "
        f"post p50 {statistics.median(post_ms):6.3f} | invoke p50 {invoke:6.3f} ms | "
        f"overhead/invoke {overhead / invoke:5.2f}"
    )


def bench_96(frames: int) -> None:
    """A 96x96 input (the agent's budget case), against a bare cv2.resize of the same frame."""
    import cv2

    frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), np.uint8)
    resize_ms = statistics.median(_time_ms(lambda: cv2.resize(frame, (96, 96)), frames))
    for dtype, scale, zero_point, image in (
        ("uint8", 1 / 255, 0, {}),
        ("int8", 1 / 128, 0, {"normalize": "symmetric"}),
        ("float32", 0.0, 0, {"resize": "letterbox", "normalize": "symmetric"}),
    ):
        info = TensorInfo(0, "input", (1, 96, 96, 3), dtype, scale, zero_point)
        pre = Preprocessor(parse_preprocess({"kind": "image", "image": image}), info)
        ms = _time_ms(lambda: pre(frame), frames)
        label = f"96x96 {dtype} {image.get('resize', 'stretch')} {image.get('normalize', 'unit')}"
        print(
            f"{label:40s} pre p50 {statistics.median(ms):6.3f} p95 {_p(ms, 0.95):6.3f} | "
            f"bare cv2.resize p50 {resize_ms:6.3f} ms | pre/resize {statistics.median(ms) / resize_ms:5.2f} | "
            "budget 1.000 ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500, help="timed repetitions per measurement")
    args = parser.parse_args()
    bench_96(args.frames)
    for case in CASES:
        bench(*case, frames=args.frames)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
