"""The receiving end: a persistent-session QoS 1 subscriber that records every result.

It subscribes to what the coordinator subscribes to (status, telemetry,
placement reports, results) plus the acks of the devices it is told about,
validates each payload with the protocol's own schema, and records every
result as (device, seq, arrival time), every status and ack with its arrival
time, and the newest telemetry and report per device. It reconnects quickly
(0.2-1 s) so that it is never the slowest part of a recovery.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from lepton.protocol import Topics, decode

from .accounting import Arrival, DeliveryReport, Expected, analyse, expected_sets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusEvent:
    """A device status message as seen by the counter."""

    t: float  # time.monotonic()
    device: str
    state: str
    reason: str
    retained: bool


class ResultCounter:
    """Count results by (device, seq) at the receiving end."""

    def __init__(self, host: str, port: int, prefix: str, devices: Iterable[str] = (), client_id: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "", username: str = "",
                 password: str = "") -> None:
        self.topics = Topics(prefix)
        self.devices = list(devices)
        self._acks: list[tuple[float, str, int]] = []  # (monotonic, device, seq)
        self.telemetry: dict[str, Any] = {}  # device -> newest Telemetry message
        self.reported: dict[str, Any] = {}  # device -> newest Reported message
        self._coordinator: list[tuple[float, str, bool]] = []  # (monotonic, "online"/"offline", retained)
        self.client_id = client_id or f"lxf-counter-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._statuses: list[StatusEvent] = []
        self.invalid: list[str] = []  # reasons of payloads that failed validation
        self.connects = 0
        self.disconnects = 0
        self._subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        c.reconnect_delay_set(min_delay=0.2, max_delay=1)
        c.max_queued_messages_set(0)
        if tls_ca:
            c.tls_set(ca_certs=tls_ca, certfile=tls_cert or None, keyfile=tls_key or None,
                      cert_reqs=ssl.CERT_REQUIRED)
        if username:
            c.username_pw_set(username, password or None)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        self.client = c
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> "ResultCounter":
        """Connect, subscribe, and return once the broker has granted the subscription."""
        self.client.connect_async(self.host, self.port, keepalive=5)
        self.client.loop_start()
        self.client._thread.name = f"counter-{self.client_id}"  # paho names it generically
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"result counter could not subscribe at {self.host}:{self.port} within {timeout}s")
        return self

    def stop(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # --- paho callbacks: tiny, never raise ---------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("counter connect refused: %s", reason_code)
            return
        self.connects += 1
        # Subscribe every time: a broker without persistence forgot the session.
        subs = self.topics.coordinator_subscriptions() + [(self.topics.acks(d), 1) for d in self.devices]
        subs.append((self.topics.coordinator_status(), 1))
        client.subscribe(subs)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.disconnects += 1

    def _on_message(self, client, userdata, msg) -> None:
        now, wall = time.monotonic(), time.time()
        try:
            parsed = self.topics.parse(msg.topic)
            message = decode(parsed.kind, msg.payload)
        except Exception as exc:  # a bad payload is recorded, never fatal here
            with self._lock:
                self.invalid.append(f"{msg.topic}: {exc}")
            return
        with self._lock:
            if parsed.kind == "results":
                self._arrivals.append(Arrival(message.device, message.seq, now, message.stream, wall,
                                              message.captured_at))
            elif parsed.kind == "status":
                self._statuses.append(StatusEvent(now, message.device, message.state, message.reason,
                                                  bool(msg.retain)))
            elif parsed.kind == "coordinator":
                self._coordinator.append((now, message.state, bool(msg.retain)))
            elif parsed.kind == "acks":
                self._acks.append((now, message.device, message.seq))
            elif parsed.kind == "telemetry":
                self.telemetry[message.device] = message
            elif parsed.kind == "reported":
                self.reported[message.device] = message

    # --- queries -----------------------------------------------------------------------
    def arrivals(self, device: str | None = None) -> list[Arrival]:
        """Every result so far, in arrival order (duplicates included)."""
        with self._lock:
            items = list(self._arrivals)
        return [a for a in items if device is None or a.device == device]

    def statuses(self, device: str | None = None) -> list[StatusEvent]:
        with self._lock:
            items = list(self._statuses)
        return [s for s in items if device is None or s.device == device]

    def seqs(self, device: str) -> set[int]:
        return {a.seq for a in self.arrivals(device)}

    def count(self, device: str | None = None) -> int:
        """Distinct (device, seq) received."""
        return len({(a.device, a.seq) for a in self.arrivals(device)})

    def report(self, expected: Expected | None = None) -> DeliveryReport:
        return analyse(self.arrivals(), expected)

    def first_after(self, t: float, device: str | None = None) -> Arrival | None:
        """The first arrival at or after monotonic time *t*."""
        return next((a for a in self.arrivals(device) if a.t >= t), None)

    def last_before(self, t: float, device: str | None = None) -> Arrival | None:
        """The last arrival before monotonic time *t*."""
        before = [a for a in self.arrivals(device) if a.t < t]
        return before[-1] if before else None

    def outage(self, fault_at: float, restored_at: float, device: str | None = None) -> dict[str, float | None]:
        """One outage as the receiving end saw it (seconds, None where nothing was seen):

        ``silence_s`` last result before the fault to first after the restore;
        ``resume_s`` restore to the first result after it; ``detect_s`` fault
        to the device's live "offline" status (its last will), when *device* is
        given and the broker noticed before the restore (a will published when
        the device comes back and takes over its old session is not detection).
        """
        last, first = self.last_before(fault_at, device), self.first_after(restored_at, device)
        offline = None
        if device is not None:
            offline = next((s for s in self.statuses(device) if s.state == "offline"
                            and fault_at <= s.t < restored_at and not s.retained), None)
        return {
            "silence_s": round(first.t - last.t, 3) if first and last else None,
            "resume_s": round(first.t - restored_at, 3) if first else None,
            "detect_s": round(offline.t - fault_at, 3) if offline else None,
        }

    def wait_for(self, expected: Expected, timeout: float) -> float:
        """Wait until every expected (device, seq) arrived.

        Returns the arrival time (time.monotonic()) of the last of them to
        arrive first, i.e. when the receiving end became complete, whenever
        this was called. TimeoutError lists how many are still missing per device.
        """
        deadline = time.monotonic() + timeout
        while True:
            first: dict[tuple[str, int], float] = {}
            for a in self.arrivals():
                first.setdefault((a.device, a.seq), a.t)
            seen: dict[str, set[int]] = {}
            for dev, seq in first:
                seen.setdefault(dev, set()).add(seq)
            want = expected_sets(expected, seen)
            missing = {d: len(s - seen.get(d, set())) for d, s in want.items()}
            if not any(missing.values()):
                return max((first[(d, q)] for d, s in want.items() for q in s), default=time.monotonic())
            if time.monotonic() > deadline:
                raise TimeoutError(f"results still missing after {timeout}s: {missing}")
            time.sleep(0.02)

    def wait_count(self, n: int, timeout: float, device: str | None = None) -> float:
        """Wait until *n* distinct results arrived (of *device*, or in all)."""
        deadline = time.monotonic() + timeout
        while self.count(device) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count(device)} of {n} results after {timeout}s")
            time.sleep(0.02)
        return time.monotonic()

    def wait_new(self, after: float, n: int, timeout: float, devices: Iterable[str] | None = None) -> float:
        """Wait until each device has *n* new results since monotonic time *after* (seqs above
        the highest it had sent before then: fresh production, not re-sends). Returns the time."""
        devices = list(devices) if devices is not None else self.devices
        if not devices:
            raise ValueError("wait_new needs devices (pass devices= here or to the counter)")
        deadline = time.monotonic() + timeout
        while True:
            items = self.arrivals()
            short = {}
            for dev in devices:
                before = max((a.seq for a in items if a.device == dev and a.t < after), default=0)
                fresh = len({a.seq for a in items if a.device == dev and a.t >= after and a.seq > before})
                if fresh < n:
                    short[dev] = fresh
            if not short:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"new results (of {n}) per device after {timeout}s: {short}")
            time.sleep(0.05)

    def wait_status(self, device: str, state: str, timeout: float, after: float = 0.0,
                    live_only: bool = True) -> StatusEvent:
        """Wait for a status *state* ("online"/"offline") of *device* seen at or after *after*.

        *live_only*: ignore retained copies the broker replays on (re)subscribe;
        only a status published while the counter listened says when it happened.
        """
        deadline = time.monotonic() + timeout
        while True:
            for s in self.statuses(device):
                if s.state == state and s.t >= after and not (live_only and s.retained):
                    return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {state!r} status from {device} within {timeout}s")
            time.sleep(0.02)

    def acked(self, device: str) -> int:
        """The highest contiguous seq the coordinator has acknowledged to *device* (0: none seen)."""
        with self._lock:
            return max((seq for _, d, seq in self._acks if d == device), default=0)

    def acked_at(self, device: str, seq: int) -> float | None:
        """When the first ack covering *seq* for *device* arrived (time.monotonic()), or None."""
        with self._lock:
            return next((t for t, d, s in self._acks if d == device and s >= seq), None)

    def wait_acked(self, expected: Expected, timeout: float) -> float:
        """Wait until each device's ack reached the highest seq in *expected*: an int is that seq, an
        iterable (e.g. ``Fleet.produced()``'s ranges) its highest member (nothing to wait for when empty).

        Returns when the last of the covering acks arrived (time.monotonic()).
        """
        unknown = set(expected) - set(self.devices)
        if unknown:
            raise ValueError(f"counter does not watch acks of {sorted(unknown)}: pass devices=")
        upto = {d: n if isinstance(n, int) else max(n, default=0) for d, n in expected.items()}
        deadline = time.monotonic() + timeout
        while True:
            behind = {d: (self.acked(d), n) for d, n in upto.items() if self.acked(d) < n}
            if not behind:
                times = [self.acked_at(d, n) for d, n in upto.items() if n > 0]
                return max((t for t in times if t is not None), default=time.monotonic())
            if time.monotonic() > deadline:
                raise TimeoutError(f"acks (have, want) still behind after {timeout}s: {behind}")
            time.sleep(0.02)

    def coordinator_state(self) -> str:
        """The coordinator's newest retained status ("online", "offline", or "" if none seen)."""
        with self._lock:
            return self._coordinator[-1][1] if self._coordinator else ""

    def seen_coordinator(self, state: str, after: float = 0.0, live_only: bool = True) -> bool:
        """Whether a coordinator status *state* arrived at or after monotonic time *after* (see wait_status)."""
        with self._lock:
            return any(s == state and t >= after and not (live_only and r) for t, s, r in self._coordinator)

    def seen_status(self, device: str, state: str, after: float = 0.0, live_only: bool = True) -> bool:
        """Whether *device* published status *state* at or after monotonic time *after* (see wait_status)."""
        return any(s.state == state and s.t >= after and not (live_only and s.retained)
                   for s in self.statuses(device))
