"""One stream: source -> preprocess -> invoke (here or offloaded) -> postprocess -> result -> outbox.

Each stream runs ``workers`` named threads. A worker takes the newest frame
its stream has not taken yet (a slow model drops frames at the source, never
builds a backlog), runs the model (``invoke`` releases the GIL), builds the
Result and hands it to delivery, which numbers, commits and publishes it. The
frame's ``meta`` (e.g. ``{"truth": 3}``) travels in ``output["source"]``, with
the frame's number as ``frame``, so a consumer can check labels and losses.

Where a frame is computed is the stream's ``StreamPlan``: the local runner
(if this device holds the model) and the routes of the latest placement. A
routed frame is preprocessed here and sent to its target (``offload.py``);
the reply becomes the result (``computed_on`` the target, ``rtt_ms``
measured); a failed offload falls back to the local runner when there is
one, else it is counted in ``offload_failed``. ``set_plan`` replaces the plan
in one assignment and each frame reads it once, so a frame is processed
entirely under one plan: no result comes from a half-switched stream.

Workers report a heartbeat; a worker busy on one frame for ``stall_s`` makes
the pipeline unhealthy, which stops the systemd watchdog pings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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


def as_runner(runner: Any) -> Any:
    """The agent's Runner for *runner* (a bare ModelRunner is wrapped, without slowdown)."""
    from lepton.agent.runners import Runner

    return runner if runner is None or hasattr(runner, "run_tensor") else Runner(runner)


@dataclass(frozen=True)
class StreamPlan:
    """How a stream's frames are computed now: the local runner and the placement's routes."""

    runner: Any | None  # the Runner of the stream's model here; None when it is not held
    pre: Callable[[np.ndarray], np.ndarray]  # preprocessing (kept when the model is unloaded)
    input: Any  # the model's input TensorInfo (payload size)
    version: str  # the model version the preprocessing comes from
    router: Any | None = None  # None: every frame here

    def pick(self, device: str) -> str | None:
        """Where the next frame goes: this device, another one, or None (nowhere)."""
        if self.router is None:
            return device if self.runner is not None else None
        return self.router.pick()


