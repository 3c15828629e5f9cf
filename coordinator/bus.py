"""The coordinator's MQTT connection.

A persistent session (clean_session False on MQTT 3.1.1, clean_start False +
session expiry on MQTT 5) so the broker queues results while the coordinator
is down; ``manual_ack`` so a PUBACK is sent only after ingest committed the
message. The retained ``coordinator/status`` says ``online`` on every connect
and the last will says ``offline``. paho's callbacks only enqueue: they must
never raise, since an exception there ends paho's network thread.

paho reconnects by itself; a connection that fails (refused, unreachable,
TLS, refused credentials) is logged once per change of reason, as the agent
does, and kept in ``last_error`` until the next accepted connection.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from lepton.brokerfiles import closed_unanswered, read_password, reason, refused, tls_context
from lepton.coordinator.ingest import Inbound
from lepton.sockets import nodelay
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)


class Bus:
    """One paho client: subscribes for the coordinator, PUBACKs for ingest, publishes for everyone."""

    def __init__(self, broker, topics: Topics, on_message: Callable[[Inbound], None], http_url: str = ""):
        self.cfg, self.topics, self.http_url = broker, topics, http_url
        self.on_message_cb = on_message
        self.on_connected: Callable[[], None] = lambda: None
        self.conn = 0  # connection generation, bumped on every successful connect
        self.connected = threading.Event()
        self.last_error = ""  # the logged line saying why the last attempt failed ("" while connected)
        self.reason = ""  # the same, short: "Connection refused", "refused the connection: Not authorized", ...
        self._answered = False  # a CONNACK (accept or refuse) arrived for the current attempt
        self._stopping = False
        v5 = broker.mqtt_version == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=broker.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        self._configure()

    def _configure(self) -> None:
        c, cfg = self.client, self.cfg
        c.max_inflight_messages_set(1000)  # acks and placements go out faster than paho's default of 20
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        if cfg.username:
            c.username_pw_set(cfg.username, read_password(cfg.password_file) or None)
        if cfg.tls_ca:
            c.tls_set_context(tls_context(cfg))  # ConfigError naming the key, never a traceback from ssl
        offline = m.CoordinatorStatus(state="offline", ts=time.time(), http=self.http_url)
        c.will_set(self.topics.coordinator_status(), encode(offline), qos=1, retain=True)
        c.on_socket_open = nodelay
        c.on_pre_connect = self._on_pre_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message

    def start(self) -> None:
        """Connect in the background: a broker that is not up yet is retried, never fatal."""
        props = None
        if self.cfg.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            props.ReceiveMaximum = 1000
        kwargs = {"clean_start": False, "properties": props} if props else {}
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, **kwargs)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Say offline (retained), then disconnect cleanly; the will is for crashes only."""
        self._stopping = True
        if self.connected.is_set():
            info = self.client.publish(
                self.topics.coordinator_status(),
                encode(m.CoordinatorStatus(state="offline", ts=time.time(), http=self.http_url)),
                qos=1,
                retain=True,
            )
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # --- used by ingest and the rebalancer ---------------------------------------
    def puback(self, mid: int, qos: int, conn: int) -> None:
        """Acknowledge a committed message, if it came on the live connection (else it is re-delivered)."""
        if conn == self.conn and self.connected.is_set():
            self.client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Queue a publish; paho sends it now or after the reconnect."""
        self.client.publish(topic, payload, qos=qos, retain=retain)

    # --- paho callbacks (network thread) ---------------------------------------------
    def _where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def _note_error(self, message: str, reason: str) -> None:
        # One line per change of reason, not one per retry.
        if message != self.last_error:
            log.error("%s; retrying every %g-%g s", message, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        self.last_error, self.reason = message, reason

    def _on_pre_connect(self, client, userdata) -> None:
        self._answered = False

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its ``except OSError`` around the connect: the exception is at hand.
        try:
            exc = sys.exc_info()[1]
            why = reason(exc) if exc else "connection failed"
            self._note_error(f"cannot connect to broker {self._where()}: {why}", why)
        except Exception:
            log.exception("on_connect_fail failed")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._answered = True
        if reason_code.is_failure:
            why = refused(reason_code)
            self._note_error(f"broker {self._where()} {why}", why)
            return
        self.conn += 1
        client.subscribe(self.topics.coordinator_subscriptions())
        online = m.CoordinatorStatus(state="online", ts=time.time(), http=self.http_url)
        client.publish(self.topics.coordinator_status(), encode(online), qos=1, retain=True)
        after = f" after: {self.last_error}" if self.last_error else ""
        log.info("connected to %s (session present: %s)%s", self._where(), flags.session_present, after)
        self.last_error = self.reason = ""
        try:  # first: the rebalancer restarts its liveness grace before it can see the session up
            self.on_connected()
        except Exception:  # never let a callback end paho's loop thread
            log.exception("on_connected hook failed")
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        try:
            if self._stopping:
                pass
            elif was_connected:
                # paho reports a dropped socket or a missed keepalive as "Unspecified error".
                why = "closed by the broker or the network, or keepalive expired" if reason_code.value == 128 else str(reason_code)
                log.warning("lost the broker connection %s (%s); reconnecting", self._where(), why)
                self.last_error = self.reason = f"lost the connection ({why})"
            elif not self._answered:
                why = closed_unanswered(bool(self.cfg.tls_ca), "the coordinator's")
                self._note_error(f"broker {self._where()} {why}", why)
        except Exception:
            log.exception("on_disconnect failed")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            # A topic that is not UTF-8 still reaches ingest, which refuses it, logs it and PUBACKs it.
            topic = msg._topic.decode("utf-8", "replace") if isinstance(msg._topic, bytes) else str(msg.topic)
            self.on_message_cb(Inbound(topic, msg.payload, msg.qos, msg.mid, self.conn))
        except Exception:
            log.exception("could not queue a message (mid %s)", getattr(msg, "mid", "?"))

