"""Frames and sensor windows -> the model's input tensor, driven by spec + metadata.

Everything model-specific comes from the PreprocessSpec and the input
tensor's own metadata (shape, dtype, scale, zero point), so a model nobody
here trained runs given only its spec.

Images: for 8-bit frames, normalisation and quantisation together are a
per-channel function of the pixel value, so they are one 256-entry lookup
table per channel (cv2.LUT), computed once in float64 and exact to the
formula ``q = clip(round(real / scale + zero_point))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from lepton.errors import ModelError
from lepton.models.metadata import TensorInfo
from lepton.models.spec import ImageSpec, PreprocessSpec, WindowSpec

log = logging.getLogger(__name__)

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}


def quantize(real: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Real values -> the tensor's dtype with its own scale and zero point (float: cast)."""
    dtype = np.dtype(info.dtype)
    if not info.quantized:
        return np.asarray(real, dtype=dtype)
    limits = np.iinfo(dtype)
    q = np.rint(np.asarray(real, dtype=np.float64) / info.scale + info.zero_point)
    return np.clip(q, limits.min, limits.max).astype(dtype)


def dequantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Tensor values -> float32 reals with the tensor's own scale and zero point."""
    if not info.quantized:
        return np.asarray(values, dtype=np.float32)
    return ((np.asarray(values, dtype=np.float32) - np.float32(info.zero_point)) * np.float32(info.scale)).astype(
        np.float32, copy=False
    )


