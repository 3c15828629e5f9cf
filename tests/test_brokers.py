"""The private brokers `lepton demo` and the tests start: Mosquitto and the embedded fallback."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from lepton.broker import MosquittoBroker, mosquitto_binary
from lepton.embedded_broker import EmbeddedBroker


def roundtrip(host: str, port: int) -> tuple[list[bytes], list[bytes]]:
    """Publish retained + QoS 1; return (live messages, retained seen by a late subscriber)."""
    live: list[bytes] = []
    done = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda c, u, msg: (live.append(msg.payload), len(live) >= 11 and done.set())
    sub.connect(host, port)
    sub.loop_start()
    sub.subscribe("t/#", 1)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect(host, port)
    pub.loop_start()
    import time

    time.sleep(0.3)
    pub.publish("t/status", b"online", qos=1, retain=True).wait_for_publish(5)
    for i in range(10):
        pub.publish("t/r", str(i).encode(), qos=1).wait_for_publish(5)
    done.wait(5)
    late: list[bytes] = []
    got = threading.Event()
    late_c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late")
    late_c.on_message = lambda c, u, msg: (late.append(msg.payload), got.set())
    late_c.connect(host, port)
    late_c.loop_start()
    late_c.subscribe("t/status", 1)
    got.wait(5)
    for c in (sub, pub, late_c):
        c.loop_stop()
        c.disconnect()
    return live, late


def test_mosquitto_broker_delivers_and_retains(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(tmp_path) as b:
        live, late = roundtrip(b.host, b.port)
    assert live[0] == b"online" and live[1:] == [str(i).encode() for i in range(10)]
    assert late == [b"online"]


def test_embedded_broker_delivers_and_retains(tmp_path):
    with EmbeddedBroker(tmp_path) as b:
        live, late = roundtrip(b.host, b.port)
    assert live[1:] == [str(i).encode() for i in range(10)]
    assert set(late) == {b"online"}  # amqtt may deliver a retained message twice


def test_mosquitto_restart_keeps_port_and_persisted_retained(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    b = MosquittoBroker(tmp_path, persistence=True).start()
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect(b.host, b.port)
        c.loop_start()
        c.publish("keep/me", b"1", qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        port = b.port
        time.sleep(3.0)  # past one save (every second; Mosquitto checks about once a second)
        b.kill()  # a crash, not a clean stop: the save must have kept it
        b.start()
        assert b.port == port
        got = []
        ev = threading.Event()
        c2 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c2.on_message = lambda cl, u, msg: (got.append(msg.payload), ev.set())
        c2.connect(b.host, b.port)
        c2.loop_start()
        c2.subscribe("keep/me", 1)
        ev.wait(5)
        c2.loop_stop()
        assert got == [b"1"]
    finally:
        b.stop()


def test_free_port_is_below_the_ephemeral_range_and_free():
    """A broker restarted on its port must find it free: no outgoing connection's local port (not even a
    client connecting to itself while nothing listens) can hold a port below the ephemeral range."""
    import socket

    from lepton.broker import _ephemeral_low, free_port

    low = _ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 10000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free, as promised
