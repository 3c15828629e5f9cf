"""The device's link to the broker, measured from real traffic: RTT, upload and download capacity.

What feeds it:

- RTT: the lowest publish -> PUBACK time of our own QoS 1 messages
  (``session.LinkMeter``); queueing only ever adds to it.
- upload: bytes acknowledged per second while several publishes were in
  flight (``LinkMeter.totals``), offload payloads (payload bits over the
  round trip minus the server's compute time and the base RTT: a lower bound,
  the target's downlink is on the same path), and the probe.
- download: model downloads over HTTP, and the probe.
- the probe: every ``probe_interval_s``, unless real traffic measured both
  directions meanwhile, two ``probe_bytes`` messages. The first goes to the
  device's probe sink (``devices/{id}/probe``, which nobody reads): the
  broker's PUBACK times the way up. The second goes to the device's own
  offload topic addressed to itself (``offload/{id}/{id}/probe``); the broker
  queues the copy for delivery before its PUBACK, so only the copy's arrival
  tells anything: the round trip, minus the first message's way up, is the
  way down. Both stay inside what the broker's ACL lets a device write and
  read.

Each direction's estimate is the median of the samples of the last
``window_s``; until there is one, the configured hint (``[link]``) is
reported. With ``[link] measure = false`` only the hints are reported (a demo
emulating slow links on one machine).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lepton.protocol import messages as m

log = logging.getLogger(__name__)

MIN_SAMPLE_BYTES = 16 * 1024  # below this a transfer time is mostly latency
MIN_TRANSFER_S = 0.0002  # timer resolution floor: a faster transfer is reported at the cap
# The probe's way down is a difference of two timings (the echo's round trip less the sink's way up):
# below this it is jitter, so it is reported as this (a fast link, e.g. 32 KB -> 262 Mbit/s at least).
PROBE_DOWN_FLOOR_S = 0.001
MAX_MBPS = 10000.0
PROBE_MODEL = "probe"
PROBE_STREAM = "link-probe"


class Samples:
    """Throughput samples (Mbit/s) over a time window (thread-safe)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=256)
        self._lock = threading.Lock()
        self.last_at = 0.0

    def add(self, mbps: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._items.append((now, min(mbps, MAX_MBPS)))
            self.last_at = now

    def median(self) -> float | None:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            values = [v for t, v in self._items if t >= cutoff]
        return statistics.median(values) if values else None


def mbps(nbytes: int, seconds: float) -> float:
    """Throughput of *nbytes* in *seconds*, with the timer floor and the cap applied."""
    return min(MAX_MBPS, nbytes * 8 / max(seconds, MIN_TRANSFER_S) / 1e6)


class Links:
    """The link estimate telemetry reports."""

    def __init__(self, hints: Any, meter: Any = None, measure: bool = True, window_s: float = 300.0) -> None:
        self.hints, self.meter, self.measure = hints, meter, measure
        self.up = Samples(window_s)
        self.down = Samples(window_s)
        self._pipelined = (0, 0.0)
        self._lock = threading.Lock()

    def base_rtt_ms(self) -> float:
        """The lowest recent publish->PUBACK time (0 when unknown)."""
        rtt = self.meter.rtt_ms() if self.meter is not None else None
        return float(rtt or 0.0)

    # --- samples ------------------------------------------------------------------
    def add_download(self, nbytes: int, seconds: float) -> None:
        """An HTTP download of *nbytes* took *seconds*."""
        if nbytes >= MIN_SAMPLE_BYTES:
            self.down.add(mbps(nbytes, seconds))

    def add_offload(self, nbytes: int, rtt_s: float, server_ms: float) -> None:
        """An offload payload of *nbytes* came back answered after *rtt_s*, *server_ms* of it computing."""
        if nbytes < MIN_SAMPLE_BYTES:
            return
        transfer = rtt_s - server_ms / 1000.0 - self.base_rtt_ms() / 1000.0
        self.up.add(mbps(nbytes, transfer))

    def add_probe(self, nbytes: int, up_s: float | None, down_s: float | None) -> None:
        """A probe of *nbytes*: the time it took up to the broker, and back down."""
        if up_s is not None:
            self.up.add(mbps(nbytes, up_s))
        if down_s is not None:
            self.down.add(mbps(nbytes, down_s))

    def _pipelined_sample(self) -> None:
        """Bytes acknowledged per second of busy link since the last look (re-sends after an outage)."""
        if self.meter is None:
            return
        total, busy = self.meter.totals()
        with self._lock:
            d_bytes, d_busy = total - self._pipelined[0], busy - self._pipelined[1]
            self._pipelined = (total, busy)
        if d_bytes >= 4 * MIN_SAMPLE_BYTES and d_busy > 0:
            self.up.add(mbps(d_bytes, d_busy))

    def fresh(self, within_s: float) -> bool:
        """Both directions were measured by real traffic within *within_s*."""
        now = time.monotonic()
        return now - self.up.last_at < within_s and now - self.down.last_at < within_s

    # --- the estimate --------------------------------------------------------------------
    def estimate(self) -> m.Link:
        """Measured figures where there are some, else the configured hints."""
        hints = self.hints
        if not self.measure:
            return m.Link(rtt_ms=hints.rtt_ms, up_mbps=hints.up_mbps, down_mbps=hints.down_mbps)
        self._pipelined_sample()
        rtt = self.meter.rtt_ms() if self.meter is not None else None
        up, down = self.up.median(), self.down.median()
        return m.Link(rtt_ms=rtt if rtt is not None else hints.rtt_ms,
                      up_mbps=up if up is not None else hints.up_mbps,
                      down_mbps=down if down is not None else hints.down_mbps)


class Prober:
    """The periodic probe pair (sink, then echo), at most every ``interval_s``."""

    def __init__(self, links: Links, send: Callable[[int, int, bool], tuple[float, Any] | None],
                 ack_time: Callable[[Any], float | None], interval_s: float = 60.0, nbytes: int = 32 * 1024,
                 timeout_s: float = 5.0) -> None:
        self.links, self.send, self.ack_time = links, send, ack_time
        self.interval_s, self.nbytes, self.timeout_s = interval_s, nbytes, timeout_s
        self.probes = 0
        self._echo: dict[int, float] = {}
        self._cond = threading.Condition()
        self._request = 0
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        if self.interval_s <= 0 or self.nbytes <= 0:
            return
        self._thread = threading.Thread(target=self._run, args=(stop,), name="link-probe", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 1.0) -> None:
        if self._thread is not None:
            with self._cond:
                self._cond.notify_all()
            self._thread.join(timeout)

    def echo(self, request: int, t: float | None = None) -> None:
        """Our own probe came back (inbound thread)."""
        with self._cond:
            self._echo[request] = time.monotonic() if t is None else t
            self._cond.notify_all()

    def _run(self, stop: threading.Event) -> None:
        # A first probe soon after start: the planner's first plans should not run on hints.
        wait = min(5.0, self.interval_s)
        while not stop.wait(wait):
            wait = self.interval_s
            if self.links.fresh(self.interval_s):
                continue
            try:
                self.probe_once(stop)
            except Exception:  # a failed probe must not end the thread
                log.exception("link probe failed")

    def probe_once(self, stop: threading.Event | None = None) -> bool:
        """Send one probe pair and record what it measured; False if nothing was measured."""
        to_ack = self._time_to_ack(stop)
        if to_ack is None:
            return False  # without the way up, the echo's round trip cannot be split
        up_s = max(to_ack - self.links.base_rtt_ms() / 1000.0, 0.0)
        back = self._round_trip(stop)  # base RTT + up + down, so less the sink's time to PUBACK it is the way down
        down_s = None if back is None else max(back - to_ack, PROBE_DOWN_FLOOR_S)
        self.links.add_probe(self.nbytes, up_s, down_s)
        self.probes += 1
        log.debug("link probe: %d bytes up %s ms, down %s ms", self.nbytes, _ms(up_s), _ms(down_s))
        return True

    def _time_to_ack(self, stop: threading.Event | None) -> float | None:
        """The sink message: seconds from publish to its PUBACK (base RTT + the way up)."""
        sent = self.send(self._next(), self.nbytes, False)
        if sent is None:
            return None
        t0, key = sent
        deadline = t0 + self.timeout_s
        acked = self.ack_time(key)
        while acked is None and time.monotonic() < deadline and not (stop and stop.is_set()):
            time.sleep(0.002)
            acked = self.ack_time(key)
        if acked is None:
            log.debug("link probe: no PUBACK within %.1f s", self.timeout_s)
            return None
        return acked - t0

    def _round_trip(self, stop: threading.Event | None) -> float | None:
        """The echo message: seconds from publish until its copy came back."""
        request = self._next()
        sent = self.send(request, self.nbytes, True)
        if sent is None:
            return None
        t0 = sent[0]
        deadline = t0 + self.timeout_s
        with self._cond:
            while request not in self._echo and time.monotonic() < deadline and not (stop and stop.is_set()):
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            back = self._echo.pop(request, None)
        if back is None:
            log.debug("link probe %d not echoed within %.1f s", request, self.timeout_s)
            return None
        return back - t0

    def _next(self) -> int:
        with self._cond:
            self._request += 1
            return self._request


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"
