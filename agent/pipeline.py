"""One stream: source -> preprocess -> invoke -> postprocess -> result -> outbox.

Each stream runs ``workers`` named threads. A worker takes the newest frame
its stream has not taken yet (a slow model drops frames at the source, never
builds a backlog), runs the model (``invoke`` releases the GIL), builds the
Result and hands it to delivery, which numbers, commits and publishes it. The
frame's ``meta`` (e.g. ``{"truth": 3}``) travels in ``output["source"]`` so a
consumer can check labels.

Workers report a heartbeat; a worker busy on one frame for ``stall_s`` makes
the pipeline unhealthy, which stops the systemd watchdog pings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from lepton.agent.config import StreamConfig
from lepton.agent.outbox import Pending
from lepton.errors import LeptonError
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

TAKE_TIMEOUT_S = 0.25  # how long a worker waits for a frame before looking at the stop event
ERROR_LOG_EVERY_S = 30.0


class Window:
    """Values over the last *window_s* seconds (thread-safe), for percentiles and rates."""

    def __init__(self, window_s: float, maxlen: int = 4096) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.total = 0

    def add(self, value: float, t: float | None = None) -> None:
        with self._lock:
            self._items.append((time.monotonic() if t is None else t, value))
            self.total += 1

    def values(self) -> list[float]:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            return [v for t, v in self._items if t >= cutoff]

    def rate(self) -> float:
        """Items per second over the window (over the span seen, when shorter)."""
        now = time.monotonic()
        with self._lock:
            times = [t for t, _ in self._items if t >= now - self.window_s]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6)


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p95) of *values*; (0, 0) when empty."""
    if not values:
        return 0.0, 0.0
    p50, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
    return float(p50), float(p95)


def plain(value: Any, depth: int = 0) -> Any:
    """*value* with numpy scalars and arrays as plain JSON types (source meta may hold them)."""
    if depth > 8:
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), depth + 1)
    if isinstance(value, np.generic):
        return value.item()
    return value


class StreamPipeline:
    """Workers that turn one source's frames into results for one model."""

    def __init__(self, cfg: StreamConfig, device: str, topics: Topics, source: Any, runner: Any,
                 submit: Callable[[Pending], None], timings: Callable[[str], Window], workers: int = 1,
                 stall_s: float = 30.0, window_s: float = 60.0) -> None:
        self.cfg, self.device, self.source = cfg, device, source
        self.topic = topics.result(device, cfg.id)
        self.submit, self.timings = submit, timings
        self.workers, self.stall_s = workers, stall_s
        self.results = Window(window_s)
        self.errors = 0
        self._runner = runner
        self._model_id = self._model_of(runner)
        self._take = threading.Lock()
        self._last_seq = 0
        self._busy: list[float | None] = [None] * workers  # monotonic start of the frame in hand
        self._threads: list[threading.Thread] = []
        self._error_logged: dict[str, float] = {}

    @staticmethod
    def _model_of(runner: Any) -> m.ModelId:
        return m.ModelId(name=runner.name, version=runner.version or "0", sha256=runner.sha256)

    @property
    def runner(self) -> Any:
        """The model runner serving this stream now."""
        return self._runner

    def swap_model(self, runner: Any) -> None:
        """Serve the stream with *runner* from the next frame on (a loaded, warmed-up ModelRunner)."""
        self._runner, self._model_id = runner, self._model_of(runner)
        log.info("stream %s now runs %s %s", self.cfg.id, runner.name, runner.version)

    # --- lifecycle ---------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, args=(index, stop), name=f"stream-{self.cfg.id}-{index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        """Wait for the workers to finish their frame in hand; False if one did not."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def healthy(self, now: float | None = None) -> bool:
        """True while every worker is alive and none has been busy on one frame for ``stall_s``."""
        now = time.monotonic() if now is None else now
        if any(not t.is_alive() for t in self._threads):
            return False
        return all(since is None or now - since < self.stall_s for since in self._busy)

    # --- the worker ---------------------------------------------------------------
    def _next_frame(self):
        with self._take:
            frame = self.source.latest(self._last_seq, TAKE_TIMEOUT_S)
            if frame is not None:
                self._last_seq = frame.seq
            return frame

    def _work(self, index: int, stop: threading.Event) -> None:
        while not stop.is_set():
            frame = self._next_frame()
            if frame is None:
                continue
            self._busy[index] = time.monotonic()
            try:
                self._process(frame)
            except (LeptonError, ValueError, TypeError, ArithmeticError) as exc:
                self._failed(exc)
            except Exception as exc:  # a worker must outlive one bad frame
                log.exception("stream %s: frame %d failed", self.cfg.id, frame.seq)
                self._failed(exc, logged=True)
            finally:
                self._busy[index] = None

    def _process(self, frame) -> None:
        runner, model_id = self._runner, self._model_id
        output, infer_ms = runner.run(frame.data)
        now = time.time()
        self.timings(runner.name).add(infer_ms)
        if frame.meta:
            output = {**output, "source": plain(frame.meta)}
        deadline = frame.captured_at + self.cfg.deadline_s if self.cfg.deadline_s else None
        result = m.Result(device=self.device, stream=self.cfg.id, seq=1, floor=1, model=model_id,
                          captured_at=frame.captured_at, inferred_at=now, infer_ms=infer_ms,
                          computed_on=self.device, deadline=deadline, output=output)

        def build(seq: int, floor: int) -> bytes:
            return encode(result.model_copy(update={"seq": seq, "floor": floor}))

        self.submit(Pending(self.cfg.id, self.topic, build, deadline))
        self.results.add(infer_ms)

    def _failed(self, exc: BaseException, logged: bool = False) -> None:
        self.errors += 1
        reason = str(exc) or type(exc).__name__
        now = time.monotonic()
        if not logged and now - self._error_logged.get(reason, -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
            self._error_logged[reason] = now
            log.error("stream %s: a frame failed with model %s: %s (%d failure(s) so far)",
                      self.cfg.id, self._runner.name, reason, self.errors)

    def stats(self) -> dict:
        """Results, failures and the measured rate (Hz)."""
        return {"results": self.results.total, "errors": self.errors, "rate_hz": self.results.rate()}
