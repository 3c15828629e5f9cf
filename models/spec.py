"""The declarative pre/post-processing spec stored in each model's manifest.

A spec plus the metadata read from the .tflite is all the runtime needs to
feed a model and read its answer, so a third-party model needs no code.
Unknown keys and combinations that cannot apply are refused, naming the field.

Example (a uint8 224x224 classifier trained on RGB images in [0, 1])::

    {"kind": "image", "image": {"resize": "stretch", "color": "rgb", "normalize": "unit"}}
    {"kind": "classification", "top_k": 5}
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lepton.errors import ConfigError, validation_message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def _set_but_unused(self, fields: tuple[str, ...], why: str) -> None:
        """Refuse fields given explicitly where they cannot apply.

        A field equal to its default passes, so a spec dumped with all its
        defaults (``model_dump()``) reads back unchanged.
        """
        for name in fields:
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"'{name}' {why}")


class ImageSpec(_Strict):
    """How a camera frame (HxWx3 uint8, OpenCV BGR order) becomes an input tensor.

    Steps, in order: resize, colour conversion, normalisation, layout,
    quantisation with the input tensor's own scale and zero point.
    """

    resize: Literal["stretch", "letterbox"] = Field(
        "stretch", description="stretch: scale to the tensor size ignoring aspect; letterbox: keep aspect, pad the rest"
    )
    interpolation: Literal["linear", "area", "nearest"] = Field(
        "linear", description="OpenCV interpolation for the resize (area is best for large downscales)"
    )
    pad_value: int = Field(0, ge=0, le=255, description="pixel value of the letterbox padding, all channels")
    color: Literal["rgb", "bgr", "gray"] = Field(
        "rgb", description="channel order the model was trained on; gray means one channel"
    )
    layout: Literal["nhwc", "nchw"] = Field("nhwc", description="tensor layout: channels last (TFLite usual) or first")
    normalize: Literal["none", "unit", "symmetric", "meanstd"] = Field(
        "unit",
        description="none: raw pixel values; unit: [0, 1]; symmetric: [-1, 1]; "
        "meanstd: (pixel / input_range - mean) / std, per channel in `color` order",
    )
    mean: list[float] | None = Field(None, description="per-channel means on the [0, 1] scale (meanstd only)")
    std: list[float] | None = Field(
        None, description="per-channel standard deviations on the [0, 1] scale (meanstd only)"
    )
    input_range: float = Field(255.0, gt=0, description="the largest pixel value of a frame (255 for 8-bit)")

    @property
    def channels(self) -> int:
        """Channels of the tensor this spec produces."""
        return 1 if self.color == "gray" else 3

    @model_validator(mode="after")
    def _check(self) -> "ImageSpec":
        if self.resize != "letterbox":
            self._set_but_unused(("pad_value",), "applies only to resize 'letterbox'")
        if self.normalize != "meanstd":
            self._set_but_unused(("mean", "std"), "applies only to normalize 'meanstd'")
            return self
        if self.mean is None or self.std is None:
            raise ValueError("normalize 'meanstd' needs both 'mean' and 'std'")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"'{name}' has {len(values)} values but color '{self.color}' has {self.channels} channel(s)"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("'std' values must all be > 0")
        return self


class WindowSpec(_Strict):
    """How a sensor window ((samples, channels) float, oldest first) becomes an input tensor.

    Steps, in order: pad/trim to ``length``, standardise, FFT magnitude,
    quantisation with the input tensor's own scale and zero point.
    """

    length: int = Field(
        256,
        ge=2,
        description="samples per window; longer windows keep the newest samples, shorter ones are zero-padded "
        "at the start",
    )
    channels: int = Field(3, ge=1, description="sensor channels (e.g. 3 for a 3-axis accelerometer)")
    standardize: bool = Field(
        False, description="per window and channel: subtract the mean, divide by the standard deviation"
    )
    mean: list[float] | None = Field(
        None, description="fixed per-channel means to subtract instead (training statistics)"
    )
    std: list[float] | None = Field(None, description="fixed per-channel standard deviations to divide by (with mean)")
    fft: bool = Field(
        False, description="feed |rfft| / length per channel: (length // 2 + 1, channels) features instead of samples"
    )

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(rows, channels) of the features this spec produces."""
        return ((self.length // 2 + 1) if self.fft else self.length, self.channels)

    @model_validator(mode="after")
    def _check(self) -> "WindowSpec":
        if (self.mean is None) != (self.std is None):
            raise ValueError("fixed standardisation needs both 'mean' and 'std'")
        if self.mean is None:
            return self
        if self.standardize:
            raise ValueError("'standardize' (per window) and fixed 'mean'/'std' exclude each other")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"'{name}' has {len(values)} values but the window has {self.channels} channel(s)")
        if any(s <= 0 for s in self.std):
            raise ValueError("'std' values must all be > 0")
        return self


class PreprocessSpec(_Strict):
    """What a model expects as input: an image or a sensor window."""

    kind: Literal["image", "window"] = Field("image", description="image: camera frames; window: sensor windows")
    image: ImageSpec | None = Field(None, description="image settings (kind 'image'; defaults apply when omitted)")
    window: WindowSpec | None = Field(None, description="window settings (kind 'window'; defaults apply when omitted)")

    @model_validator(mode="after")
    def _check(self) -> "PreprocessSpec":
        if self.kind == "image" and self.window is not None:
            raise ValueError("'window' is set but kind is 'image' (a window spec cannot feed an image model)")
        if self.kind == "window" and self.image is not None:
            raise ValueError("'image' is set but kind is 'window' (an image spec cannot feed a sensor model)")
        return self

    @property
    def image_spec(self) -> ImageSpec:
        """The image settings, defaults filled in."""
        return self.image if self.image is not None else ImageSpec()

    @property
    def window_spec(self) -> WindowSpec:
        """The window settings, defaults filled in."""
        return self.window if self.window is not None else WindowSpec()


class PostprocessSpec(_Strict):
    """How a model's outputs become a result."""

    kind: Literal["classification", "anomaly", "raw"] = Field(
        "raw", description="classification: top-k labels; anomaly: a score and a verdict; raw: dequantised tensors"
    )
    output: int = Field(0, ge=0, description="which output tensor holds the scores (classification, anomaly 'output')")
    top_k: int = Field(3, ge=1, description="classes reported, best first (classification)")
    logits: bool = Field(False, description="the scores are logits: apply softmax (classification)")
    score: Literal["reconstruction", "output"] = Field(
        "output",
        description="anomaly score: 'output' reads a score tensor (max if it has several values); "
        "'reconstruction' compares the model's output with its input",
    )
    error: Literal["mse", "mae"] = Field("mse", description="reconstruction error: mean squared or mean absolute")
    threshold: float = Field(0.5, description="anomaly when score > threshold (anomaly)")

    @model_validator(mode="after")
    def _check(self) -> "PostprocessSpec":
        if self.kind != "classification":
            self._set_but_unused(("top_k", "logits"), "applies only to kind 'classification'")
        if self.kind != "anomaly":
            self._set_but_unused(("score", "error", "threshold"), "applies only to kind 'anomaly'")
        elif self.score == "reconstruction":
            self._set_but_unused(("output",), "is not used with score 'reconstruction'")
        else:
            self._set_but_unused(("error",), "applies only to score 'reconstruction'")
        if self.kind == "raw":
            self._set_but_unused(("output",), "is not used by kind 'raw' (every output is reported)")
        return self


_FIELD_FIRST = re.compile(r"^'(\w+)' (.*)$", re.S)


def _describe(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        msg = validation_message(err)
        named = _FIELD_FIRST.match(msg)
        if named:  # "'mean' has 2 values" -> "preprocess.image.mean: has 2 values"
            loc, msg = f"{loc}.{named.group(1)}", named.group(2)
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_preprocess(data: Any, where: str = "preprocess") -> PreprocessSpec:
    """A PreprocessSpec from a dict (or itself); ConfigError naming the bad field."""
    return _parse(PreprocessSpec, data, where)


def parse_postprocess(data: Any, where: str = "postprocess") -> PostprocessSpec:
    """A PostprocessSpec from a dict (or itself); ConfigError naming the bad field."""
    return _parse(PostprocessSpec, data, where)


_Spec = TypeVar("_Spec", bound=_Strict)


def _parse(spec_class: type[_Spec], data: Any, where: str) -> _Spec:
    """A *spec_class* from a dict (or itself); ConfigError naming the bad field under *where*."""
    if isinstance(data, spec_class):
        return data
    try:
        return spec_class.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None
