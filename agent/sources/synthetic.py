"""``synthetic``: generated frames, so a demo or a test needs no camera.

Pattern ``digits`` shows the held-out handwritten digits of the zoo's
``digits`` model (never seen in training), each carrying its true label in
``meta["truth"]`` so results can be checked. Pattern ``noise`` is random
pixels for load tests (a pool drawn once from the seed and cycled).
"""

from __future__ import annotations

import logging
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lepton.agent.sources.base import BaseSource, Pacer, SourceConfig
from lepton.errors import LeptonError

log = logging.getLogger(__name__)

# sklearn digits are 8x8 with ink levels 0..16.
_DIGIT_LEVELS = 16.0
# Noise frames are drawn once into a pool this large (bytes, at least 2 frames) and cycled:
# drawing each frame anew cost more than the model it fed at small sizes.
_NOISE_POOL_BYTES = 8 * 1024 * 1024
_NOISE_POOL_MAX = 64


class SyntheticConfig(SourceConfig):
    """``type = "synthetic"``."""

    type: Literal["synthetic"] = Field("synthetic", description="this source's type")
    pattern: Literal["digits", "noise"] = Field(
        "digits", description="digits: held-out handwritten digits with their label; noise: random pixels"
    )
    fps: float = Field(10.0, gt=0, le=10000, description="frames per second")
    width: int = Field(64, ge=8, le=8192, description="frame width in pixels")
    height: int = Field(64, ge=8, le=8192, description="frame height in pixels")
    seed: int = Field(0, ge=0, description="random seed: the same seed gives the same sequence")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (N x 8 x 8 in 0..16, labels N), or LeptonError if the zoo lacks them."""
    try:
        from lepton.models.synth import digits_heldout

        images, labels = digits_heldout()
    except (ImportError, OSError, KeyError, ValueError) as exc:
        raise LeptonError(f"synthetic digits: the held-out digits set cannot be loaded ({exc})") from None
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or len(images) != len(labels) or len(images) == 0:
        raise LeptonError(f"synthetic digits: held-out set has shape {images.shape} for {labels.shape} labels")
    return images, labels


def digit_gray(images: np.ndarray) -> np.ndarray:
    """8x8 digits (0..16) as 8x8 gray uint8 images (0..255)."""
    return np.clip(np.rint(np.asarray(images, np.float32) * (255.0 / _DIGIT_LEVELS)), 0, 255).astype(np.uint8)


def render_digit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An 8x8 digit (0..16, or already gray uint8) as a width x height BGR uint8 image, upscaled by nearest neighbour.

    Nearest neighbour keeps each source pixel a solid block, so area
    downscaling back to 8x8 recovers the original values. Output pixel
    (y, x) is source pixel (y * 8 // height, x * 8 // width), as cv2's
    INTER_NEAREST maps it.
    """
    gray = image if image.dtype == np.uint8 else digit_gray(image)
    big = cv2.resize(np.ascontiguousarray(gray), (width, height), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)


class SyntheticSource(BaseSource):
    """Generated frames at a steady rate."""

    kind = "synthetic"

    def __init__(self, config: SyntheticConfig) -> None:
        super().__init__(config)
        # Loaded here so a broken install fails at start-up, not in the thread.
        self._digits = load_digits() if config.pattern == "digits" else None
        self._gray = digit_gray(self._digits[0]) if self._digits is not None else None

    def run(self) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        pacer = Pacer(cfg.fps)
        self.set_connected(True, "generating %s at %s fps (%dx%d)", cfg.pattern, cfg.fps, cfg.width, cfg.height)
        if self._digits is None:
            self._noise(rng, pacer)
            return
        labels = [int(label) for label in self._digits[1]]
        order: list[int] = []
        position = 0
        while self.sleep(pacer.delay()):
            if position >= len(order):
                # Every held-out digit once per pass, in a fresh order each pass.
                order, position = rng.permutation(len(labels)).tolist(), 0
            index = order[position]
            position += 1
            self.publish(render_digit(self._gray[index], cfg.width, cfg.height), {"truth": labels[index]})

    def _noise(self, rng: np.random.Generator, pacer: Pacer) -> None:
        """Random frames, drawn once into a pool and cycled (frames are read-only, so they can be shared)."""
        cfg = self.config
        size = cfg.height * cfg.width * 3
        pool = [rng.integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8)
                for _ in range(max(2, min(_NOISE_POOL_MAX, _NOISE_POOL_BYTES // size)))]
        position = 0
        while self.sleep(pacer.delay()):
            self.publish(pool[position])
            position = (position + 1) % len(pool)
