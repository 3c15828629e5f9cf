"""Postprocessing: top-k, anomaly verdicts and raw tensors, as a subscriber reads them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.errors import ModelError
from lepton.models.metadata import TensorInfo
from lepton.models.postprocess import Postprocessor
from lepton.models.spec import parse_postprocess


def tensor(shape, dtype="float32", scale=0.0, zero_point=0, name="out", index=0) -> TensorInfo:
    return TensorInfo(index=index, name=name, shape=tuple(shape), dtype=dtype, scale=scale, zero_point=zero_point)


def post(spec: dict, outputs, labels=(), input=None) -> Postprocessor:  # noqa: A002
    return Postprocessor(parse_postprocess(spec), tuple(outputs), labels, input=input)


def as_json(result: dict) -> dict:
    """What a subscriber receives: strict JSON (no NaN)."""
    return json.loads(json.dumps(result, allow_nan=False))


def test_top_k_dequantises_with_the_tensors_own_parameters():
    out = tensor((1, 4), "uint8", scale=0.5, zero_point=10)
    raw = np.array([[10, 14, 30, 12]], dtype=np.uint8)  # reals 0, 2, 10, 1
    result = as_json(post({"kind": "classification", "top_k": 2}, [out], labels=["a", "b", "c", "d"])([raw]))
    assert result == {"top": [{"label": "c", "index": 2, "score": 10.0}, {"label": "b", "index": 1, "score": 2.0}]}


def test_softmax_only_when_the_spec_says_logits():
    out = tensor((1, 3))
    logits = np.array([[2.0, 1.0, 0.1]], dtype=np.float32)
    plain = post({"kind": "classification", "top_k": 3}, [out])([logits])
    assert [t["score"] for t in plain["top"]] == pytest.approx([2.0, 1.0, 0.1])
    soft = post({"kind": "classification", "top_k": 3, "logits": True}, [out])([logits])
    expected = np.exp([2.0, 1.0, 0.1]) / np.exp([2.0, 1.0, 0.1]).sum()
    assert [t["score"] for t in soft["top"]] == pytest.approx(expected.tolist())


def test_top_k_on_many_classes_and_missing_labels():
    scores = np.random.default_rng(0).random((1, 1000)).astype(np.float32)
    result = post({"kind": "classification", "top_k": 5}, [tensor((1, 1000))], labels=["x"] * 10)([scores])
    assert [t["index"] for t in result["top"]] == np.argsort(-scores[0])[:5].tolist()
    assert all(t["label"] == str(t["index"]) for t in result["top"])  # beyond the label list: the index
    small = post({"kind": "classification", "top_k": 9}, [tensor((1, 2))])([np.array([[0.2, 0.8]], np.float32)])
    assert [t["index"] for t in small["top"]] == [1, 0]


def test_non_finite_scores_are_reported_not_sent():
    scores = np.array([[np.nan, 0.3, np.inf]], dtype=np.float32)
    result = as_json(post({"kind": "classification"}, [tensor((1, 3))])([scores]))
    assert result["nonfinite"] == 2 and result["top"][0] == {"label": "1", "index": 1, "score": pytest.approx(0.3)}


def test_anomaly_score_tensor_and_threshold():
    out = tensor((1, 1), "uint8", scale=1 / 256, zero_point=0)
    p = post({"kind": "anomaly", "threshold": 0.5}, [out])
    assert as_json(p([np.array([[192]], np.uint8)])) == {"score": 0.75, "threshold": 0.5, "anomaly": True}
    assert p([np.array([[64]], np.uint8)])["anomaly"] is False


def test_anomaly_reconstruction_error_on_quantised_tensors():
    inp = tensor((1, 4), "int8", scale=0.1, zero_point=2, name="in")
    out = tensor((1, 4), "int8", scale=0.2, zero_point=-1)
    model_input = np.array([[2, 12, -8, 2]], np.int8)  # reals 0, 1, -1, 0
    rebuilt = np.array([[-1, 4, -6, 0]], np.int8)  # reals 0, 1, -1, 0.2
    mse = post({"kind": "anomaly", "score": "reconstruction", "threshold": 0.005}, [out], input=inp)
    result = mse([rebuilt], model_input)
    assert result["score"] == pytest.approx(0.04 / 4) and result["anomaly"] is True
    mae = post({"kind": "anomaly", "score": "reconstruction", "error": "mae"}, [out], input=inp)
    assert mae([rebuilt], model_input)["score"] == pytest.approx(0.2 / 4)
    with pytest.raises(ModelError, match="needs the model input"):
        mse([rebuilt])


def test_raw_outputs_are_dequantised_lists_keyed_by_name():
    outs = [tensor((1, 2), "int8", 0.5, 1, name="boxes"), tensor((1, 2), "int32", name="classes", index=1)]
    raw = [np.array([[3, -1]], np.int8), np.array([[7, 2]], np.int32)]
    result = as_json(post({"kind": "raw"}, outs)(raw))
    assert result == {"outputs": {"boxes": [[1.0, -1.0]], "classes": [[7, 2]]}}


def test_specs_that_cannot_read_the_outputs_are_refused():
    with pytest.raises(ModelError, match="postprocess.output is 1 but the model has 1 output"):
        post({"kind": "classification", "output": 1}, [tensor((1, 3))])
    with pytest.raises(ModelError, match="does not match input"):
        post({"kind": "anomaly", "score": "reconstruction"}, [tensor((1, 3))], input=tensor((1, 4), name="in"))
    with pytest.raises(ModelError, match="got 2 output tensor"):
        post({"kind": "raw"}, [tensor((1, 3))])([np.zeros((1, 3)), np.zeros((1, 3))])
