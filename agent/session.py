"""The agent's MQTT session: one connection at a time, kept up by our own loop.

Each connection is a fresh paho client (MQTT 3.1.1, or 5 when configured)
with ``reconnect_on_failure=False``: when it drops, the supervisor thread
waits a capped exponential backoff with jitter and connects a new one. A
fresh client carries no messages of the old connection, so after a reconnect
only the outbox decides what is sent again, in seq order.

On every connect: the birth message (retained ``online`` + capabilities) and
the subscriptions, from the network thread so nothing can slip in between.
The last will says ``offline`` (retained). paho's callbacks only hand things
over (a queue, an event): an exception there would end its network thread.
Deliveries are tracked by ``on_publish(mid)``, never by return codes.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from lepton.agent.config import BrokerConfig
from lepton.brokerfiles import closed_unanswered, read_password, reason, refused, tls_context
from lepton.sockets import nodelay
from lepton.protocol import Topics

log = logging.getLogger(__name__)

STABLE_S = 10.0  # a connection that held this long resets the backoff
JITTER = 0.25  # each wait is scaled by a random factor in [1 - JITTER, 1 + JITTER]


@dataclass(frozen=True)
class Outgoing:
    """A message to publish."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class Backoff:
    """Capped exponential delays with jitter, so a fleet does not reconnect in lockstep."""

    def __init__(self, first_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.first_s, self.max_s = first_s, max(max_s, first_s)
        self._next = first_s
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The wait before the next attempt (never above the cap)."""
        base = self._next
        self._next = min(self._next * 2, self.max_s)
        return min(self.max_s, base * self._rng.uniform(1 - JITTER, 1 + JITTER))

    def reset(self) -> None:
        self._next = self.first_s


class LinkMeter:
    """RTT and upload capacity from our own QoS 1 publishes (publish() to PUBACK).

    RTT is the lowest publish->PUBACK time in the window (queueing only ever
    adds to it). Upload capacity is measured only while the link is pipelined
    (two or more messages in flight, e.g. a re-send after an outage): bytes
    acknowledged per second of such time. A trickle of small results says
    more about RTT than about capacity, so it is not counted.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._sent: dict[tuple[int, int], tuple[float, int]] = {}  # (generation, mid) -> (t, bytes)
        self._early: dict[tuple[int, int], float] = {}  # PUBACKs that beat publish() returning
        self._rtts: deque[tuple[float, float]] = deque(maxlen=1024)
        self.window_s = window_s
        self.connect_ms: float | None = None
        self.bytes_acked = 0  # while pipelined
        self._recent: dict[tuple[int, int], float] = {}  # the last PUBACK times by key (the link probe reads them)
        self.busy_s = 0.0  # time pipelined
        self._busy_since: float | None = None

    def sent(self, key: tuple[int, int], nbytes: int, t: float) -> None:
        """A QoS 1 publish of *nbytes* was handed to the client at monotonic time *t*."""
        with self._lock:
            done = self._early.pop(key, None)
            if done is not None:
                self._rtts.append((done, (done - t) * 1000.0))
                return
            self._sent[key] = (t, nbytes)
            if len(self._sent) == 2:
                self._busy_since = t

    def ack_time(self, key: tuple[int, int]) -> float | None:
        """When the PUBACK for *key* arrived (monotonic), if it is among the last few; else None."""
        with self._lock:
            return self._recent.get(key)

    def acked(self, key: tuple[int, int], t: float) -> None:
        """The PUBACK for *key* arrived at monotonic time *t*."""
        with self._lock:
            self._recent[key] = t
            if len(self._recent) > 128:
                self._recent.pop(next(iter(self._recent)))
            start = self._sent.pop(key, None)
            if start is None:
                # QoS 0 publishes report here too and are never sent(): keep this small.
                if len(self._early) >= 256:
                    self._early.pop(next(iter(self._early)))
                self._early[key] = t
                return
            self._rtts.append((t, (t - start[0]) * 1000.0))
            if self._busy_since is not None:
                self.bytes_acked += start[1]
                if len(self._sent) < 2:
                    self.busy_s += t - self._busy_since
                    self._busy_since = None

    def reset(self) -> None:
        """A connection ended: what was in flight on it will never be acknowledged."""
        with self._lock:
            self._sent.clear()
            self._early.clear()
            if self._busy_since is not None:
                self.busy_s += time.monotonic() - self._busy_since
                self._busy_since = None

    def rtt_ms(self) -> float | None:
        """Lowest publish->PUBACK time in the window, else the TCP connect time."""
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            recent = [ms for t, ms in self._rtts if t >= cutoff]
        return min(recent) if recent else self.connect_ms

    def totals(self) -> tuple[int, float]:
        """(bytes acknowledged while pipelined, seconds pipelined) since start."""
        with self._lock:
            busy = self.busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
            return self.bytes_acked, busy


class Session:
    """Keeps one MQTT connection up; publishes for everyone; hands received messages to a queue."""

    def __init__(self, cfg: BrokerConfig, client_id: str, topics: Topics, device: str, will: Outgoing,
                 on_connect_messages: Callable[[], list[Outgoing]], window_s: float = 60.0) -> None:
        self.cfg, self.client_id, self.topics, self.device = cfg, client_id, topics, device
        self.will, self.on_connect_messages = will, on_connect_messages
        self.inbound: queue.SimpleQueue[tuple[str, bytes, bool]] = queue.SimpleQueue()  # (topic, payload, retained)
        self.events: queue.SimpleQueue[tuple] = queue.SimpleQueue()  # ("connected", gen), ("wake",)
        # PUBACKs as (generation, mid): appended here without waking anyone; a
        # reader that waits for one sets wake_on_puback to get a ("wake",) event.
        self.pubacks: deque[tuple[int, int]] = deque()
        self.wake_on_puback = False
        self.connected = threading.Event()
        self.generation = 0  # bumped on every accepted connection
        self.connects = 0
        self.last_error = ""
        self.link = LinkMeter(window_s)
        self._password = read_password(cfg.password_file)
        self._tls = tls_context(cfg) if cfg.tls_ca else None
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._lost = threading.Event()
        self._answered = False  # a CONNACK (accept or refuse) arrived on the current connection
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; a broker that is not up yet is retried, never fatal."""
        self._thread = threading.Thread(target=self._supervise, name="mqtt-session", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def close(self, last: list[Outgoing] = (), timeout: float = 3.0) -> None:
        """Publish *last* (e.g. the offline status) and wait for its PUBACK, then disconnect cleanly; at most
        *timeout* in all (a supervisor still connecting is left to end with the process)."""
        deadline = time.monotonic() + timeout
        self._halt.set()
        with self._lock:
            client = self._client
        if client is not None and self.connected.is_set():
            infos = [client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain) for m in last]
            for info in infos:
                try:
                    info.wait_for_publish(max(0.01, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    break
        if client is not None:
            client.disconnect()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    # --- publishing ---------------------------------------------------------------
    def publish(self, msg: Outgoing, generation: int | None = None) -> tuple[int, int] | None:
        """Queue *msg* on the live connection: (generation, mid), or None when not connected, or (with
        *generation*) when the live connection is not that one: an ordered sender (delivery) sends nothing on
        a new connection before it has handled its ``connected`` event."""
        with self._lock:  # client, generation and connected change together in _on_connect
            client, live, up = self._client, self.generation, self.connected.is_set()
        if client is None or not up or (generation is not None and generation != live):
            return None
        generation = live
        t0 = time.monotonic()
        info = client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish on %s refused by the client: %s", msg.topic, mqtt.error_string(info.rc))
            return None
        if msg.qos:
            self.link.sent((generation, info.mid), len(msg.payload), t0)
        return generation, info.mid

    # --- the supervisor -----------------------------------------------------------
    def _supervise(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while not self._halt.is_set():
            held = self._connect_once()
            if self._halt.is_set():
                break
            if held >= STABLE_S:
                backoff.reset()
            wait = backoff.next()
            log.debug("reconnecting to %s:%s in %.2f s", self.cfg.host, self.cfg.port, wait)
            self._halt.wait(wait)

    def _connect_once(self) -> float:
        """One connection from connect to loss; returns how long it was up (0 if it never was)."""
        client = self._new_client()
        self._lost.clear()
        started = time.monotonic()
        try:
            client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                           **({"clean_start": True} if self.cfg.mqtt_version == "5" else {}))
        except (OSError, ValueError) as exc:
            self._note_error(f"cannot connect to broker {self.cfg.host}:{self.cfg.port}: {reason(exc)}")
            return 0.0
        self.link.connect_ms = (time.monotonic() - started) * 1000.0
        with self._lock:
            self._client = client
        client.loop_start()
        self._lost.wait()
        up_since = self._up_since
        with self._lock:
            self._client = None
            self.connected.clear()
        client.disconnect()
        client.loop_stop()
        self.link.reset()
        return time.monotonic() - up_since if up_since else 0.0

    def _new_client(self) -> mqtt.Client:
        cfg = self.cfg
        v5 = cfg.mqtt_version == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=None if v5 else True, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             reconnect_on_failure=False)
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(65535)  # the outbox paces itself
        client.max_queued_messages_set(0)
        if cfg.username:
            client.username_pw_set(cfg.username, self._password or None)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_socket_open = nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._up_since = 0.0
        self._answered = False
        return client

    def _note_error(self, message: str) -> None:
        # One line per change of state, not one per retry.
        if message != self.last_error:
            log.error("%s; retrying every %g-%g s", message, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        self.last_error = message

    # --- paho callbacks (network thread): tiny, never raise ----------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._answered = True
        try:
            if reason_code.is_failure:
                self._note_error(f"broker {self.cfg.host}:{self.cfg.port} {refused(reason_code)}")
                self._lost.set()
                return
            for msg in self.on_connect_messages():
                client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            client.subscribe(self.topics.device_subscriptions(self.device))
            with self._lock:
                self.generation += 1
                generation = self.generation
                self.connected.set()
            self.connects += 1
            self._up_since = time.monotonic()
            if self.last_error:
                log.info("connected to broker %s:%s after: %s", self.cfg.host, self.cfg.port, self.last_error)
            else:
                log.info("connected to broker %s:%s", self.cfg.host, self.cfg.port)
            self.last_error = ""
            self.events.put(("connected", generation))
        except Exception:
            log.exception("on_connect failed")
            self._lost.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._halt.is_set():
            # paho reports a dropped socket or a missed keepalive as "Unspecified error".
            why = "closed by the broker or the network, or keepalive expired" if reason_code.value == 128 else reason_code
            log.warning("lost the broker connection (%s); reconnecting", why)
        elif not self._answered and not self._halt.is_set():
            why = closed_unanswered(self._tls, "this device's")
            self._note_error(f"broker {self.cfg.host}:{self.cfg.port} {why}")
        self.connected.clear()
        self._lost.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.inbound.put((msg.topic, msg.payload, bool(msg.retain)))
        except Exception:  # a topic that is not UTF-8: nothing of ours
            log.warning("dropped a message with an undecodable topic")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        t = time.monotonic()
        key = (self.generation, mid)
        self.link.acked(key, t)
        self.pubacks.append(key)
        if self.wake_on_puback:
            self.wake_on_puback = False
            self.events.put(("wake",))