class StreamPipeline:
    """Workers that turn one source's frames into results for one model."""

    def __init__(self, cfg: StreamConfig, device: str, topics: Topics, source: Any, runner: Any,
                 submit: Callable[[Pending], None], timings: Callable[[str], Window], workers: int = 1,
                 stall_s: float = 30.0, window_s: float = 60.0, offload: Any = None) -> None:
        self.cfg, self.device, self.source = cfg, device, source
        self.topic = topics.result(device, cfg.id)
        self.submit, self.timings = submit, timings
        self.workers, self.stall_s = workers, stall_s
        self.offload = offload  # the OffloadClient, when frames may be routed elsewhere
        self.results = Window(window_s)
        self.errors = 0
        self.offloaded = 0  # results computed on another device
        self.offload_failed = 0  # frames neither computed elsewhere nor here
        self.unserved = 0  # frames skipped: routed nowhere and the model is not held here
        runner = as_runner(runner)
        self._plan = StreamPlan(runner, runner.preprocess, runner.input, runner.version)
        self._routes: list[tuple[str, float]] | None = None
        self._take = threading.Lock()
        self._last_seq = 0
        self._busy: list[float | None] = [None] * workers  # monotonic start of the frame in hand
        self._threads: list[threading.Thread] = []
        self._error_logged: dict[str, float] = {}

    @property
    def runner(self) -> Any:
        """The local Runner serving this stream now (None when the model is not held here)."""
        return self._plan.runner

    @property
    def plan(self) -> StreamPlan:
        return self._plan

    def swap_model(self, runner: Any) -> None:
        """Serve the stream with *runner* from the next frame on, keeping its routes."""
        self.set_plan(runner, self._routes)

    def set_plan(self, runner: Any | None, routes: list[tuple[str, float]] | None) -> None:
        """From the next frame on: *runner* here (None: the model is not held), frames split over *routes*.

        *routes* None or [] (no placement, or the plan serves it nowhere):
        frames run here if the model is held, else they are skipped and
        counted. A route to this device is dropped when the model is not
        held here; shares are relative to the routes that remain.
        """
        from lepton.agent.offload import Router

        runner = as_runner(runner)
        old = self._plan
        pre, info, version = (runner.preprocess, runner.input, runner.version) if runner else (old.pre, old.input, old.version)
        usable = [(d, s) for d, s in routes or []
                  if (runner is not None if d == self.device else self.offload is not None)]
        router = Router(usable) if any(d != self.device for d, _ in usable) else None
        self._routes = routes
        self._plan = StreamPlan(runner, pre, info, version, router)  # one assignment: the switch
        where = ", ".join(f"{d} {s:.2f}" for d, s in routes) if routes else ("here" if runner else "nowhere")
        log.info("stream %s: %s %s, served %s", self.cfg.id, self.cfg.model,
                 runner.version if runner else "not held here", where)

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
    def _next_frame(self) -> tuple[Any, StreamPlan]:
        """The next frame and the plan it is processed under, taken together: frames and plans stay in order."""
        with self._take:
            frame = self.source.latest(self._last_seq, TAKE_TIMEOUT_S)
            if frame is not None:
                self._last_seq = frame.seq
            return frame, self._plan

    def _work(self, index: int, stop: threading.Event) -> None:
        while not stop.is_set():
            frame, plan = self._next_frame()
            if frame is None:
                continue
            self._busy[index] = time.monotonic()
            try:
                self._process(frame, plan)
            except (LeptonError, ValueError, TypeError, ArithmeticError) as exc:
                self._failed(exc)
            except Exception as exc:  # a worker must outlive one bad frame
                log.exception("stream %s: frame %d failed", self.cfg.id, frame.seq)
                self._failed(exc, logged=True)
            finally:
                self._busy[index] = None

    def _process(self, frame, plan: StreamPlan) -> None:
        target = plan.pick(self.device)
        if target is None:
            self.unserved += 1
            self._note("no device serves it and its model is not held here")
            return
        if target == self.device:
            self._local(frame, plan.runner)
            return
        tensor = plan.pre(frame.data)

        def answered(reply: m.Reply | None, error: str, rtt_ms: float) -> None:
            if reply is not None:
                self._offloaded(frame, target, reply, rtt_ms)
            else:
                self._fallback(frame, plan, tensor, error)

        why = self.offload.request(target, self.cfg.id, self.cfg.model, plan.version, tensor, frame.captured_at,
                                   answered)
        if why:
            self._fallback(frame, plan, tensor, why)

    def _local(self, frame, runner: Any, tensor: np.ndarray | None = None) -> None:
        output, infer_ms = runner.run(frame.data) if tensor is None else runner.run_tensor(tensor)
        self.timings(runner.name).add(infer_ms)
        self._emit(frame, runner.model_id, output, infer_ms, self.device, None)

    def _offloaded(self, frame, target: str, reply: m.Reply, rtt_ms: float) -> None:
        model = m.ModelId(name=reply.model, version=reply.version or "0", sha256=reply.sha256)
        self.offloaded += 1
        self._emit(frame, model, reply.output, reply.infer_ms, target, rtt_ms)

    def _fallback(self, frame, plan: StreamPlan, tensor: np.ndarray, why: str) -> None:
        """An offload failed: compute here if the model is held (now or when it was sent), else count it."""
        runner = plan.runner or self._plan.runner
        if runner is None or tensor.shape != tuple(runner.input.shape):
            self.offload_failed += 1
            self._note(f"offload failed: {why}")
            return
        try:
            self._local(frame, runner, tensor)
        except Exception as exc:  # the fallback thread must outlive one bad frame
            self._failed(exc)

    def _emit(self, frame, model: m.ModelId, output: dict, infer_ms: float, computed_on: str,
              rtt_ms: float | None) -> None:
        # The frame's number lets a consumer see that no frame was lost between the source and the outbox.
        output = {**output, "source": {**plain(frame.meta), "frame": frame.seq}}
        deadline = frame.captured_at + self.cfg.deadline_s if self.cfg.deadline_s else None
        result = m.Result(device=self.device, stream=self.cfg.id, seq=1, floor=1, model=model,
                          captured_at=frame.captured_at, inferred_at=time.time(), infer_ms=infer_ms,
                          computed_on=computed_on, rtt_ms=rtt_ms, deadline=deadline, output=output)

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
                      self.cfg.id, self.cfg.model, reason, self.errors)

    def _note(self, reason: str) -> None:
        """A frame without a result, logged once per reason per ERROR_LOG_EVERY_S."""
        now = time.monotonic()
        if now - self._error_logged.get(reason, -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
            self._error_logged[reason] = now
            log.warning("stream %s: a frame has no result: %s (offload failed %d, unserved %d so far)",
                        self.cfg.id, reason, self.offload_failed, self.unserved)

    def stats(self) -> dict:
        """Results, failures and the measured rate (Hz)."""
        return {"results": self.results.total, "errors": self.errors, "rate_hz": self.results.rate(),
                "offloaded": self.offloaded, "offload_failed": self.offload_failed, "unserved": self.unserved}
