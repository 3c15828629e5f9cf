"""Preprocessing against a hand-written numpy/cv2 reference, and spec validation.

Tensor descriptions are built by hand here (pure logic); the end-to-end
checks with real models are in test_models_runtime.py.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from lepton.errors import ConfigError, ModelError
from lepton.models.metadata import TensorInfo
from lepton.models.preprocess import Preprocessor, letterbox_geometry
from lepton.models.spec import PostprocessSpec, PreprocessSpec, parse_postprocess, parse_preprocess

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tensor(shape, dtype="float32", scale=0.0, zero_point=0, name="input") -> TensorInfo:
    return TensorInfo(index=0, name=name, shape=tuple(shape), dtype=dtype, scale=scale, zero_point=zero_point)


def image_spec(**image) -> PreprocessSpec:
    return parse_preprocess({"kind": "image", "image": image})


def bgr(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference(frame, h, w, resize, color, normalize, pad=0):
    """Resize, colour, normalise in float64, written out longhand."""
    if resize == "stretch":
        img = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        s = min(w / frame.shape[1], h / frame.shape[0])
        nw, nh = round(frame.shape[1] * s), round(frame.shape[0] * s)
        img = np.full((h, w, 3), pad, np.uint8)
        top, left = (h - nh) // 2, (w - nw) // 2
        img[top : top + nh, left : left + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
    if color == "rgb":
        img = img[:, :, ::-1]
    elif color == "gray":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
    x = img.astype(np.float64)
    if normalize == "unit":
        return x / 255
    if normalize == "symmetric":
        return x / 127.5 - 1
    if normalize == "meanstd":
        mean, std = (np.array(MEAN), np.array(STD)) if color != "gray" else (0.5, 0.25)
        return (x / 255 - mean) / std
    return x


def quant(x, scale, zero_point, dtype):
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


CASES = list(
    itertools.product(
        ["stretch", "letterbox"], ["rgb", "bgr", "gray"], ["nhwc", "nchw"], ["none", "unit", "symmetric", "meanstd"]
    )
)


@pytest.mark.parametrize("resize, color, layout, normalize", CASES)
@pytest.mark.parametrize("dtype", ["float32", "uint8", "int8"])
def test_image_pipeline_matches_reference(resize, color, layout, normalize, dtype):
    h, w, c = 20, 24, (1 if color == "gray" else 3)
    shape = (1, h, w, c) if layout == "nhwc" else (1, c, h, w)
    scale, zp = {"float32": (0.0, 0), "uint8": (0.02, 100), "int8": (0.015, -7)}[dtype]
    info = tensor(shape, dtype, scale, zp)
    extra = {}
    if normalize == "meanstd":
        extra = {"mean": MEAN, "std": STD} if c == 3 else {"mean": [0.5], "std": [0.25]}
    if resize == "letterbox":
        extra["pad_value"] = 30
    spec = image_spec(resize=resize, color=color, layout=layout, normalize=normalize, **extra)
    frame = bgr(seed=hash((resize, color, layout, normalize)) % 1000)
    got = Preprocessor(spec, info)(frame)
    x = reference(frame, h, w, resize, color, normalize, pad=30)
    expected = x if dtype == "float32" else quant(x, scale, zp, np.dtype(dtype))
    if layout == "nchw":
        expected = expected.transpose(2, 0, 1)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    if dtype == "float32":
        np.testing.assert_allclose(got[0], expected, rtol=1e-6, atol=1e-5)
    else:
        np.testing.assert_array_equal(got[0], expected)


def test_two_int8_tensors_with_different_scales_get_their_own_quantisation():
    spec = image_spec(normalize="symmetric")
    a = tensor((1, 16, 16, 3), "int8", 1 / 128, 0)
    b = tensor((1, 16, 16, 3), "int8", 1 / 64, -20)
    frame = bgr(16, 16)
    x = frame[:, :, ::-1].astype(np.float64) / 127.5 - 1
    ta, tb = Preprocessor(spec, a)(frame), Preprocessor(spec, b)(frame)
    assert not np.array_equal(ta, tb)
    np.testing.assert_array_equal(ta[0], quant(x, 1 / 128, 0, np.int8))
    np.testing.assert_array_equal(tb[0], quant(x, 1 / 64, -20, np.int8))
    assert ta.max() == 127  # +1.0 / (1/128) = 128 saturates at the int8 limit


def test_uint8_model_fed_unit_range_gets_the_pixels_unchanged():
    info = tensor((1, 8, 8, 3), "uint8", 1 / 255, 0)
    frame = bgr(8, 8)
    np.testing.assert_array_equal(Preprocessor(image_spec(color="bgr"), info)(frame)[0], frame)


def test_output_is_a_new_array_each_call():
    pre = Preprocessor(image_spec(), tensor((1, 8, 8, 3), "uint8", 1 / 255, 0))
    first = pre(bgr(8, 8, seed=1))
    keep = first.copy()
    pre(bgr(8, 8, seed=2))
    np.testing.assert_array_equal(first, keep)


@pytest.mark.parametrize(
    "frame_hw, tensor_hw, expected",
    [
        ((480, 640), (96, 96), (0.15, 0, 12, 96, 72)),
        ((640, 480), (96, 96), (0.15, 12, 0, 72, 96)),
        ((100, 100), (50, 80), (0.5, 15, 0, 50, 50)),
        ((30, 40), (60, 80), (2.0, 0, 0, 80, 60)),
    ],
)
def test_letterbox_geometry(frame_hw, tensor_hw, expected):
    geo = letterbox_geometry(frame_hw, tensor_hw)
    assert (round(geo.scale, 6), geo.left, geo.top, geo.width, geo.height) == expected
    # The frame's corners land on the content's corners.
    assert geo.to_frame(geo.left, geo.top) == (0.0, 0.0)
    fx, fy = geo.to_frame(geo.left + geo.width, geo.top + geo.height)
    assert (fx, fy) == pytest.approx((frame_hw[1], frame_hw[0]), rel=0.02)


def test_letterbox_pads_with_the_quantised_pad_value():
    info = tensor((1, 96, 96, 3), "uint8", 1 / 255, 0)
    pre = Preprocessor(image_spec(resize="letterbox", pad_value=114, color="bgr"), info)
    frame = bgr(480, 640)
    out = pre(frame)[0]
    geo = pre.letterbox((480, 640))
    assert (out[: geo.top] == 114).all() and (out[geo.top + geo.height :] == 114).all()
    np.testing.assert_array_equal(out[geo.top : geo.top + geo.height], cv2.resize(frame, (96, 72)))


def test_gray_and_bgra_frames_are_accepted():
    info = tensor((1, 8, 8, 3), "float32")
    pre = Preprocessor(image_spec(), info)
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = pre(gray)[0]
    np.testing.assert_allclose(out[:, :, 0], gray / 255, atol=1e-7)
    np.testing.assert_allclose(out[:, :, 0], out[:, :, 2])
    bgra = np.dstack([bgr(8, 8), np.full((8, 8), 255, np.uint8)])
    np.testing.assert_array_equal(pre(bgra), pre(bgra[:, :, :3]))
    with pytest.raises(ModelError, match="not an image"):
        pre(np.zeros((2, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("resize,color", [("stretch", "rgb"), ("letterbox", "bgr"), ("stretch", "gray")])
def test_fit_is_preprocessing_up_to_colour_so_an_offloaded_jpeg_needs_no_other_geometry(resize, color):
    info = tensor((1, 96, 96, 1 if color == "gray" else 3), "int8", 2 / 255, 0)
    pre = Preprocessor(image_spec(resize=resize, color=color, normalize="symmetric"), info)
    frame = bgr(480, 640, seed=3)
    fitted = pre.fit(frame)
    assert fitted.shape == (96, 96, 3) and fitted.dtype == np.uint8, "8-bit BGR at the input size: JPEG-able"
    np.testing.assert_array_equal(pre(fitted), pre(frame))
    with pytest.raises(ModelError, match="only 8-bit images"):
        pre.fit(frame.astype(np.float32))
    with pytest.raises(ModelError, match="fed windows, not images"):
        window_pre(tensor((1, 64, 3)), length=64, channels=3).fit(frame)


def window_pre(info, **window) -> Preprocessor:
    return Preprocessor(parse_preprocess({"kind": "window", "window": window}), info)


def test_fft_features_have_the_expected_shape_and_values():
    n, fs, channels = 256, 1000.0, 2
    t = np.arange(n) / fs
    # 125 Hz lands exactly on bin 125 / (fs / n) = 32.
    window = np.stack([3.0 * np.sin(2 * np.pi * 125 * t), 0.5 + 0 * t], axis=1)
    pre = window_pre(tensor((1, n // 2 + 1, channels)), length=n, channels=channels, fft=True)
    feats = pre(window)[0]
    assert feats.shape == (129, 2)
    assert feats[32, 0] == pytest.approx(1.5, rel=1e-4)  # amplitude / 2 per side
    assert np.delete(feats[:, 0], 32).max() < 1e-4
    assert feats[0, 1] == pytest.approx(0.5) and feats[1:, 1].max() < 1e-6  # a constant is all DC


def test_standardised_fft_has_no_dc_and_unit_energy():
    rng = np.random.default_rng(0)
    window = rng.normal(5.0, 3.0, size=(128, 3))
    feats = window_pre(tensor((1, 65, 3)), length=128, channels=3, standardize=True, fft=True)(window)[0]
    assert np.abs(feats[0]).max() < 1e-5
    # Parseval on a unit-variance signal: sum |X_k|^2 over the full spectrum = n * n * var.
    full = np.abs(np.fft.fft((window - window.mean(0)) / window.std(0), axis=0)) / 128
    np.testing.assert_allclose(feats, full[:65], atol=1e-5)
    np.testing.assert_allclose((full**2).sum(0), 1.0, rtol=1e-4)


def test_window_pad_keeps_newest_samples_and_pads_the_start():
    pre = window_pre(tensor((1, 6, 1)), length=6, channels=1)
    np.testing.assert_array_equal(pre(np.arange(1, 10, dtype=float))[0, :, 0], [4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(pre(np.array([7.0, 8.0]))[0, :, 0], [0, 0, 0, 0, 7, 8])


def test_window_fixed_standardisation_and_quantisation():
    info = tensor((1, 4, 2), "int8", 0.05, 3)
    pre = window_pre(info, length=4, channels=2, mean=[1.0, -1.0], std=[2.0, 0.5])
    window = np.array([[1, -1], [3, 0], [5, -2], [-100, 100]], dtype=np.float32)
    real = (window - np.array([1.0, -1.0])) / np.array([2.0, 0.5])
    np.testing.assert_array_equal(pre(window)[0], quant(real, 0.05, 3, np.int8))


def test_window_accepts_flat_tensor_and_refuses_wrong_channels():
    pre = window_pre(tensor((1, 24)), length=8, channels=3)
    assert pre(np.ones((8, 3))).shape == (1, 24)
    with pytest.raises(ModelError, match=r"is not \(samples, 3\)"):
        pre(np.ones((8, 2)))
    with pytest.raises(ModelError, match=r"window of shape \(48, 64, 3\)"):
        pre(bgr())  # a camera frame routed to a sensor model


def test_a_sensor_window_or_empty_frame_fed_to_an_image_model_is_refused():
    pre = Preprocessor(image_spec(), tensor((1, 8, 8, 3), "uint8", 1 / 255, 0))
    with pytest.raises(ModelError, match="sensor window fed to an image model"):
        pre(np.ones((256, 3), np.float32))
    with pytest.raises(ModelError, match="not an image"):
        pre(np.zeros((0, 0, 3), np.uint8))


def test_window_spec_for_an_image_tensor_is_refused():
    with pytest.raises(ModelError, match=r"preprocess.window .* input 'image' has shape \(1, 96, 96, 3\)"):
        window_pre(tensor((1, 96, 96, 3), name="image"), length=128, channels=3)


def test_image_spec_for_a_window_tensor_is_refused():
    with pytest.raises(ModelError, match="preprocess.kind is 'image'"):
        Preprocessor(image_spec(), tensor((1, 128, 3), name="window"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "image", "image": {"colour": "rgb"}}, r"preprocess\.image\.colour: Extra inputs are not permitted"),
        ({"kind": "image", "window": {"length": 64}}, r"preprocess\.window: is set but kind is 'image'"),
        ({"kind": "window", "image": {}}, r"preprocess\.image: is set but kind is 'window'"),
        (
            {"kind": "image", "image": {"normalize": "meanstd", "mean": [0.5, 0.5], "std": STD}},
            r"preprocess\.image\.mean: has 2 values but color 'rgb' has 3",
        ),
        (
            {"kind": "image", "image": {"color": "gray", "normalize": "meanstd", "mean": MEAN, "std": STD}},
            r"preprocess\.image\.mean: has 3 values but color 'gray' has 1",
        ),
        ({"kind": "image", "image": {"normalize": "meanstd", "mean": MEAN}}, r"needs both 'mean' and 'std'"),
        ({"kind": "image", "image": {"mean": MEAN}}, r"preprocess\.image\.mean: applies only to normalize 'meanstd'"),
        ({"kind": "image", "image": {"pad_value": 3}}, r"preprocess\.image\.pad_value: applies only to resize"),
        ({"kind": "image", "image": {"resize": "crop"}}, r"preprocess\.image\.resize: Input should be"),
        ({"kind": "window", "window": {"standardize": True, "mean": [0], "std": [1]}}, r"exclude each other"),
        ({"kind": "window", "window": {"channels": 2, "mean": [0, 0, 0], "std": [1]}}, r"window has 2 channel"),
        ({"kind": "image", "image": {"normalize": "meanstd", "mean": MEAN, "std": [1, 0, 1]}}, r"must all be > 0"),
    ],
)
def test_wrong_preprocess_spec_names_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_preprocess(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "classification", "threshold": 0.2}, r"postprocess\.threshold: applies only to kind 'anomaly'"),
        ({"kind": "anomaly", "top_k": 5}, r"postprocess\.top_k: applies only to kind 'classification'"),
        ({"kind": "anomaly", "score": "output", "error": "mae"}, r"postprocess\.error: applies only to score"),
        ({"kind": "classification", "top_k": 0}, r"postprocess\.top_k: Input should be greater"),
        ({"kind": "anomaly", "threshold": float("nan")}, r"postprocess\.threshold: Input should be a finite"),
        ({"kind": "raw", "labels": []}, r"postprocess\.labels: Extra inputs"),
    ],
)
def test_wrong_postprocess_spec_names_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_postprocess(data)


def test_specs_survive_a_json_round_trip_with_defaults():
    for spec in (
        PostprocessSpec(kind="anomaly", score="reconstruction", threshold=0.1),
        PostprocessSpec(kind="classification", top_k=5, logits=True),
    ):
        assert PostprocessSpec.model_validate_json(spec.model_dump_json()) == spec
    pre = image_spec(resize="letterbox", normalize="meanstd", mean=MEAN, std=STD)
    assert PreprocessSpec.model_validate_json(pre.model_dump_json()) == pre
    assert PreprocessSpec().image_spec.normalize == "unit"  # every field has a default
    for model in (PreprocessSpec, PostprocessSpec):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_float_frames_follow_the_same_formula():
    info = tensor((1, 16, 16, 3), "float32")
    spec = image_spec(normalize="meanstd", mean=MEAN, std=STD)
    frame = bgr(16, 16)
    from_uint8 = Preprocessor(spec, info)(frame)
    from_float = Preprocessor(spec, info)(frame.astype(np.float32))
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-5)
    unit = Preprocessor(image_spec(normalize="unit", input_range=1.0), info)(frame.astype(np.float32) / 255)
    np.testing.assert_allclose(unit[0], frame[:, :, ::-1] / 255, atol=1e-6)
