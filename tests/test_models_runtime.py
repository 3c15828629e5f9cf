"""The inference path on real .tflite models run by the real runtime.

Models come from models/build/test_models.py (committed in tests/data/).
References are written by hand with numpy and cv2, independently of
lepton.models.preprocess.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from lepton.errors import ConfigError, ModelError
from lepton.models.metadata import ModelMetadata, read_metadata, sha256_file
from lepton.models.runner import ModelRunner
from lepton.models.runtime import load_interpreter, runtime_info

DATA = Path(__file__).parent / "data"
WEIGHTS = np.load(DATA / "dense_weights.npz")
IMAGE = {"kind": "image"}
RAW = {"kind": "raw"}


def frame(seed: int = 0, h: int = 90, w: int = 120) -> np.ndarray:
    """A BGR frame with the full 0..255 range, so saturation is exercised."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ref_image(bgr: np.ndarray, hw: tuple[int, int], lo: float, hi: float) -> np.ndarray:
    """Stretch-resize, BGR -> RGB, map 0..255 onto [lo, hi]: float64 (H, W, 3)."""
    resized = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    rgb = resized[:, :, ::-1].astype(np.float64)
    return lo + rgb / 255.0 * (hi - lo)


def ref_quant(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def ref_dense(x_hwc: np.ndarray) -> np.ndarray:
    return x_hwc.reshape(-1) @ WEIGHTS["w"].astype(np.float64) + WEIGHTS["b"]


def test_test_models_match_their_checksums():
    lines = (DATA / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split("  ")) for line in lines if line)
    assert len(sums) >= 8
    for name, digest in sums.items():
        assert sha256_file(DATA / name) == digest, name
        assert (DATA / name).stat().st_size < 200_000


def test_runtime_info_names_the_installed_runtime():
    name, version = runtime_info()
    assert name == "ai-edge-litert"
    assert version == importlib.metadata.version("ai-edge-litert")


def test_metadata_is_read_from_the_file():
    path = DATA / "dense_uint8.tflite"
    meta = read_metadata(path)
    (inp,) = meta.inputs
    assert (inp.shape, inp.dtype, inp.zero_point) == ((1, 12, 16, 3), "uint8", 0)
    assert inp.scale == pytest.approx(1 / 255, rel=1e-3) and inp.quantized
    assert meta.outputs[0].shape == (1, 5) and meta.outputs[0].dtype == "uint8"
    assert meta.size == path.stat().st_size
    assert meta.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # Operator count from an independent FlatBuffer reader (LiteRT's generated schema).
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    expected = sum(model.Subgraphs(i).OperatorsLength() for i in range(model.SubgraphsLength()))
    assert meta.op_count == expected > 0
    assert ModelMetadata.from_json(json.loads(json.dumps(meta.to_json()))) == meta


