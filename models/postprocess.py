"""A model's raw output tensors -> a JSON-ready result, driven by PostprocessSpec.

Every float in a result is finite: a non-finite value (a broken model)
becomes 0.0 and is counted in ``"nonfinite"`` so it is visible, never NaN on
the wire (the protocol refuses NaN).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from lepton.errors import ModelError
from lepton.models.metadata import TensorInfo
from lepton.models.preprocess import dequantize
from lepton.models.spec import PostprocessSpec

log = logging.getLogger(__name__)


def _finite(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(values with non-finite entries set to 0, how many there were)."""
    bad = ~np.isfinite(values)
    count = int(bad.sum())
    if count:
        values = np.where(bad, 0.0, values).astype(np.float32)
    return values, count


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=-1, keepdims=True)


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the *k* largest of *values* (1-D, no NaN), largest first; equal values by lowest index,
    so the same output always ranks the same (ties are common in an 8-bit output). O(n) plus k log k."""
    n = values.size
    if k >= n:
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    best = np.concatenate([above, np.flatnonzero(values == kth)[: k - above.size]])
    return best[np.argsort(-values[best], kind="stable")]


class Postprocessor:
    """Turns output tensors into ``{"top": ...}``, ``{"score": ...}`` or ``{"outputs": ...}``.

    ``input`` (the model's input tensor) is needed for a reconstruction score
    of a quantised model, to dequantise the model input. A spec that cannot
    read these outputs raises ModelError at construction, naming the field.
    """

    def __init__(
        self,
        spec: PostprocessSpec,
        outputs: tuple[TensorInfo, ...],
        labels: Sequence[str] = (),
        input: TensorInfo | None = None,  # noqa: A002 - mirrors Preprocessor
    ):
        self.spec = spec
        self.outputs = tuple(outputs)
        self.labels = [str(label) for label in labels]
        self.input = input
        self._warned = False
        if not self.outputs:
            raise ModelError("the model has no output tensor")
        uses_output = spec.kind == "classification" or (spec.kind == "anomaly" and spec.score == "output")
        if uses_output and spec.output >= len(self.outputs):
            raise ModelError(f"postprocess.output is {spec.output} but the model has {len(self.outputs)} output(s)")
        if spec.kind == "anomaly" and spec.score == "reconstruction":
            self._check_reconstruction()
        self._table = self._dequantize_table() if spec.kind == "classification" else None

    def _dequantize_table(self) -> tuple[np.ndarray, np.ndarray] | None:
        """For an 8-bit quantised classification output: its dequantised float32 value per byte pattern
        (indexed by the tensor viewed as uint8). Top-k then works on the raw bytes, which can hold no
        NaN and order like the reals (scale > 0), and dequantises only what it reports."""
        info = self.outputs[self.spec.output]
        dtype = np.dtype(info.dtype)
        if not info.quantized or dtype not in (np.dtype(np.uint8), np.dtype(np.int8)) or not info.scale > 0:
            return None
        reals = dequantize(np.arange(256, dtype=np.uint8).view(dtype), info)
        return reals, reals.astype(np.float64)

    def _check_reconstruction(self) -> None:
        out = self.outputs[0]
        if self.input is None:
            if out.quantized:
                raise ModelError("postprocess.score 'reconstruction' of a quantised model needs the input tensor")
            return
        if int(np.prod(self.input.shape)) != int(np.prod(out.shape)):
            raise ModelError(
                f"postprocess.score is 'reconstruction' but output '{out.name}' {out.shape} "
                f"does not match input '{self.input.name}' {self.input.shape}"
            )

    def __call__(self, raw: list[np.ndarray], model_input: np.ndarray | None = None) -> dict[str, Any]:
        """The result dict for one inference (JSON-serialisable, finite floats)."""
        if len(raw) != len(self.outputs):
            raise ModelError(f"got {len(raw)} output tensor(s), the model has {len(self.outputs)}")
        if self.spec.kind == "classification":
            return self._classification(raw)
        if self.spec.kind == "anomaly":
            return self._anomaly(raw, model_input)
        return self._raw(raw)

    def _classification(self, raw: list[np.ndarray]) -> dict[str, Any]:
        index = self.spec.output
        values = raw[index]
        if self._table is not None and values.dtype == self.outputs[index].dtype and values.size:
            return self._classification_8bit(values.reshape(-1))
        scores, bad = _finite(dequantize(raw[index], self.outputs[index]).reshape(-1))
        if self.spec.logits:
            scores = softmax(scores.astype(np.float64))
        best = top_k(scores, min(self.spec.top_k, scores.size))
        top = [{"label": self._label(int(i)), "index": int(i), "score": float(scores[i])} for i in best]
        return self._with_count({"top": top}, bad)

    def _classification_8bit(self, codes: np.ndarray) -> dict[str, Any]:
        """``_classification`` for an 8-bit quantised output, with the same scores, in fewer numpy calls."""
        table, table64 = self._table
        best = top_k(codes.astype(np.int16), min(self.spec.top_k, codes.size))  # codes order like the reals
        byte = codes.view(np.uint8)
        reals = table[byte[best]]  # float32, exactly what dequantize() gives
        if self.spec.logits:
            # The softmax denominator per code (256 exps), not per class: codes above the peak are absent.
            shifted = np.minimum(table64 - table64[byte[best[0]]], 0.0)
            weights = np.exp(shifted)
            scores = weights[byte[best]] / np.bincount(byte, minlength=256).dot(weights)
        else:
            scores = reals
        labels, n = self.labels, len(self.labels)
        return {"top": [{"label": labels[i] if i < n else str(i), "index": i, "score": score}
                        for i, score in zip(best.tolist(), scores.tolist())]}

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)

    def _anomaly(self, raw: list[np.ndarray], model_input: np.ndarray | None) -> dict[str, Any]:
        if self.spec.score == "output":
            index = self.spec.output
            values, bad = _finite(dequantize(raw[index], self.outputs[index]).reshape(-1))
            score = float(values.max()) if values.size else 0.0
        else:
            if model_input is None:
                raise ModelError("postprocess.score 'reconstruction' needs the model input")
            given = dequantize(model_input, self.input) if self.input is not None else model_input.astype(np.float32)
            rebuilt = dequantize(raw[0], self.outputs[0])
            diff = given.reshape(-1).astype(np.float64) - rebuilt.reshape(-1).astype(np.float64)
            error = np.mean(diff * diff) if self.spec.error == "mse" else np.mean(np.abs(diff))
            bad = 0 if np.isfinite(error) else 1
            score = float(error) if not bad else 0.0
        result = {"score": score, "threshold": float(self.spec.threshold), "anomaly": bool(score > self.spec.threshold)}
        return self._with_count(result, bad)

    def _raw(self, raw: list[np.ndarray]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        total = 0
        for info, values in zip(self.outputs, raw):
            real = np.asarray(values)
            if info.quantized or real.dtype.kind == "f":
                real, bad = _finite(dequantize(real, info))
                total += bad
            outputs[info.name] = real.tolist()  # integer tensors (class ids, counts) stay integers
        return self._with_count({"outputs": outputs}, total)

    def _with_count(self, result: dict[str, Any], bad: int) -> dict[str, Any]:
        if bad:
            if not self._warned:  # once: a broken model would otherwise flood the journal
                log.warning("model output had %d non-finite value(s); reported as 0.0", bad)
                self._warned = True
            result["nonfinite"] = bad
        return result
