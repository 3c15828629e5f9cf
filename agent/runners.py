"""A loaded model as the agent uses it: a ModelRunner, plus the demo's emulated slowdown.

``runtime.slowdown`` (>= 1) emulates a slower CPU on one machine: each invoke
takes ``slowdown`` x the median of this host's recent invoke times (the
invoke, then a pause outside the interpreter lock), and the invoke time it
reports is that, so the planner sees the device as the slow one it stands for.
The median, not the invoke's own duration: one invoke slowed by the host's
other work would otherwise be multiplied too (at a slowdown of 400, a 1 ms
stall of the host became a device 400 ms slower than it stands for, and the
planner moved its streams on it).
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any

import numpy as np

from lepton.agent.pipeline import model_json
from lepton.protocol import messages as m


HOST_WINDOW = 15  # recent host invoke times whose median an emulated slow device scales


class Runner:
    """Preprocess, invoke (slowed down if configured), postprocess; delegates the rest to the ModelRunner."""

    def __init__(self, inner: Any, slowdown: float = 1.0, entry: Any = None) -> None:
        self.inner, self.slowdown, self.entry = inner, max(1.0, float(slowdown)), entry
        self._host_ms: collections.deque[float] = collections.deque(maxlen=HOST_WINDOW)
        self.name, self.version, self.sha256 = inner.name, inner.version, inner.sha256
        self.input = inner.input
        self.model_id = m.ModelId(name=self.name, version=self.version or "0", sha256=self.sha256)
        self.model_json = model_json(self.model_id)  # spliced into every result's JSON

    @property
    def preprocessor(self) -> Any:
        """The Preprocessor alone (kept to feed offloaded streams once the model is unloaded)."""
        return self.inner.preprocessor

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        return self.inner.preprocess(frame)

    def infer(self, tensor: np.ndarray) -> tuple[list[np.ndarray], float]:
        """Invoke on an input tensor: (outputs, invoke ms including the emulated slowdown)."""
        timed = getattr(self.inner, "_invoke_timed", None)
        if timed is not None:
            outputs, ms = timed(tensor)
        else:
            start = time.perf_counter()
            outputs = self.inner.invoke(tensor)
            ms = (time.perf_counter() - start) * 1000.0
        if self.slowdown > 1.0:
            self._host_ms.append(ms)
            emulated = self.slowdown * statistics.median(self._host_ms)
            time.sleep(max(0.0, emulated - ms) / 1000.0)
            ms = max(ms, emulated)
        return outputs, ms

    def postprocess(self, outputs: list[np.ndarray], tensor: np.ndarray | None = None) -> dict:
        return self.inner.postprocess(outputs, tensor)

    def run_tensor(self, tensor: np.ndarray) -> tuple[dict, float]:
        """Invoke and postprocess a preprocessed input: (output dict, invoke ms)."""
        outputs, ms = self.infer(tensor)
        return self.postprocess(outputs, tensor), ms

    def run(self, frame: np.ndarray) -> tuple[dict, float]:
        """Preprocess, invoke, postprocess: (output dict, invoke ms)."""
        return self.run_tensor(self.preprocess(frame))

    def warmup(self, n: int = 5) -> float:
        """Invoke *n* times on a neutral input; the median invoke ms (slowdown included)."""
        info = self.input
        tensor = np.full(info.shape, info.zero_point, dtype=np.dtype(info.dtype))
        return statistics.median(self.infer(tensor)[1] for _ in range(max(1, n)))