def test_float_metadata_has_no_quantisation():
    meta = read_metadata(DATA / "detector128_float.tflite")
    assert meta.inputs[0].shape == (1, 128, 128, 3) and not meta.inputs[0].quantized
    assert sorted(o.shape for o in meta.outputs) == [(1, 4), (1, 4, 4)]


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = (DATA / "dense_float.tflite").read_bytes()
    files = {
        "missing": (tmp_path / "missing.tflite", "not found"),
        "empty": (tmp_path / "empty.tflite", "truncated"),
        "garbage": (tmp_path / "garbage.tflite", "not a TFLite model"),
        "truncated": (tmp_path / "truncated.tflite", "truncated or corrupt"),
        "directory": (tmp_path / "dir.tflite", "not a regular file"),
    }
    files["empty"][0].write_bytes(b"")
    files["garbage"][0].write_bytes(b"\x00\x01garbage" * 100)
    files["truncated"][0].write_bytes(good[: len(good) // 3])
    files["directory"][0].mkdir()
    return files


def test_bad_model_files_give_an_error_naming_file_and_cause(tmp_path):
    for label, (path, cause) in _bad_files(tmp_path).items():
        for load in (read_metadata, lambda p: ModelRunner(p, IMAGE, RAW)):
            with pytest.raises(ModelError) as err:
                load(path)
            assert str(path) in str(err.value), label
            assert cause in str(err.value), (label, str(err.value))


def test_missing_delegate_names_the_library():
    with pytest.raises(ModelError, match=r"libedgetpu\.so\.1.*cannot be loaded"):
        load_interpreter(DATA / "dense_float.tflite", delegate="libedgetpu.so.1")


def test_a_library_that_is_not_a_delegate_is_refused():
    with pytest.raises(ModelError, match="not a TFLite delegate"):
        load_interpreter(DATA / "dense_float.tflite", delegate="libm.so.6")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_count_is_a_config_error(threads):
    with pytest.raises(ConfigError, match="num_threads"):
        load_interpreter(DATA / "dense_float.tflite", num_threads=threads)


@pytest.mark.parametrize(
    "model, layout",
    [("dense_float", "nhwc"), ("dense_float_nchw", "nchw")],
)
def test_float_model_matches_numpy_reference(model, layout):
    runner = ModelRunner(DATA / f"{model}.tflite", {"kind": "image", "image": {"layout": layout}}, RAW, num_threads=2)
    for seed in range(3):
        bgr = frame(seed)
        x = ref_image(bgr, (12, 16), 0.0, 1.0)
        tensor = runner.preprocess(bgr)
        expected_tensor = x.transpose(2, 0, 1)[None] if layout == "nchw" else x[None]
        np.testing.assert_allclose(tensor, expected_tensor, atol=1e-6)
        out = runner.invoke(tensor)[0].reshape(-1)
        np.testing.assert_allclose(out, ref_dense(x), atol=1e-4)


@pytest.mark.parametrize(
    "model, normalize, lo",
    [("dense_uint8", "unit", 0.0), ("dense_int8_sym", "symmetric", -1.0)],
)
def test_int8_model_matches_numpy_reference(model, normalize, lo):
    runner = ModelRunner(DATA / f"{model}.tflite", {"kind": "image", "image": {"normalize": normalize}}, RAW)
    inp, out = runner.input, runner.metadata.outputs[0]
    dtype = np.dtype(inp.dtype)
    for seed in range(3):
        x = ref_image(frame(seed), (12, 16), lo, 1.0)
        q = ref_quant(x, inp.scale, inp.zero_point, dtype)
        tensor = runner.preprocess(frame(seed))
        np.testing.assert_array_equal(tensor, q[None])
        raw = runner.invoke(tensor)[0].reshape(-1)
        got = (raw.astype(np.float64) - out.zero_point) * out.scale
        expected = ref_dense((q.astype(np.float64) - inp.zero_point) * inp.scale)
        # int8 weights and a quantised output: within a few output steps.
        np.testing.assert_allclose(got, expected, atol=2.5 * out.scale)


def test_quantisation_uses_each_models_own_input_parameters():
    spec = {"kind": "image", "image": {"normalize": "symmetric"}}
    a = ModelRunner(DATA / "dense_uint8.tflite", spec, RAW)
    b = ModelRunner(DATA / "dense_int8_sym.tflite", spec, RAW)
    assert (a.input.scale, a.input.zero_point) != (b.input.scale, b.input.zero_point)
    x = ref_image(frame(7), (12, 16), -1.0, 1.0)
    ta, tb = a.preprocess(frame(7)), b.preprocess(frame(7))
    assert ta.dtype == np.uint8 and tb.dtype == np.int8
    np.testing.assert_array_equal(ta[0], ref_quant(x, a.input.scale, a.input.zero_point, np.uint8))
    np.testing.assert_array_equal(tb[0], ref_quant(x, b.input.scale, b.input.zero_point, np.int8))
    # uint8 model calibrated on [0, 1]: every negative value saturates at 0.
    assert (ta[0][x < 0] == 0).all()


def test_third_party_float_detector_with_symmetric_input():
    spec = {"kind": "image", "image": {"resize": "letterbox", "normalize": "symmetric"}}
    runner = ModelRunner(DATA / "detector128_float.tflite", spec, RAW)
    bgr = frame(3, 480, 640)
    tensor = runner.preprocess(bgr)
    assert tensor.shape == (1, 128, 128, 3) and tensor.dtype == np.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    geo = runner.preprocessor.letterbox((480, 640))
    assert (geo.top, geo.height) == (16, 96)
    assert (tensor[0, : geo.top] == -1.0).all() and (tensor[0, geo.top + geo.height :] == -1.0).all()
    result, ms = runner.run(bgr)
    assert ms > 0
    outputs = json.loads(json.dumps(result, allow_nan=False))["outputs"]
    assert sorted(np.array(v).shape for v in outputs.values()) == [(1, 4), (1, 4, 4)]
    assert outputs == runner.postprocess(runner.invoke(tensor))["outputs"]


def test_third_party_uint8_classifier():
    runner = ModelRunner(
        DATA / "classifier224_uint8.tflite",
        {"kind": "image", "image": {"normalize": "unit"}},
        {"kind": "classification", "top_k": 4},
        labels=[f"class-{i}" for i in range(10)],
    )
    bgr = frame(5, 480, 640)
    tensor = runner.preprocess(bgr)
    # scale 1/255, zero point 0: the quantised tensor is the RGB pixels themselves.
    expected = cv2.cvtColor(cv2.resize(bgr, (224, 224)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(tensor[0], expected)
    result, _ = runner.run(bgr)
    top = result["top"]
    assert len(top) == 4 and [t["label"] for t in top] == [f"class-{t['index']}" for t in top]
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True)
    out = runner.metadata.outputs[0]
    all_scores = (runner.invoke(tensor)[0].astype(float) - out.zero_point) * out.scale
    assert scores[0] == pytest.approx(all_scores.max())
    assert all_scores.sum() == pytest.approx(1.0, abs=0.05)  # softmax output, dequantised


def test_sensor_fft_autoencoder_reconstruction_score():
    pre = {"kind": "window", "window": {"length": 128, "channels": 3, "standardize": True, "fft": True}}
    post = {"kind": "anomaly", "score": "reconstruction", "threshold": 0.05}
    runner = ModelRunner(DATA / "window_fft_ae.tflite", pre, post)
    window = np.random.default_rng(2).normal(size=(128, 3)).astype(np.float32)
    tensor = runner.preprocess(window)
    z = (window - window.mean(0)) / window.std(0)
    np.testing.assert_allclose(tensor[0], np.abs(np.fft.rfft(z, axis=0)) / 128, atol=1e-5)
    result, _ = runner.run(window)
    expected = float(np.mean((runner.invoke(tensor)[0] - tensor) ** 2))
    assert result["score"] == pytest.approx(expected, rel=1e-5)
    assert result["anomaly"] is (expected > 0.05) and result["threshold"] == 0.05


def test_sensor_int8_score_model_uses_its_input_quantisation():
    pre = {"kind": "window", "window": {"length": 128, "channels": 3}}
    runner = ModelRunner(DATA / "window_score_int8.tflite", pre, {"kind": "anomaly", "threshold": 0.9})
    window = np.random.default_rng(4).normal(0, 2, size=(200, 3))
    inp = runner.input
    expected = ref_quant(window[-128:], inp.scale, inp.zero_point, np.uint8)
    np.testing.assert_array_equal(runner.preprocess(window)[0], expected)
    result, _ = runner.run(window)
    out = runner.metadata.outputs[0]
    raw = runner.invoke(runner.preprocess(window))[0]
    assert result["score"] == pytest.approx((float(raw.max()) - out.zero_point) * out.scale)
    assert 0.0 <= result["score"] <= 1.0


def test_spec_that_cannot_feed_the_model_is_refused():
    cases = [
        ("dense_float", {"kind": "window", "window": {"length": 128}}, RAW, "preprocess.window"),
        ("window_fft_ae", IMAGE, RAW, "preprocess.kind is 'image'"),
        ("dense_float", {"kind": "image", "image": {"color": "gray"}}, RAW, "preprocess.image.color"),
        ("dense_float", {"kind": "image", "image": {"layout": "nchw"}}, RAW, "layout 'nchw'"),
        ("window_fft_ae", {"kind": "window", "window": {"length": 128}}, RAW, r"\(128, 3\) features"),
        ("dense_float", IMAGE, {"kind": "classification", "output": 2}, "postprocess.output"),
        ("dense_float", IMAGE, {"kind": "anomaly", "score": "reconstruction"}, "does not match input"),
        ("dense_float", {"kind": "image", "imgae": {}}, RAW, "preprocess.imgae"),
    ]
    for model, pre, post, message in cases:
        with pytest.raises((ModelError, ConfigError), match=message):
            ModelRunner(DATA / f"{model}.tflite", pre, post)


def test_invoke_refuses_a_tensor_of_the_wrong_shape_or_dtype():
    runner = ModelRunner(DATA / "dense_uint8.tflite", IMAGE, RAW)
    with pytest.raises(ModelError, match=r"uint8 \(1, 12, 16, 3\)"):
        runner.invoke(np.zeros((1, 12, 16, 3), np.float32))
    with pytest.raises(ModelError, match="model takes"):
        runner.invoke(np.zeros((1, 16, 12, 3), np.uint8))


def test_invoke_is_thread_safe_and_returns_copies():
    runner = ModelRunner(DATA / "dense_float.tflite", IMAGE, RAW)
    tensors = [runner.preprocess(frame(seed)) for seed in range(4)]
    expected = [runner.invoke(t)[0].copy() for t in tensors]
    first = runner.invoke(tensors[0])[0]
    runner.invoke(tensors[1])
    np.testing.assert_array_equal(first, expected[0])  # not overwritten by the next invoke
    failures = []

    def work(i: int) -> None:
        for _ in range(200):
            if not np.array_equal(runner.invoke(tensors[i])[0], expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,), name=f"invoke-{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_warmup_reports_a_median_invoke_time():
    runner = ModelRunner(DATA / "classifier224_uint8.tflite", IMAGE, {"kind": "classification"})
    ms = runner.warmup(3)
    assert 0 < ms < 1000 and runner.last_invoke_ms > 0
    with pytest.raises(ValueError):
        runner.warmup(0)


def test_from_entry_uses_the_manifest_and_refuses_a_swapped_file(tmp_path):
    path = DATA / "dense_float.tflite"
    manifest = SimpleNamespace(
        name="dense", version="1.2.0", sha256=sha256_file(path), labels=list("abcde"),
        preprocess={"kind": "image"}, postprocess={"kind": "classification", "top_k": 1, "logits": True},
    )
    runner = ModelRunner.from_entry(SimpleNamespace(manifest=manifest, path=path))
    assert (runner.name, runner.version, runner.sha256) == ("dense", "1.2.0", manifest.sha256)
    result, _ = runner.run(frame(0))
    assert result["top"][0]["label"] in "abcde"
    swapped = tmp_path / "model.tflite"
    swapped.write_bytes((DATA / "dense_float_nchw.tflite").read_bytes())
    with pytest.raises(ModelError, match="does not match manifest dense 1.2.0"):
        ModelRunner.from_entry(SimpleNamespace(manifest=manifest, path=swapped))
