"""Invoke-time benchmarks and the compute profile they leave behind.

``lepton models bench NAME`` measures a model's invoke time on this machine
and writes it as ``bench.json`` beside the model's manifest: the compute
profile the coordinator assumes (``invoke_ms``, the median) until a device
reports measured times. The input is a realistic one: a random camera frame
or a synthetic vibration window through the model's own preprocessing.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from lepton.errors import ModelError

PROFILE_NAME = "bench.json"


def sample_input(runner) -> np.ndarray:
    """A preprocessed input tensor for ``runner``: a random 640x480 frame or a synthetic window."""
    rng = np.random.default_rng(0)
    spec = runner.preprocessor.spec
    if spec.kind == "window":
        from lepton.models.synth import vibration_window

        window = spec.window_spec
        return runner.preprocess(vibration_window(rng, False, window.length, 1000.0, window.channels))
    return runner.preprocess(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


def summarize(times_ms: list[float] | np.ndarray, wall_s: float) -> dict:
    """Percentiles of invoke times (ms) and throughput over the wall time of the loop."""
    times = np.asarray(times_ms, dtype=np.float64)
    if times.size == 0:
        raise ModelError("benchmark: no invocation was timed")
    p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]))
    return {
        "iterations": int(times.size),
        "p50_ms": round(p50, 4), "p95_ms": round(p95, 4), "p99_ms": round(p99, 4),
        "mean_ms": round(float(times.mean()), 4), "min_ms": round(float(times.min()), 4),
        "max_ms": round(float(times.max()), 4),
        "throughput_per_s": round(times.size / wall_s, 2) if wall_s > 0 else 0.0,
    }


def bench_runner(runner, iterations: int, warmup: int = 10, progress: Callable[[int], None] | None = None) -> dict:
    """Time ``runner.invoke`` (the interpreter's invoke, as the agent reports it) ``iterations`` times."""
    if iterations < 1 or warmup < 0:
        raise ModelError(f"benchmark: iterations must be >= 1 and warmup >= 0 (got {iterations}, {warmup})")
    tensor = sample_input(runner)
    for _ in range(warmup):
        runner.invoke(tensor)
    times = np.empty(iterations)
    start = time.perf_counter()
    for i in range(iterations):
        runner.invoke(tensor)
        times[i] = runner.last_invoke_ms
        if progress:
            progress(1)
    return summarize(times, time.perf_counter() - start)


def bench_entry(entry, threads: int = 1, iterations: int = 200, warmup: int = 10,
                progress: Callable[[int], None] | None = None) -> dict:
    """Benchmark a registry Entry; the result is the compute profile (see :func:`write_profile`)."""
    from lepton.models.runner import ModelRunner
    from lepton.models.runtime import runtime_info

    runner = ModelRunner.from_entry(entry, num_threads=threads)
    figures = bench_runner(runner, iterations, warmup, progress)
    name, version = runtime_info()
    return {
        "model": entry.manifest.name, "version": entry.manifest.version, "sha256": entry.manifest.sha256,
        "invoke_ms": figures["p50_ms"], **figures, "threads": threads, "warmup": warmup,
        "runtime": name, "runtime_version": version, "host": socket.gethostname(),
        "machine": platform.machine(), "cpus": os.cpu_count() or 1,
        "measured_at": round(time.time(), 3),
    }


def profile_path(entry) -> Path:
    """Where an entry's compute profile lives: ``bench.json`` beside its manifest."""
    return entry.directory / PROFILE_NAME


def write_profile(result: dict, path: str | os.PathLike) -> Path:
    """Write a benchmark result atomically; ModelError if the directory is not writable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise ModelError(f"cannot write the compute profile {path}: {exc.strerror or exc}") from None
    return path


def read_profile(entry) -> dict | None:
    """The entry's compute profile if it has one measured for this very file, else None."""
    path = profile_path(entry)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("sha256") not in (None, entry.manifest.sha256):
        return None  # measured for another file: stale
    return data
