"""What every source shares: the frame, the Protocol, and a base class.

A source owns one named thread that captures frames and a one-slot mailbox
that holds only the newest one. Consumers call ``latest(after_seq, timeout)``;
a frame replaced before any consumer took it is counted as dropped, so a slow
model never builds a backlog and the loss is visible in telemetry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lepton.protocol.topics import ID_PATTERN

log = logging.getLogger(__name__)

# How often a waiting source thread looks at the shared stop event: the
# bound on how long stopping the daemon waits for an idle source.
_STOP_POLL_S = 0.1
# Waits shorter than this (frame pacing above 200 fps) are plain sleeps.
_SHORT_SLEEP_S = 0.005
# A connection that lasted this long resets the reconnect backoff.
_STABLE_S = 10.0
# rate(): frames per second over about this long (the stream's demand the coordinator plans for)
RATE_WINDOW_S = 30.0


@dataclass(frozen=True)
class Frame:
    """One captured item: an image (HxWx3 uint8 BGR) or a sensor window ((length, channels) float32).

    ``data`` is read-only: several streams may share one frame, so none may
    change it in place (copy first).
    """

    seq: int
    captured_at: float  # time.time() at capture
    data: np.ndarray
    meta: dict = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    """What the agent needs from any source."""

    id: str

    def start(self, stop: threading.Event) -> None:
        """Start capturing in the source's own named thread until *stop* is set or close() is called."""

    def latest(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame with ``seq > after_seq``, waiting up to *timeout* s; None on timeout."""

    def stats(self) -> dict:
        """Counters: ``frames_in``, ``frames_dropped``, ``connected`` (and per-type extras)."""

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and release the device, waiting at most *timeout* s. Safe to call twice or before start()."""


class SourceConfig(BaseModel):
    """Keys every source has. Subclasses fix ``type`` and add their own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # `fps = true` is refused, not read as 1.0

    id: str = Field(description="source id that streams refer to: 1-64 of A-Z a-z 0-9 _ . -")
    type: str = Field(description="source type: camera, video, synthetic or sensor")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_PATTERN.match(value):
            raise ValueError("use 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit (ids appear in topics)")
        return value


class Pacer:
    """Fixed-rate deadlines without drift.

    When the loop falls behind by more than *max_lag_s* it starts afresh
    instead of bursting to catch up (a stalled device must not cause a flood).
    """

    def __init__(self, rate_hz: float, max_lag_s: float | None = None) -> None:
        self.period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self.max_lag_s = self.period if max_lag_s is None else max_lag_s
        self._next: float | None = None

    def delay(self) -> float:
        """Seconds to wait before the next item; schedules the one after."""
        now = time.monotonic()
        if self._next is None or now - self._next > self.max_lag_s:
            self._next = now
        wait = self._next - now
        self._next += self.period
        return max(0.0, wait)

    def ready(self) -> bool:
        """True if an item is due now (for loops paced by a device, not by sleeping)."""
        now = time.monotonic()
        if self._next is not None and now < self._next:
            return False
        behind = self._next is None or now - self._next > self.period
        self._next = (now if behind else self._next) + self.period
        return True


class Unavailable(Exception):
    """A device cannot be opened or read now; the message says why. It may come back."""


class Backoff:
    """Capped exponential waits between reconnect attempts."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max(max_s, first_s)
        self._next = first_s

    def next(self) -> float:
        """The wait before the next attempt; doubles up to the cap."""
        wait = self._next
        self._next = min(self._next * 2, self.max_s)
        return wait

    def reset(self) -> None:
        """Back to the first wait (after a connection that held)."""
        self._next = self.first_s


# What a pump may return besides a loss reason.
STOPPED = "stopped"  # the source is stopping
REWIND = "rewind"  # a file ended and loops: open it again at once
FINISHED = "finished"  # a file ended and does not loop


class BaseSource:
    """The mailbox, counters, thread and state logging shared by all sources.

    Subclasses implement ``run()``: capture until ``self.running()`` turns
    False, calling ``self.publish(...)`` per frame and ``self.set_connected()``
    on state changes, and release their device before returning.
    """

    kind = "source"

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.id = config.id
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._seq = 0
        self._taken = 0  # highest seq handed to any consumer
        self._frames_in = 0
        self._frame_at: float | None = None  # monotonic time of the newest frame
        self._delivering, self._delivering_since = False, time.monotonic()  # as stats() last saw it, and since when
        self._rate_marks: deque[tuple[float, int]] = deque()  # (monotonic time, frames_in) at each rate()
        self._dropped = 0
        self._connected = False
        # (line, after a loss) logged with the first frame since the device opened, by the capture thread
        self._first_frame_note: tuple[str, bool] | None = None
        self.reconnects = 0  # times a lost device came back
        self._halt = threading.Event()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        """Start the capture thread (named ``source-<id>``); a second call does nothing."""
        if self._thread is not None:
            return
        self._stop = stop
        self._thread = threading.Thread(target=self._main, name=f"source-{self.id}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, wait for it to release the device, wake any waiting consumer."""
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s %s: capture thread did not stop within %.0f s", self.kind, self.id, timeout)

    def running(self) -> bool:
        """False once close() was called or the shared stop event is set."""
        return not self._halt.is_set() and not (self._stop is not None and self._stop.is_set())

    def sleep(self, seconds: float) -> bool:
        """Wait *seconds* unless stopping; returns False if the source should stop."""
        if seconds < _SHORT_SLEEP_S:
            # A fast source's wait between frames: a plain sleep costs far less than an
            # event wait, and stopping is noticed as soon after.
            if seconds > 0:
                time.sleep(seconds)
            return self.running()
        deadline = time.monotonic() + seconds
        while self.running():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self._halt.wait(min(left, _STOP_POLL_S))
        return False

    def _main(self) -> None:
        # The thread must never die from a bug in one capture path: log it,
        # wait, start the capture again. A normal return means "finished".
        backoff = 1.0
        while self.running():
            try:
                self.run()
                break
            except Exception:
                log.exception("%s %s: capture failed; restarting in %.0f s", self.kind, self.id, backoff)
                self.set_connected(False)
                if not self.sleep(backoff):
                    break
                backoff = min(backoff * 2, 30.0)
        self.set_connected(False)
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:  # pragma: no cover - abstract
        """Capture until stopped (subclasses)."""
        raise NotImplementedError

    def supervise(
        self, open_device: Callable[[], Any], pump: Callable[[Any], str], what: str, backoff: Backoff
    ) -> None:
        """Open, pump, close, and reconnect with *backoff* until stopped.

        *open_device* returns an object with ``close()`` or raises Unavailable;
        *pump* delivers frames and returns STOPPED, REWIND, FINISHED or the
        reason the device was lost. One log line per state change, not per
        retry: ``connected to`` comes with the first frame, so a device that
        opens but gives no frame is named once (``opens but gives no frame``,
        not a connected/lost pair at every retry), and ``gives frames again``
        when it does. ``reconnects`` counts losses a device came back from
        with frames.
        """
        failing = lost = silent = False
        while self.running():
            try:
                device = open_device()
            except Unavailable as exc:
                if not failing:
                    log.warning("%s %s: cannot open %s (%s); retrying every %g-%g s",
                                self.kind, self.id, what, exc, backoff.first_s, backoff.max_s)
                failing = True
                self.set_connected(False)
                if not self.sleep(backoff.next()):
                    return
                continue
            came_back, failing, lost = lost, False, False
            opened_at, frames_at = time.monotonic(), self._frames_in
            if not self._connected:  # announced with its first frame: a device that opens may still give none
                self._first_frame_note = (f"{what} gives frames again" if silent else f"connected to {what}",
                                          came_back)
            self.set_connected(True)
            try:
                outcome = pump(device)
            finally:
                device.close()
                with self._cond:  # closed without a frame: not connected from this instant (stats() reads both)
                    if self._first_frame_note is not None:
                        self._connected = False
                    self._first_frame_note = None
            gave = self._frames_in > frames_at
            silent = silent and not gave
            if outcome == REWIND:
                continue
            if outcome in (STOPPED, FINISHED):
                if outcome == FINISHED:
                    self.set_connected(False, "finished %s", what)
                return
            lost = True
            # A device that drops right after each connect (or gives nothing) must not be
            # reopened at the first (short) wait forever.
            if gave and time.monotonic() - opened_at >= _STABLE_S:
                backoff.reset()
            if gave:
                self.set_connected(False, "lost %s (%s); reconnecting", what, outcome)
            else:
                if not silent:
                    log.warning("%s %s: %s opens but gives no frame (%s); retrying every %g-%g s",
                                self.kind, self.id, what, outcome, backoff.first_s, backoff.max_s)
                silent = True
                self.set_connected(False)
            if not self.sleep(backoff.next()):
                return

    # -- mailbox ---------------------------------------------------------

    def publish(self, data: np.ndarray, meta: dict[str, Any] | None = None, captured_at: float | None = None) -> Frame:
        """Put a new frame in the slot, counting the one it replaces as dropped if nobody took it."""
        data.flags.writeable = False
        if self._first_frame_note is not None:  # the first frame since the device opened: said before it is taken
            note, came_back = self._first_frame_note
            self._first_frame_note = None
            log.info("%s %s: %s", self.kind, self.id, note)
            if came_back:
                self.reconnects += 1
        with self._cond:
            if self._frame is not None and self._frame.seq > self._taken:
                self._dropped += 1
            self._seq += 1
            frame = Frame(self._seq, time.time() if captured_at is None else captured_at, data, meta or {})
            self._frame = frame
            self._frame_at = time.monotonic()
            self._frames_in += 1
            self._cond.notify_all()
        return frame

    def latest(self, after_seq: int, timeout: float) -> Frame | None:
        """The newest frame with ``seq > after_seq``, waiting up to *timeout* s; None on timeout or close."""

        def ready() -> bool:
            return self._halt.is_set() or (self._frame is not None and self._frame.seq > after_seq)

        with self._cond:
            self._cond.wait_for(ready, max(0.0, timeout))
            frame = self._frame
            if frame is None or frame.seq <= after_seq:
                return None
            self._taken = max(self._taken, frame.seq)
            return frame

    # -- state -----------------------------------------------------------

    def set_connected(self, connected: bool, message: str = "", *args: Any) -> None:
        """Record the device state; log *message* (with lazy *args*) only when it changes."""
        with self._cond:
            changed = connected != self._connected
            self._connected = connected
        if changed and message:
            level = logging.INFO if connected else logging.WARNING
            log.log(level, "%s %s: " + message, self.kind, self.id, *args)

    @property
    def connected(self) -> bool:
        """True while the device delivers frames."""
        return self._connected

    def stats(self) -> dict:
        """``frames_in``, ``frames_dropped``, ``connected`` (the device is open), ``delivering`` (open and it
        gave a frame since it opened), ``down_s`` (seconds not delivering, as seen by these calls: since the
        start if it never did; None while it delivers), ``last_frame_s`` (seconds since the newest frame, None
        before the first) plus what ``extra_stats()`` adds."""
        now = time.monotonic()
        with self._cond:
            delivering = self._connected and self._first_frame_note is None
            if delivering != self._delivering:
                self._delivering, self._delivering_since = delivering, now
            out = {"frames_in": self._frames_in, "frames_dropped": self._dropped, "connected": self._connected,
                   "delivering": delivering, "down_s": None if delivering else now - self._delivering_since,
                   "last_frame_s": None if self._frame_at is None else now - self._frame_at}
        out.update(self.extra_stats())
        return out

    def rate(self) -> float | None:
        """Frames per second delivered, over about the last RATE_WINDOW_S (from the first call on; None until a
        later call half a second on, as nothing is measured yet). All frames count, taken or dropped: this is
        what the streams it feeds are asked to serve; a source that stopped delivering reads 0."""
        now = time.monotonic()
        with self._cond:
            marks = self._rate_marks
            marks.append((now, self._frames_in))
            while len(marks) > 2 and now - marks[1][0] >= RATE_WINDOW_S:
                marks.popleft()
            (t0, n0), (t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 - t0 > 0.5 else None

    def extra_stats(self) -> dict:
        """Per-type counters (subclasses)."""
        return {}
