"""Synthetic inputs: machine vibration windows and the held-out handwritten digits.

NumPy only: the zoo build scripts (under TensorFlow), the agent's synthetic
sources and ``lepton models eval`` all import this module, and none of them
may pull in anything heavier.

Vibration model (a rotating machine on rolling-element bearings, measured by
a 3-axis accelerometer, values in g):

* normal: the shaft's rotation frequency and its 2nd and 3rd harmonics
  (unbalance, misalignment), sensor noise, and gravity (1 g) on the third axis;
* bearing fault (an outer-race defect): each time a rolling element passes
  the defect it strikes it, and the impulse rings a structural resonance
  (a decaying sinusoid) at a few hundred Hz. Impulses repeat at the ball-pass
  frequency of the outer race (BPFO, about 3.6 x the shaft frequency here),
  and the broadband noise floor rises. Severity varies from barely visible
  to obvious, so a detector cannot be perfect on mild faults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGIT_LEVELS = 16  # scikit-learn's digits are 8x8 images with values 0..16

# Per-axis gain of the shaft harmonics: two radial axes, one axial (weaker).
_AXIS_GAIN = (1.0, 0.8, 0.4)
# Amplitude in g of the 1x, 2x and 3x shaft harmonics on a radial axis.
_HARMONICS_G = (0.25, 0.08, 0.04)
_BPFO_RATIO = 3.58  # ball-pass frequency (outer race) / shaft frequency for a typical deep-groove bearing


def _axis_gain(channel: int) -> float:
    return _AXIS_GAIN[channel % len(_AXIS_GAIN)]


def _normal(rng: np.random.Generator, t: np.ndarray, channels: int, shaft_hz: float, noise_g: float) -> np.ndarray:
    """Shaft harmonics + white sensor noise, (length, channels)."""
    out = np.empty((t.size, channels), dtype=np.float64)
    for c in range(channels):
        signal = np.zeros_like(t)
        for k, amp in enumerate(_HARMONICS_G, start=1):
            level = amp * _axis_gain(c) * rng.uniform(0.7, 1.3)
            signal += level * np.sin(2 * np.pi * k * shaft_hz * t + rng.uniform(0, 2 * np.pi))
        out[:, c] = signal + rng.normal(0.0, noise_g, t.size)
    return out


def _bearing_impulses(rng: np.random.Generator, t: np.ndarray, channels: int, shaft_hz: float, fs: float) -> np.ndarray:
    """Impulses at the BPFO, each ringing a damped resonance, (length, channels)."""
    bpfo = shaft_hz * _BPFO_RATIO * rng.uniform(0.98, 1.02)  # slip makes it wander a little
    resonance = rng.uniform(0.55, 0.75) * fs / 2  # a few hundred Hz at 1 kHz sampling
    decay_s = rng.uniform(0.002, 0.005)
    severity = float(np.exp(rng.uniform(np.log(0.08), np.log(0.8))))  # log-uniform, 0.08..0.8 g
    period = 1.0 / bpfo
    starts = np.arange(rng.uniform(0, period), t[-1] + period, period)
    starts = starts + rng.normal(0.0, 0.01 * period, starts.size)  # random jitter of the rolling elements
    ring = np.zeros_like(t)
    for start in starts:
        dt = t - start
        live = dt >= 0
        ring[live] += rng.uniform(0.7, 1.3) * np.exp(-dt[live] / decay_s) * np.sin(2 * np.pi * resonance * dt[live])
    out = np.empty((t.size, channels), dtype=np.float64)
    for c in range(channels):
        out[:, c] = severity * _axis_gain(c) * rng.uniform(0.8, 1.2) * ring
    return out


def vibration_window(
    rng: np.random.Generator, fault: bool, length: int = 256, fs: float = 1000.0, channels: int = 3
) -> np.ndarray:
    """One accelerometer window, (length, channels) float32 in g, oldest sample first.

    ``fault`` adds an outer-race bearing fault of random severity. Every draw
    comes from ``rng``, so a seeded generator gives the same windows again.
    """
    if length < 2 or channels < 1 or not fs > 0:
        raise ValueError(f"vibration_window needs length >= 2, channels >= 1, fs > 0 (got {length}, {channels}, {fs})")
    t = np.arange(length, dtype=np.float64) / fs
    shaft_hz = min(rng.uniform(20.0, 30.0), fs / 10)  # 1200..1800 rpm, kept well under Nyquist
    noise_g = rng.uniform(0.015, 0.03)
    if fault:
        noise_g *= rng.uniform(1.3, 2.0)  # a damaged bearing raises the whole noise floor
    window = _normal(rng, t, channels, shaft_hz, noise_g)
    if fault:
        window += _bearing_impulses(rng, t, channels, shaft_hz, fs)
    if channels >= 3:
        window[:, 2] += 1.0  # gravity on the vertical axis
    return window.astype(np.float32)


def vibration_set(
    rng: np.random.Generator, count: int, fault_fraction: float = 0.5, length: int = 256, fs: float = 1000.0,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows (count, length, channels) float32 and fault labels (count,) int64."""
    labels = (rng.random(count) < fault_fraction).astype(np.int64)
    windows = np.stack([vibration_window(rng, bool(f), length, fs, channels) for f in labels])
    return windows, labels


def digits_path() -> Path:
    """models/zoo/digits/heldout.npz: the digits the zoo's digit models never saw in training."""
    return Path(__file__).resolve().parent / "zoo" / "digits" / "heldout.npz"


def digits_heldout() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits: (images N x 8 x 8 float32 in 0..16, labels N int64)."""
    with np.load(digits_path(), allow_pickle=False) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def digit_frame(image: np.ndarray, width: int = 32, height: int = 32) -> np.ndarray:
    """An 8x8 digit (0..16) as a height x width BGR uint8 frame, as a camera would see it.

    Values scale to 0..255; nearest-neighbour upscaling keeps each source
    pixel a solid block (the agent's synthetic camera renders the same way).
    """
    gray = np.clip(np.rint(np.asarray(image, np.float32) * (255.0 / DIGIT_LEVELS)), 0, 255).astype(np.uint8)
    rows = np.arange(height) * gray.shape[0] // height
    cols = np.arange(width) * gray.shape[1] // width
    big = gray[rows[:, None], cols[None, :]]
    return np.repeat(big[:, :, None], 3, axis=2)