@dataclass(frozen=True)
class Letterbox:
    """Where a frame lands inside the tensor: tensor = frame * scale + (left, top)."""

    scale: float
    left: int
    top: int
    width: int  # of the resized frame inside the tensor
    height: int

    def to_frame(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in tensor pixels back to frame pixels."""
        return (x - self.left) / self.scale, (y - self.top) / self.scale


def letterbox_geometry(frame_hw: tuple[int, int], tensor_hw: tuple[int, int]) -> Letterbox:
    """Largest aspect-preserving fit of a frame into the tensor, centred."""
    fh, fw = frame_hw
    th, tw = tensor_hw
    scale = min(tw / fw, th / fh)
    width, height = max(1, min(tw, round(fw * scale))), max(1, min(th, round(fh * scale)))
    return Letterbox(scale, (tw - width) // 2, (th - height) // 2, width, height)


def _affine(spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (alpha, beta): real = pixel * alpha + beta."""
    channels, r = spec.channels, spec.input_range
    if spec.normalize == "none":
        return np.ones(channels), np.zeros(channels)
    if spec.normalize == "unit":
        return np.full(channels, 1.0 / r), np.zeros(channels)
    if spec.normalize == "symmetric":
        return np.full(channels, 2.0 / r), np.full(channels, -1.0)
    mean = np.broadcast_to(np.asarray(spec.mean, dtype=np.float64), channels)
    std = np.broadcast_to(np.asarray(spec.std, dtype=np.float64), channels)
    return 1.0 / (r * std), -mean / std


class _ImagePreprocessor:
    """Resize, colour, normalise, layout, quantise."""

    def __init__(self, spec: ImageSpec, info: TensorInfo):
        self.spec, self.info = spec, info
        if len(info.shape) != 4 or info.shape[0] != 1:
            raise ModelError(
                f"preprocess.kind is 'image' but input '{info.name}' has shape {info.shape}; "
                "an image model takes (1, H, W, C) or (1, C, H, W)"
            )
        if spec.layout == "nhwc":
            _, self.height, self.width, channels = info.shape
        else:
            _, channels, self.height, self.width = info.shape
        if channels != spec.channels:
            raise ModelError(
                f"preprocess.image.color is '{spec.color}' ({spec.channels} channel(s)) but input '{info.name}' "
                f"has shape {info.shape}: {channels} channel(s) with layout '{spec.layout}'"
            )
        self.dtype = np.dtype(info.dtype)
        self.interpolation = _INTERPOLATION[spec.interpolation]
        self.alpha, self.beta = _affine(spec)
        self.lut = self._lookup_table()
        # The common uint8 model fed [0, 1] with scale 1/255, zero point 0 is the identity.
        pixels = np.repeat(np.arange(256)[:, None], spec.channels, 1)
        self.identity = self.dtype == np.uint8 and np.array_equal(self.lut[0], pixels)
        self._geometry: dict[tuple[int, int], Letterbox] = {}

    def _lookup_table(self) -> np.ndarray:
        pixels = np.arange(256, dtype=np.float64)[:, None]
        real = pixels * self.alpha + self.beta  # (256, channels)
        return quantize(real, self.info).reshape(1, 256, self.spec.channels)

    def geometry(self, frame_hw: tuple[int, int]) -> Letterbox:
        """Letterbox placement of a frame of this size (cached per size)."""
        geo = self._geometry.get(frame_hw)
        if geo is None:
            geo = self._geometry[frame_hw] = letterbox_geometry(frame_hw, (self.height, self.width))
        return geo

    def _as_bgr(self, frame: np.ndarray) -> np.ndarray:
        if frame.size == 0 or frame.dtype.kind not in "uif":
            raise ModelError(f"frame of shape {frame.shape} and dtype {frame.dtype} is not an image")
        if frame.ndim == 2 and frame.dtype != np.uint8:
            # A 2-D float array is what a sensor source produces, not a camera.
            raise ModelError(
                f"frame of shape {frame.shape} and dtype {frame.dtype} is not an image "
                "(a sensor window fed to an image model?)"
            )
        if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
            return cv2.cvtColor(frame.reshape(frame.shape[:2]), cv2.COLOR_GRAY2BGR)
        if frame.ndim == 3 and frame.shape[2] == 4:
            return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        if frame.ndim == 3 and frame.shape[2] == 3:
            return frame
        raise ModelError(f"frame of shape {frame.shape} is not an image (expected HxW, HxWx3 BGR or HxWx4 BGRA)")

    def fit(self, frame: np.ndarray) -> np.ndarray:
        """The frame as 8-bit BGR at the tensor's height and width (stretched or letterboxed as the spec
        says): all of preprocessing before colour and values, so ``self(self.fit(f))`` equals ``self(f)``."""
        frame = self._as_bgr(np.asarray(frame))
        if frame.dtype != np.uint8:
            raise ModelError(f"frame of dtype {frame.dtype}: only 8-bit images can be sent as JPEG")
        return self._resize(frame)

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        if (h, w) == (self.height, self.width):
            return frame
        if self.spec.resize == "stretch":
            return cv2.resize(frame, (self.width, self.height), interpolation=self.interpolation)
        geo = self.geometry((h, w))
        canvas = np.full((self.height, self.width, 3), self.spec.pad_value, dtype=frame.dtype)
        canvas[geo.top : geo.top + geo.height, geo.left : geo.left + geo.width] = cv2.resize(
            frame, (geo.width, geo.height), interpolation=self.interpolation
        )
        return canvas

    def _color(self, image: np.ndarray) -> np.ndarray:
        if self.spec.color == "rgb":
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if self.spec.color == "gray":
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
        return image

    def _values(self, image: np.ndarray) -> np.ndarray:
        """Normalised and quantised (H, W, C) in the tensor's dtype."""
        if image.dtype == np.uint8:
            if self.identity:
                return image
            if image.shape[2] == 1:  # cv2.LUT drops a single channel axis
                return self.lut[0, :, 0][image]
            return cv2.LUT(image, self.lut)
        real = image.astype(np.float32) * self.alpha.astype(np.float32) + self.beta.astype(np.float32)
        return quantize(real, self.info)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        frame = self._as_bgr(np.asarray(frame))
        if frame.dtype not in (np.uint8, np.float32):
            frame = frame.astype(np.float32)
        values = self._values(self._color(self._resize(frame)))
        if self.spec.layout == "nchw":
            values = values.transpose(2, 0, 1)
        out = np.empty(self.info.shape, dtype=self.dtype)
        out[0] = values
        return out


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


class _WindowPreprocessor:
    """Pad/trim, standardise, FFT magnitude, quantise."""

    def __init__(self, spec: WindowSpec, info: TensorInfo):
        self.spec, self.info = spec, info
        rows, channels = spec.feature_shape
        # (1, rows, channels), (1, rows * channels) and (1, rows, channels, 1) all fit.
        accepted = {_squeeze((rows, channels)), _squeeze((rows * channels,))}
        if len(info.shape) < 2 or info.shape[0] != 1 or _squeeze(info.shape[1:]) not in accepted:
            what = f"|rfft| of {spec.length} samples" if spec.fft else f"{spec.length} samples"
            raise ModelError(
                f"preprocess.window gives ({rows}, {channels}) features ({what} x {channels} channels) "
                f"but input '{info.name}' has shape {info.shape}"
            )
        self.mean = None if spec.mean is None else np.asarray(spec.mean, dtype=np.float32)
        self.std = None if spec.std is None else np.asarray(spec.std, dtype=np.float32)

    def _fit(self, window: np.ndarray) -> np.ndarray:
        """(length, channels) float32: newest samples kept, zeros prepended."""
        try:
            window = np.asarray(window, dtype=np.float32)
        except (TypeError, ValueError):
            raise ModelError("window is not numeric") from None
        if window.ndim == 1:
            window = window[:, None]
        if window.ndim != 2 or window.shape[1] != self.spec.channels or not window.size:
            raise ModelError(
                f"window of shape {window.shape} is not (samples, {self.spec.channels}) as preprocess.window says"
            )
        n = self.spec.length
        if window.shape[0] >= n:
            return window[-n:]
        out = np.zeros((n, self.spec.channels), dtype=np.float32)
        out[n - window.shape[0] :] = window
        return out

    def features(self, window: np.ndarray) -> np.ndarray:
        """The real-valued features before quantisation, (rows, channels) float32."""
        x = self._fit(window)
        if self.spec.standardize:
            std = x.std(axis=0)
            # A flat channel (a stuck sensor) has no spread: centre it, do not divide by 0.
            x = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
        elif self.mean is not None:
            x = (x - self.mean) / self.std
        if self.spec.fft:
            x = np.abs(np.fft.rfft(x, axis=0)) / self.spec.length
        return np.nan_to_num(x.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)

    def __call__(self, window: np.ndarray) -> np.ndarray:
        return quantize(self.features(window), self.info).reshape(self.info.shape)


class Preprocessor:
    """Turns one frame or window into the batched input tensor of a model.

    ``Preprocessor(spec, input)(frame)`` returns a new array each call, of the
    input tensor's shape and dtype, quantised with the tensor's own scale and
    zero point. A spec that cannot feed the tensor raises ModelError at
    construction, naming the field and the tensor.
    """

    def __init__(self, spec: PreprocessSpec, input: TensorInfo):  # noqa: A002 - the agreed interface
        self.spec = spec
        self.input = input
        if spec.kind == "image":
            self._impl: _ImagePreprocessor | _WindowPreprocessor = _ImagePreprocessor(spec.image_spec, input)
        else:
            self._impl = _WindowPreprocessor(spec.window_spec, input)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self._impl(frame)

    def fit(self, frame: np.ndarray) -> np.ndarray:
        """An image model's frame as 8-bit BGR at the input's size, before colour and values (what an
        offloaded JPEG carries); ModelError for a window model or a frame that is not 8-bit."""
        if not isinstance(self._impl, _ImagePreprocessor):
            raise ModelError(f"input '{self.input.name}' is fed {self.spec.kind}s, not images")
        return self._impl.fit(frame)

    def letterbox(self, frame_hw: tuple[int, int]) -> Letterbox | None:
        """Where a frame of this (height, width) lands in the tensor (image + letterbox only)."""
        if isinstance(self._impl, _ImagePreprocessor) and self._impl.spec.resize == "letterbox":
            return self._impl.geometry(tuple(frame_hw))
        return None
