"""One stream: source -> preprocess -> invoke (here or offloaded) -> postprocess -> result -> outbox.

Each stream runs ``workers`` named workers. A worker takes the newest frame
its stream has not taken yet (a slow model drops frames at the source, never
builds a backlog), preprocesses it and queues it for its own invoke thread
(``stream-<id>-<n>-invoke``, which does nothing but invoke, releasing the
GIL). While the model runs frame k, the worker postprocesses k-1 and, just
before k is due to finish (its expected invoke time less the time taking and
preprocessing a frame takes, ``Staging``), takes the newest frame and queues
it: the model runs back to back, and the frame it gets next is as fresh as
one taken when the model is free (at most two frames in hand; a model faster
than the preprocessing gets the next frame at once). A worker's results leave in the order it took
its frames (with several workers, each finishes its own). The Result's JSON
is built here (``ResultEncoder``: the bytes ``encode(Result)`` gives,
checked as Result checks them, without a pydantic model per result) and
handed to delivery, which numbers, commits and publishes it. The frame's ``meta`` (e.g. ``{"truth": 3}``) travels in
``output["source"]``, with the frame's number as ``frame``, so a consumer can
check labels and losses.

Where a frame is computed is the stream's ``StreamPlan``: the local runner
(if this device holds the model) and the routes of the latest placement. A
routed frame is preprocessed here and sent to its target (``offload.py``);
the reply becomes the result (``computed_on`` the target, ``rtt_ms``
measured); a failed offload falls back to the local runner when there is
one, else it is counted in ``offload_failed``. ``set_plan`` replaces the plan
in one assignment and each frame reads it once, so a frame is processed
entirely under one plan: no result comes from a half-switched stream.

Workers report a heartbeat; a worker whose oldest frame in hand has waited
``stall_s`` (e.g. an invoke that hangs) makes the pipeline unhealthy, which
stops the systemd watchdog pings. On stop, the frames in hand are finished.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from lepton.agent.config import StreamConfig
from lepton.agent.outbox import Pending
from lepton.errors import LeptonError
from lepton.protocol import Topics
from lepton.protocol import messages as m
from lepton.protocol.messages import MAX_DEPTH, MAX_INT, MAX_JSON_BYTES, SCHEMA_VERSION, too_deep

log = logging.getLogger(__name__)

TAKE_TIMEOUT_S = 0.25  # how long a worker waits for a frame before looking at the stop event
POLL_S = 0.002  # with a frame invoking and its successor due, a worker looks for the next frame this often
# The next frame is staged this long before the invoke in hand is due to finish, on top of what taking
# and preprocessing a frame takes (x STAGE_FACTOR): the scheduler and the interpreter lock may hold the
# worker back this much; staged later, the model waits, earlier, the frame is older when it runs.
STAGE_MARGIN_MS = 1.0
STAGE_FACTOR = 1.5
ERROR_LOG_EVERY_S = 30.0
JPEG_SAMPLE_S = 5.0  # a JPEG stream served here encodes one frame this often: its offload size stays known


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


_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _nonneg(name: str, value: float) -> str:
    """*value* as JSON; ValueError (as Result's validation raises) unless a finite number >= 0."""
    value = float(value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"result {name} {value} is not a finite number >= 0")
    return value.__repr__()  # what json.dumps writes for a float


def model_json(model: m.ModelId) -> str:
    """A ModelId's JSON object, as inside a Result."""
    return _dumps({"name": model.name, "version": model.version, "sha256": model.sha256})


class ResultEncoder:
    """One stream's Results as JSON, around the seq and floor the outbox gives each later.

    ``parts(...)`` returns (head, tail) with payload = head + b'<seq>,"floor":<floor>' + tail:
    the bytes ``encode(Result(...))`` gives (same keys, order and values; a
    float may be spelt differently, e.g. 1e-05 for 0.00001), built without a
    pydantic model per result. The ids come from the validated config, model
    and placement; the values are checked here as Result checks them (numbers
    finite and >= 0, output finite and not nested past MAX_DEPTH), so what
    passes here passes ``decode("results", ...)``.
    """

    def __init__(self, device: str, stream: str) -> None:
        self.device, self.stream = device, stream
        self.head = f'{{"v":{SCHEMA_VERSION},"device":{_dumps(device)},"stream":{_dumps(stream)},"seq":'.encode()
        self._on: dict[str, str] = {}

    def parts(self, model: m.ModelId | str, captured_at: float, inferred_at: float, infer_ms: float,
              computed_on: str, rtt_ms: float | None, deadline: float | None, output: dict) -> tuple[bytes, bytes]:
        """*model*: a ModelId or its ``model_json``."""
        body = _dumps(output)  # ValueError on NaN or infinity, TypeError on what JSON cannot hold
        if body.count("[") + body.count("{") >= MAX_DEPTH and too_deep(b'{"output":%s}' % body.encode()):
            raise ValueError(f"result output nested deeper than {MAX_DEPTH} (the coordinator would refuse it)")
        on = self._on.get(computed_on)
        if on is None:
            on = _dumps(computed_on)
            if len(self._on) < 256:  # the devices this stream is served by: a handful
                self._on[computed_on] = on
        tail = (f',"model":{model if isinstance(model, str) else model_json(model)}'
                f',"captured_at":{_nonneg("captured_at", captured_at)}'
                f',"inferred_at":{_nonneg("inferred_at", inferred_at)}'
                f',"infer_ms":{_nonneg("infer_ms", infer_ms)},"computed_on":{on}')
        if rtt_ms is not None:
            tail += f',"rtt_ms":{_nonneg("rtt_ms", rtt_ms)}'
        if deadline is not None:
            tail += f',"deadline":{_nonneg("deadline", deadline)}'
        tail = f'{tail},"output":{body}}}'.encode()
        if len(self.head) + len(tail) + _SEQ_FLOOR_BYTES > MAX_JSON_BYTES:
            # Stored, it would be refused by the coordinator and hold the device's acks at its seq.
            raise ValueError(f"result of {len(self.head) + len(tail)} bytes or more exceeds the "
                             f"{MAX_JSON_BYTES} a message may have (the coordinator would refuse it)")
        return self.head, tail


_SEQ_FLOOR_BYTES = 2 * len(str(MAX_INT)) + len(',"floor":')  # the most the seq and floor can add


class ResultBuild:
    """``Pending.build`` for one result: its JSON with the seq and floor the outbox gives it."""

    __slots__ = ("head", "tail")

    def __init__(self, head: bytes, tail: bytes) -> None:
        self.head, self.tail = head, tail

    def __call__(self, seq: int, floor: int) -> bytes:
        return b"%s%d,\"floor\":%d%s" % (self.head, seq, floor, self.tail)


def tensor_bytes(info: Any) -> int:
    """Bytes of a tensor described by *info* (shape, dtype): what an exact offloaded input weighs."""
    return int(np.prod(info.shape)) * np.dtype(info.dtype).itemsize


def _fitter(runner: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """*runner*'s frame -> input-size image step, where its model takes images (else None)."""
    pre = getattr(runner, "preprocessor", None)
    return pre.fit if pre is not None and getattr(pre.spec, "kind", "") == "image" else None


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
    fit: Callable[[np.ndarray], np.ndarray] | None = None  # frame -> 8-bit BGR at the input size (image models)

    def pick(self, device: str) -> str | None:
        """Where the next frame goes: this device, another one, or None (nowhere)."""
        if self.router is None:
            return device if self.runner is not None else None
        return self.router.pick()


class _Invoker:
    """A worker's invoke stage: a thread that runs ``runner.infer(tensor)`` jobs in order, nothing else."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[Any, np.ndarray] | None] = queue.SimpleQueue()  # None: stop
        self.done: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (outputs, ms) or the exception, per job
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.queued = 0  # jobs put so far (by the worker)
        self.running = (0, 0.0)  # (number from 1, monotonic start) of the job begun last

    def put(self, runner: Any, tensor: np.ndarray) -> int:
        """Queue one invoke; its number."""
        self.queued += 1
        self.jobs.put((runner, tensor))
        return self.queued

    def started(self, job: int) -> float:
        """When job *job* began (now, when it has not begun yet: it is next)."""
        number, at = self.running
        return at if number == job else time.monotonic()

    def _run(self) -> None:
        number = 0
        while True:
            job = self.jobs.get()
            if job is None:
                return
            runner, tensor = job
            number += 1
            start = time.monotonic()
            self.running = (number, start)
            try:
                result = runner.infer(tensor)
            except Exception as exc:  # handed to the worker, which counts it against its frame
                result = exc
            # The job's wall time, not the invoke the runner timed: with several workers on one model, a job
            # also waits for the interpreter's lock while another worker's frame runs.
            self.done.put((result, (time.monotonic() - start) * 1000.0))


def _ewma(mean: float, sample: float) -> float:
    """A moving average (weight 0.2 to the new sample) that starts at its first sample (*mean* 0: none yet)."""
    return 0.8 * mean + 0.2 * sample if mean else sample


class Staging:
    """When a worker takes its next frame while the model runs one: just before that invoke is due to end.

    ``due(started)`` is the monotonic time to take it: the invoke's start
    plus the moving average of invoke jobs' wall times (with several workers
    on one model, a job also waits for the interpreter), less STAGE_FACTOR x
    the moving average of what taking and preprocessing a frame took, less
    STAGE_MARGIN_MS. A model faster than that gets its next frame at once
    (back to back); a slow one gets the newest frame shortly before it is
    free, so it never waits for the Python work between frames and never
    runs a frame a whole invoke old. Another model starts the averages afresh.
    """

    __slots__ = ("invoke_ms", "stage_ms", "runner")

    def __init__(self) -> None:
        self.invoke_ms = 0.0  # moving average of local invoke jobs' wall time (a wait for the model's lock too)
        self.stage_ms = 0.0  # moving average of taking + preprocessing one frame
        self.runner: Any = None  # the runner these are of: another model starts from nothing

    def runs(self, runner: Any) -> None:
        """The next frame goes to *runner*: another model than before starts the averages afresh."""
        if runner is not self.runner:
            self.runner, self.invoke_ms, self.stage_ms = runner, 0.0, 0.0

    def invoked(self, ms: float) -> None:
        self.invoke_ms = _ewma(self.invoke_ms, ms)

    def staged(self, ms: float) -> None:
        self.stage_ms = _ewma(self.stage_ms, ms)

    def due(self, started: float) -> float:
        """When to take the next frame, for an invoke that began at *started* (monotonic)."""
        lead = STAGE_FACTOR * self.stage_ms + STAGE_MARGIN_MS
        return started + max(0.0, self.invoke_ms - lead) / 1000.0


class StreamPipeline:
    """Workers that turn one source's frames into results for one model."""

    def __init__(self, cfg: StreamConfig, device: str, topics: Topics, source: Any, runner: Any,
                 submit: Callable[[Pending], None], timings: Callable[[str], Window], workers: int = 1,
                 stall_s: float = 30.0, window_s: float = 60.0, offload: Any = None) -> None:
        self.cfg, self.device, self.source = cfg, device, source
        self.topic = topics.result(device, cfg.id)
        self._encoder = ResultEncoder(device, cfg.id)
        self.submit, self.timings = submit, timings
        self.workers, self.stall_s = workers, stall_s
        self.offload = offload  # the OffloadClient, when frames may be routed elsewhere
        self.results = Window(window_s)
        self.errors = 0
        self.offloaded = 0  # results computed on another device
        self.offload_failed = 0  # frames neither computed elsewhere nor here
        self.unserved = 0  # frames skipped: routed nowhere and the model is not held here
        runner = as_runner(runner)
        self._plan = StreamPlan(runner, runner.preprocess, runner.input, runner.version, fit=_fitter(runner))
        self.jpeg_quality = getattr(cfg, "offload_jpeg_quality", 0)
        self._jpeg_bytes: float | None = None  # running mean size of the JPEGs sent (or sampled, when local)
        self._jpeg_sample_at = 0.0
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
        fit = _fitter(runner) if runner else old.fit
        usable = [(d, s) for d, s in routes or []
                  if (runner is not None if d == self.device else self.offload is not None)]
        router = Router(usable) if any(d != self.device for d, _ in usable) else None
        self._routes = routes
        self._plan = StreamPlan(runner, pre, info, version, router, fit)  # one assignment: the switch
        where = ", ".join(f"{d} {s:.2f}" for d, s in routes) if routes else ("here" if runner else "nowhere")
        log.info("stream %s: %s %s, served %s", self.cfg.id, self.cfg.model,
                 runner.version if runner else "not held here", where)

    # --- lifecycle ---------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        for index in range(self.workers):
            invoker = _Invoker(f"stream-{self.cfg.id}-{index}-invoke")
            thread = threading.Thread(target=self._work, args=(index, stop, invoker),
                                      name=f"stream-{self.cfg.id}-{index}", daemon=True)
            invoker.thread.start()
            thread.start()
            self._threads += [thread, invoker.thread]

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
    def _next_frame(self, timeout: float = TAKE_TIMEOUT_S) -> tuple[Any, StreamPlan]:
        """The next frame and the plan it is processed under, taken together: frames and plans stay in order.

        *timeout* 0: only a frame that is there now, and only if no other worker is taking one (a worker
        with a frame in hand must not wait behind an idle one)."""
        if not self._take.acquire(blocking=timeout > 0):
            return None, self._plan
        try:
            frame = self.source.latest(self._last_seq, timeout)
            if frame is not None:
                self._last_seq = frame.seq
            return frame, self._plan
        finally:
            self._take.release()

    def _work(self, index: int, stop: threading.Event, invoker: "_Invoker") -> None:
        """One worker: frames in, results out, with the invokes on its own invoke thread.

        While the invoke thread runs frame k this thread postprocesses k-1
        and, when k is due to end (``Staging``), takes the newest frame,
        preprocesses it and queues it, so the model runs back to back on fresh
        frames when frames keep up (at most two local frames in hand). A frame
        going elsewhere waits for the local ones before it; results leave in
        the order frames were taken. On stop, the frames in hand are finished
        first.
        """
        staged: deque[tuple[Any, Any, np.ndarray, float, int]] = deque()  # (frame, runner, tensor, taken at, job)
        timing = Staging()
        try:
            while True:
                due = timing.due(invoker.started(staged[0][4])) if staged else 0.0
                now = time.monotonic()
                if len(staged) < 2 and not stop.is_set() and now >= due:
                    frame, plan = self._next_frame(0.0 if staged else TAKE_TIMEOUT_S)
                    if frame is not None:
                        taken = time.monotonic()
                        self._busy[index] = staged[0][3] if staged else taken
                        self._guarded(frame, self._stage, index, frame, plan, staged, invoker, taken, timing)
                        self._busy[index] = staged[0][3] if staged else None
                        continue
                if staged:
                    # Room for one more frame: wait for the invoke until the next is due, then look for it
                    # every POLL_S; with two in hand (or stopping), wait for the invoke.
                    wait = TAKE_TIMEOUT_S
                    if len(staged) < 2 and not stop.is_set():
                        wait = min(TAKE_TIMEOUT_S, max(POLL_S, due - now))
                    self._finish(index, staged, invoker, wait, timing)
                elif stop.is_set():
                    return
        finally:
            invoker.jobs.put(None)

    def _guarded(self, frame, fn: Callable, *args: Any) -> None:
        """Run one frame's step; a failure is counted (and logged, rate-limited), never fatal."""
        try:
            fn(*args)
        except (LeptonError, ValueError, TypeError, ArithmeticError) as exc:
            self._failed(exc)
        except Exception as exc:  # a worker must outlive one bad frame
            log.exception("stream %s: frame %d failed", self.cfg.id, frame.seq)
            self._failed(exc, logged=True)

    def _stage(self, index: int, frame, plan: StreamPlan, staged: deque, invoker: "_Invoker", taken: float,
               timing: Staging) -> None:
        """Route one frame: local frames are preprocessed and queued for the invoke thread; a frame going
        elsewhere waits for the local ones before it, so results keep the order frames were taken in."""
        target = plan.pick(self.device)
        if target != self.device or plan.runner is None:
            while staged:
                self._finish(index, staged, invoker, TAKE_TIMEOUT_S, timing)
            self._process(frame, plan, target)
            return
        runner = plan.runner
        tensor = runner.preprocess(frame.data)
        timing.runs(runner)
        job = invoker.put(runner, tensor)
        timing.staged((time.monotonic() - taken) * 1000.0)
        staged.append((frame, runner, tensor, taken, job))
        if self.jpeg_quality and plan.fit is not None and taken >= self._jpeg_sample_at:
            # What an offloaded frame would weigh, before any is offloaded: the planner prices offloading by it.
            self._jpeg_sample_at = taken + JPEG_SAMPLE_S
            try:
                self._jpeg(plan.fit(frame.data))
            except (LeptonError, ValueError) as exc:  # the frame itself is served; only the size sample is lost
                self._warn(f"the JPEG size of its frames could not be sampled: {exc}")

    def _finish(self, index: int, staged: deque, invoker: "_Invoker", wait_s: float, timing: Staging) -> None:
        """Wait up to *wait_s* for the oldest staged frame's invoke; postprocess it and emit its result."""
        try:
            done, wall_ms = invoker.done.get(timeout=wait_s)
        except queue.Empty:
            return  # still invoking: healthy() watches how long
        frame, runner, tensor, _, _ = staged.popleft()
        if not isinstance(done, BaseException):
            timing.invoked(wall_ms)
        self._busy[index] = staged[0][3] if staged else None
        self._guarded(frame, self._finished, frame, runner, tensor, done)

    def _finished(self, frame, runner: Any, tensor: np.ndarray, done: Any) -> None:
        if isinstance(done, BaseException):
            raise done
        outputs, infer_ms = done
        self.timings(runner.name).add(infer_ms)
        output = runner.postprocess(outputs, tensor)
        self._emit(frame, getattr(runner, "model_json", None) or runner.model_id, output, infer_ms, self.device, None)

    def _process(self, frame, plan: StreamPlan, target: str | None) -> None:
        """A frame routed to another device, or nowhere (frames for this device are staged)."""
        if target is None:
            self.unserved += 1
            self._note("no device serves it and its model is not held here")
            return
        tensor, jpeg = None, None
        if self.jpeg_quality and plan.fit is not None:
            try:
                jpeg = self._jpeg(plan.fit(frame.data))
            except (LeptonError, ValueError) as exc:  # e.g. a 16-bit frame: the exact tensor goes instead
                self._warn(f"a frame offloaded as a tensor, not JPEG: {exc}")
        if jpeg is None:
            tensor = plan.pre(frame.data)

        def answered(reply: m.Reply | None, error: str, rtt_ms: float) -> None:
            if reply is not None:
                self._offloaded(frame, target, reply, rtt_ms)
            else:
                self._fallback(frame, plan, tensor, error)

        why = self.offload.request(target, self.cfg.id, self.cfg.model, plan.version, tensor, frame.captured_at,
                                   answered, jpeg=jpeg)
        if why:
            self._fallback(frame, plan, tensor, why)

    def _jpeg(self, image: np.ndarray) -> bytes:
        """*image* (8-bit BGR at the input size) as JPEG; the running mean size is what the planner is told."""
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise ValueError(f"stream {self.cfg.id}: the frame did not encode as JPEG")
        size = float(data.size)
        self._jpeg_bytes = size if self._jpeg_bytes is None else 0.9 * self._jpeg_bytes + 0.1 * size
        return data.tobytes()

    def payload_bytes(self) -> int:
        """Bytes one offloaded frame takes: the mean JPEG (sent, or sampled while served here), else the
        exact tensor's size."""
        if self.jpeg_quality and self._jpeg_bytes is not None:
            return int(round(self._jpeg_bytes))
        return tensor_bytes(self._plan.input)

    def _local(self, frame, runner: Any, tensor: np.ndarray | None = None) -> None:
        output, infer_ms = runner.run(frame.data) if tensor is None else runner.run_tensor(tensor)
        self.timings(runner.name).add(infer_ms)
        self._emit(frame, getattr(runner, "model_json", None) or runner.model_id, output, infer_ms, self.device, None)

    def _offloaded(self, frame, target: str, reply: m.Reply, rtt_ms: float) -> None:
        model = m.ModelId(name=reply.model, version=reply.version or "0", sha256=reply.sha256)
        try:  # on the inbound thread: a reply that makes no result (e.g. too large for a message) is a frame error
            self._emit(frame, model, reply.output, reply.infer_ms, target, rtt_ms)
        except (LeptonError, ValueError, TypeError, ArithmeticError) as exc:
            self._failed(exc)
            return
        self.offloaded += 1

    def _fallback(self, frame, plan: StreamPlan, tensor: np.ndarray | None, why: str) -> None:
        """An offload failed: compute here if the model is held (now or when it was sent), else count it.

        *tensor*: the preprocessed input that was sent (None when a JPEG was: the frame is preprocessed here).
        """
        runner = plan.runner or self._plan.runner
        if runner is None or (tensor is not None and tensor.shape != tuple(runner.input.shape)):
            self.offload_failed += 1
            self._note(f"offload failed: {why}")
            return
        try:
            self._local(frame, runner, tensor)
        except Exception as exc:  # the fallback thread must outlive one bad frame
            self._failed(exc)

    def _emit(self, frame, model: m.ModelId | str, output: dict, infer_ms: float, computed_on: str,
              rtt_ms: float | None) -> None:
        # The frame's number lets a consumer see that no frame was lost between the source and the outbox.
        output = {**output, "source": {**plain(frame.meta), "frame": frame.seq}}
        deadline = frame.captured_at + self.cfg.deadline_s if self.cfg.deadline_s else None
        head, tail = self._encoder.parts(model, frame.captured_at, time.time(), infer_ms, computed_on, rtt_ms,
                                         deadline, output)
        self.submit(Pending(self.cfg.id, self.topic, ResultBuild(head, tail), deadline))
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
        self._warn(f"a frame has no result: {reason} (offload failed {self.offload_failed}, "
                   f"unserved {self.unserved} so far)", reason)

    def _warn(self, message: str, key: str = "") -> None:
        """A warning about this stream, logged once per *key* (default: the message) per ERROR_LOG_EVERY_S."""
        key, now = key or message, time.monotonic()
        if now - self._error_logged.get(key, -ERROR_LOG_EVERY_S) >= ERROR_LOG_EVERY_S:
            self._error_logged[key] = now
            log.warning("stream %s: %s", self.cfg.id, message)

    def stats(self) -> dict:
        """Results, failures and the measured rate (Hz)."""
        return {"results": self.results.total, "errors": self.errors, "rate_hz": self.results.rate(),
                "offloaded": self.offloaded, "offload_failed": self.offload_failed, "unserved": self.unserved}
