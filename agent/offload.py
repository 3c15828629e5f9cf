"""Offload: run a stream's inputs on another device, and serve other devices' inputs here.

Origin side (``OffloadClient``): a stream whose route sends a share to
device T preprocesses the frame as usual and publishes the tensor as a binary
frame (``protocol/offload.py``) on ``devices/{me}/offload/{T}/{model}``,
QoS 1. The answer comes on ``devices/{T}/replies/{me}`` (a ``Reply``); it is
accepted only from T (the topic names the sender, and the broker's ACL
guarantees it) for a request still pending. At most ``max_inflight``
requests wait per target; a worker that finds the window full waits for a
slot (so its source drops stale frames, as with a slow local model). A
request not answered within its timeout (``offload.timeout_s``, default
2 x the expected round trip + 1 s) fails over: to local inference when the
model is held here, else it is counted in ``offload_failed``. Three timeouts
in a row make a target suspect for one timeout: its share is served as a
failure (local fallback or counted) without waiting.

Target side (``OffloadServer``): requests for a model loaded here are run by
``workers`` named threads from a bounded queue (full: an immediate "busy"
error reply, so the origin falls back at once rather than timing out).
An agent with no sources is a pure inference worker.

``Router`` spreads a stream over its routes by share, deterministically
(smooth weighted round robin: over any run of n frames each device gets its
share to within one frame).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton.errors import LeptonError, ProtocolError
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m
from lepton.protocol.offload import OffloadHeader, decode_frame, encode_frame

log = logging.getLogger(__name__)

SUSPECT_AFTER = 3  # requests in a row without a result (timeouts, error replies) that make a target suspect
TICK_S = 0.05
STOP_POLL_S = 0.25  # a worker waiting for an offload slot looks at the stop event this often


class Router:
    """Smooth weighted round robin over ``[(device, share), ...]`` (thread-safe, deterministic)."""

    def __init__(self, routes: list[tuple[str, float]]) -> None:
        self.routes = [(d, float(s)) for d, s in routes if s > 0]
        self.total = sum(s for _, s in self.routes)
        self._current = [0.0] * len(self.routes)
        self._lock = threading.Lock()

    def pick(self) -> str | None:
        """The device for the next input; None when there is no route."""
        if not self.routes:
            return None
        if len(self.routes) == 1:
            return self.routes[0][0]
        with self._lock:
            best = 0
            for i, (_, share) in enumerate(self.routes):
                self._current[i] += share
                if self._current[i] > self._current[best]:
                    best = i
            self._current[best] -= self.total
            return self.routes[best][0]

    def devices(self) -> list[str]:
        return [d for d, _ in self.routes]


@dataclass
class Pending:
    """One request waiting for its reply."""

    target: str
    request: int
    nbytes: int
    sent: float  # monotonic
    deadline: float
    done: Callable[[m.Reply | None, str, float], None]


@dataclass
class TargetState:
    inflight: int = 0
    rtt_ms: float | None = None  # moving average of answered round trips
    timeouts_in_row: int = 0  # requests in a row that timed out or came back with an error
    suspect_until: float = 0.0
    stats: dict = field(default_factory=lambda: {"sent": 0, "replied": 0, "timeouts": 0, "errors": 0})


class OffloadClient:
    """Sends inputs to other devices and matches their replies (origin side)."""

    def __init__(self, device: str, topics: Topics, publish: Callable[[Any], Any], cfg: Any,
                 links: Any = None) -> None:
        from lepton.agent.session import Outgoing

        self.device, self.topics, self.publish, self.cfg, self.links = device, topics, publish, cfg, links
        self._outgoing = Outgoing
        self._cond = threading.Condition()
        self._pending: dict[tuple[str, int], Pending] = {}
        self._targets: dict[str, TargetState] = {}
        self._request = 0
        self._fallbacks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()  # the agent's stop event once started
        self.late = 0  # replies after their request timed out, or for no request of ours

    # --- lifecycle ----------------------------------------------------------------
    def start(self, stop: threading.Event, stopping: threading.Event | None = None) -> None:
        """Threads run until *stop*; a worker waiting for a slot gives up once *stopping* (the agent's stop,
        set before its pipelines finish: *stop* comes later, after their last answers) is set."""
        self._stopping = stopping or stop
        for name, target in (("offload-timeouts", self._expire_loop), ("offload-fallback", self._fallback_loop)):
            thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def drain(self, timeout: float) -> int:
        """Wait up to *timeout* for pending requests to be answered or time out; the number left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return len(self._pending)

    def join(self, timeout: float = 2.0) -> None:
        """After the *stop* given to ``start`` is set: fail what is still pending, run every fallback queued
        (requests unanswered at shutdown are computed here, or counted as failed), then end both threads;
        at most *timeout* in all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:  # the timeouts thread first: its last expire() queues fallbacks
            if thread.name == "offload-timeouts":
                thread.join(max(0.0, deadline - time.monotonic()))
        self.expire(float("inf"))  # whatever is still pending is failed now, before the stop marker
        self._fallbacks.put(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- timeouts -------------------------------------------------------------------
    def timeout_s(self, target: str) -> float:
        """``offload.timeout_s``, else 2 x the expected round trip + 1 s (capped)."""
        if self.cfg.timeout_s > 0:
            return self.cfg.timeout_s
        state = self._targets.get(target)
        expected = state.rtt_ms if state and state.rtt_ms is not None else self.cfg.expected_ms
        return min(self.cfg.max_timeout_s, 2 * expected / 1000.0 + 1.0)

    def _target(self, target: str) -> TargetState:
        return self._targets.setdefault(target, TargetState())

    # --- sending ---------------------------------------------------------------------
    def request(self, target: str, stream: str, model: str, version: str, tensor: np.ndarray | None,
                captured_at: float, done: Callable[[m.Reply | None, str, float], None],
                jpeg: bytes | None = None) -> str:
        """Send one input to *target*; '' once sent (*done* will be called exactly once), else why not."""
        timeout = self.timeout_s(target)
        with self._cond:
            state = self._target(target)
            if time.monotonic() < state.suspect_until:
                return f"{target} is not answering"
            deadline = time.monotonic() + timeout
            while state.inflight >= self.cfg.max_inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"{self.cfg.max_inflight} requests to {target} already waiting"
                if self._stopping.is_set():
                    return "the agent is stopping"  # the frame is computed here, or counted, within the stop budget
                self._cond.wait(min(left, STOP_POLL_S))
            self._request += 1
            request = self._request
            state.inflight += 1
        try:
            body, header = self._frame(stream, request, model, version, tensor, captured_at, jpeg)
            payload = encode_frame(header, body)
        except (LeptonError, ValueError, TypeError) as exc:  # e.g. a dtype or a dimension the frame cannot carry
            with self._cond:
                state.inflight -= 1  # nothing went out: the slot is free again
                self._cond.notify_all()
            return f"the input cannot be offloaded: {_one_line(exc)}"
        now = time.monotonic()
        with self._cond:
            self._pending[(target, request)] = Pending(target, request, len(payload), now, now + timeout, done)
            state.stats["sent"] += 1
        sent = self.publish(self._outgoing(self.topics.offload(self.device, target, model), payload, 1))
        if sent is None:
            with self._cond:
                if self._pending.pop((target, request), None) is None:
                    return ""  # already answered or expired: done was called
                state.inflight -= 1
                self._cond.notify_all()
            return "not connected to the broker"
        return ""

    def _frame(self, stream: str, request: int, model: str, version: str, tensor: np.ndarray | None,
               captured_at: float, jpeg: bytes | None) -> tuple[bytes, OffloadHeader]:
        common = dict(origin=self.device, stream=stream, request=request, model=model, version=version,
                      sent_at=time.time(), captured_at=captured_at)
        if jpeg is not None:
            return jpeg, OffloadHeader(encoding="jpeg", **common)
        tensor = np.ascontiguousarray(tensor)
        return tensor.tobytes(), OffloadHeader(encoding="raw", dtype=str(tensor.dtype), shape=list(tensor.shape),
                                               **common)

    # --- answers ------------------------------------------------------------------------
    def on_reply(self, server: str, reply: m.Reply) -> None:
        """A reply arrived on ``devices/{server}/replies/{me}`` (inbound thread)."""
        if reply.server != server or reply.origin != self.device:
            raise ProtocolError(f"reply names server {reply.server!r} and origin {reply.origin!r}, "
                                f"the topic says {server!r} -> {self.device!r}")
        now = time.monotonic()
        with self._cond:
            pending = self._pending.pop((server, reply.request), None)
            if pending is None:
                self.late += 1
                return
            state = self._target(pending.target)
            rtt_ms = (now - pending.sent) * 1000.0
            if reply.error:  # e.g. the model is not loaded there yet: computed here, like a timeout
                state.stats["errors"] += 1
                self._failed_to(state, pending.target)
            else:
                self._settle(pending)
                state.stats["replied"] += 1
                state.timeouts_in_row = 0
                state.rtt_ms = rtt_ms if state.rtt_ms is None else 0.8 * state.rtt_ms + 0.2 * rtt_ms
        if reply.error:
            self._fall_back(pending, f"{server}: {reply.error}", rtt_ms)
            return
        if self.links is not None:
            self.links.add_offload(pending.nbytes, rtt_ms / 1000.0, reply.infer_ms)
        pending.done(reply, "", rtt_ms)

    def _settle(self, pending: Pending) -> TargetState:
        state = self._target(pending.target)
        state.inflight = max(0, state.inflight - 1)
        self._cond.notify_all()
        return state

    def _failed_to(self, state: TargetState, target: str) -> None:
        """One more request to *target* in a row that came back without a result (caller holds the lock)."""
        state.timeouts_in_row += 1
        if state.timeouts_in_row >= SUSPECT_AFTER:
            state.suspect_until = time.monotonic() + self.timeout_s(target)

    def _fall_back(self, pending: Pending, why: str, waited_ms: float) -> None:
        """Hand a failed request to the fallback thread. Its slot stays taken until the fallback ran: a target
        that fails fast must not let frames queue here faster than this device computes them."""
        def job() -> None:
            try:
                pending.done(None, why, waited_ms)
            finally:
                with self._cond:
                    self._settle(pending)

        self._fallbacks.put(job)

    def _expire_loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            self.expire(time.monotonic())
        self.expire(float("inf"))  # at stop: nothing waits for ever

    def expire(self, now: float) -> int:
        """Fail every request past its deadline; how many."""
        with self._cond:
            due = [p for p in self._pending.values() if p.deadline <= now]
            for p in due:
                del self._pending[(p.target, p.request)]
                state = self._target(p.target)
                state.stats["timeouts"] += 1
                self._failed_to(state, p.target)
        for p in due:
            waited = (now if now != float("inf") else time.monotonic()) - p.sent
            self._fall_back(p, f"no reply from {p.target} within {waited:.1f} s", waited * 1000.0)
        return len(due)

    def _fallback_loop(self, stop: threading.Event) -> None:
        while True:
            job = self._fallbacks.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # one failed fallback must not end the thread
                log.exception("offload fallback failed")

    def stats(self) -> dict[str, dict]:
        """Per target: sent, replied, timeouts, errors, in flight, round trip."""
        with self._cond:
            return {t: {**s.stats, "inflight": s.inflight, "rtt_ms": s.rtt_ms} for t, s in self._targets.items()}


def _one_line(exc: Exception) -> str:
    """*exc* as one line; a pydantic ValidationError as "field: message"."""
    from pydantic import ValidationError

    from lepton.errors import describe_validation

    if isinstance(exc, ValidationError):
        return describe_validation(exc, "offload frame")
    return (str(exc) or type(exc).__name__).splitlines()[0]


@dataclass(frozen=True)
class Job:
    origin: str
    header: OffloadHeader
    body: bytes


class OffloadServer:
    """Runs other devices' inputs on the models loaded here (target side)."""

    def __init__(self, device: str, topics: Topics, publish: Callable[[Any], Any],
                 runner_for: Callable[[str], Any], timing: Callable[[str], Any], workers: int = 1,
                 queue_max: int = 32, on_probe: Callable[[int], None] | None = None) -> None:
        from lepton.agent.session import Outgoing

        self.device, self.topics, self.publish = device, topics, publish
        self.runner_for, self.timing, self.on_probe = runner_for, timing, on_probe
        self.workers = workers
        self._outgoing = Outgoing
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_max)
        self._threads: list[threading.Thread] = []
        self.served = 0
        self.refused = 0
        self.busy = 0

    def start(self, stop: threading.Event) -> None:
        for index in range(self.workers):
            thread = threading.Thread(target=self._run, args=(stop,), name=f"offload-serve-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 2.0) -> None:
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle(self, origin: str, model: str, payload: bytes) -> None:
        """A frame arrived on ``devices/{origin}/offload/{me}/{model}`` (inbound thread); ProtocolError if bad."""
        header, body = decode_frame(payload)
        if header.origin != origin or header.model != model:
            raise ProtocolError(f"offload frame says origin {header.origin!r} model {header.model!r}, "
                                f"the topic says {origin!r} {model!r}")
        if origin == self.device and model == "probe":
            if self.on_probe is not None:
                self.on_probe(header.request)
            return
        try:
            self._queue.put_nowait(Job(origin, header, body))
        except queue.Full:
            self.busy += 1
            self._reply(origin, header, error=f"{self.device} is busy ({self._queue.maxsize} inputs queued)")

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self._queue.get(timeout=0.25)
            except queue.Empty:
                continue
            if job is None:
                return
            try:
                self._serve(job)
            except Exception as exc:  # a bad input must not end the worker; the origin falls back
                log.exception("serving %s for %s failed", job.header.model, job.origin)
                self._reply(job.origin, job.header, error=f"failed on {self.device}: {exc}")

    def _serve(self, job: Job) -> None:
        header = job.header
        runner = self.runner_for(header.model)
        if runner is None:
            self.refused += 1
            self._reply(job.origin, header, error=f"model {header.model} is not loaded on {self.device}")
            return
        try:
            tensor = self._tensor(runner, header, job.body)
            output, infer_ms = runner.run_tensor(tensor)
        except (LeptonError, ValueError) as exc:
            self.refused += 1
            self._reply(job.origin, header, error=str(exc))
            return
        self.timing(runner.name).add(infer_ms)
        self.served += 1
        self._reply(job.origin, header, output=output, infer_ms=infer_ms, runner=runner)

    @staticmethod
    def _tensor(runner: Any, header: OffloadHeader, body: bytes) -> np.ndarray:
        if header.encoding == "jpeg":
            import cv2

            frame = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            if frame is None:
                raise ValueError("offload frame: the JPEG body does not decode")
            return runner.preprocess(frame)
        return np.frombuffer(body, dtype=header.dtype).reshape(header.shape)

    def _reply(self, origin: str, header: OffloadHeader, output: dict | None = None, infer_ms: float = 0.0,
               error: str = "", runner: Any = None) -> None:
        reply = m.Reply(server=self.device, origin=origin, request=header.request, model=header.model,
                        version=runner.version if runner else "", sha256=runner.sha256 if runner else "",
                        infer_ms=infer_ms, error=error[:500], output=output or {})
        self.publish(self._outgoing(self.topics.reply(self.device, origin), encode(reply), 1))
