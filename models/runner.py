"""One loaded model: preprocess, invoke (thread-safe), postprocess."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lepton.errors import ModelError
from lepton.models.metadata import ModelMetadata, TensorInfo, read_metadata
from lepton.models.postprocess import Postprocessor
from lepton.models.preprocess import Preprocessor
from lepton.models.runtime import load_interpreter
from lepton.models.spec import PostprocessSpec, PreprocessSpec, parse_postprocess, parse_preprocess

log = logging.getLogger(__name__)


class ModelRunner:
    """A model ready to serve: its interpreter, metadata, pre- and post-processing.

    ``invoke`` holds a lock around the interpreter (one TFLite interpreter
    must not run on two threads at once) and returns copies of the outputs,
    so callers on several threads may share one runner.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        preprocess: PreprocessSpec | dict,
        postprocess: PostprocessSpec | dict,
        labels: Sequence[str] = (),
        num_threads: int = 1,
        delegate: str | None = None,
        name: str = "",
        version: str = "",
        expected_sha256: str | None = None,
    ):
        self.path = Path(model_path)
        self.name = name or self.path.stem
        self.version = version
        self._interpreter = load_interpreter(self.path, num_threads=num_threads, delegate=delegate)
        self.metadata: ModelMetadata = read_metadata(self.path, interpreter=self._interpreter)
        self.sha256 = self.metadata.sha256
        if expected_sha256 and expected_sha256 != self.sha256:
            # The registry verified the file earlier; this catches a swap since then.
            raise ModelError(
                f"model file {self.path}: sha256 {self.sha256} does not match manifest {self.name} "
                f"{self.version} ({expected_sha256})"
            )
        if len(self.metadata.inputs) != 1:
            raise ModelError(f"model file {self.path}: has {len(self.metadata.inputs)} inputs; one is supported")
        self.input: TensorInfo = self.metadata.inputs[0]
        self._dtype = np.dtype(self.input.dtype)
        self._pre = Preprocessor(parse_preprocess(preprocess), self.input)
        self._post = Postprocessor(parse_postprocess(postprocess), self.metadata.outputs, labels, input=self.input)
        self._lock = threading.Lock()
        self.last_invoke_ms = 0.0

    @classmethod
    def from_entry(cls, entry: Any, num_threads: int = 1, delegate: str | None = None) -> "ModelRunner":
        """A runner for a registry Entry (manifest + path); ModelError if the file is not the manifest's."""
        manifest = entry.manifest
        return cls(
            entry.path,
            manifest.preprocess,
            manifest.postprocess,
            labels=list(manifest.labels or ()),
            num_threads=num_threads,
            delegate=delegate,
            name=manifest.name,
            version=manifest.version,
            expected_sha256=manifest.sha256,
        )

    @property
    def preprocessor(self) -> Preprocessor:
        """The Preprocessor (e.g. for letterbox geometry)."""
        return self._pre

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """Frame or window -> input tensor (batched, the input's dtype, quantised)."""
        return self._pre(frame)

    def _check(self, tensor: np.ndarray) -> np.ndarray:
        # Offloaded inputs arrive from other devices: refuse what does not fit.
        tensor = np.asarray(tensor)
        if tensor.shape != self.input.shape or tensor.dtype != self._dtype:
            raise ModelError(
                f"input for {self.name}: got {tensor.dtype} {tensor.shape}, "
                f"model takes {self.input.dtype} {self.input.shape}"
            )
        return tensor

    def _invoke_timed(self, tensor: np.ndarray) -> tuple[list[np.ndarray], float]:
        tensor = self._check(tensor)
        with self._lock:
            self._interpreter.set_tensor(self.input.index, tensor)
            start = time.perf_counter()
            self._interpreter.invoke()
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            # get_tensor returns a copy, so the next invoke cannot change these.
            outputs = [self._interpreter.get_tensor(o.index) for o in self.metadata.outputs]
        self.last_invoke_ms = elapsed_ms
        return outputs, elapsed_ms

    def invoke(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the model on an input tensor; thread-safe; returns copies of the outputs."""
        return self._invoke_timed(tensor)[0]

    def postprocess(self, outputs: list[np.ndarray], model_input: np.ndarray | None = None) -> dict:
        """Output tensors -> result dict (JSON-serialisable, finite floats)."""
        return self._post(outputs, model_input)

    def run(self, frame: np.ndarray) -> tuple[dict, float]:
        """Preprocess, invoke, postprocess: (result dict, invoke ms)."""
        tensor = self.preprocess(frame)
        outputs, elapsed_ms = self._invoke_timed(tensor)
        return self.postprocess(outputs, tensor), elapsed_ms

    def warmup(self, n: int = 5) -> float:
        """Invoke ``n`` times on a neutral input (the zero point); median invoke ms."""
        if n < 1:
            raise ValueError(f"warmup needs n >= 1, got {n}")
        tensor = np.full(self.input.shape, self.input.zero_point, dtype=self._dtype)
        times = [self._invoke_timed(tensor)[1] for _ in range(n)]
        median = statistics.median(times)
        log.debug("warmed up %s %s: median invoke %.3f ms over %d", self.name, self.version, median, n)
        return median
