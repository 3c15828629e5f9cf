"""Plain MQTT clients for the tests themselves: fuzzers, spoofers, ACL probes.

``connect`` returns a paho client whose network thread is running and whose
CONNACK has arrived (or raises ``ConnectRefused`` with the broker's reason,
``TimeoutError`` when nothing answered): a test can tell "refused" from
"unreachable" from "accepted".
"""

from __future__ import annotations

import ssl
import threading

import paho.mqtt.client as mqtt


class ConnectRefused(ConnectionError):
    """The broker answered CONNECT with a failure reason code (or closed the TLS handshake)."""


def connect(host: str, port: int, client_id: str, clean_session: bool = True, timeout: float = 10.0,
            tls_ca: str = "", tls_cert: str = "", tls_key: str = "", username: str = "", password: str = "",
            keepalive: int = 10) -> mqtt.Client:
    """A connected MQTT 3.1.1 client with its loop started; ``client.disconnect(); client.loop_stop()`` to end."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    if tls_ca:
        client.tls_set(ca_certs=tls_ca, certfile=tls_cert or None, keyfile=tls_key or None,
                       cert_reqs=ssl.CERT_REQUIRED)
    if username:
        client.username_pw_set(username, password or None)
    answered = threading.Event()
    outcome: dict = {}

    def on_connect(c, userdata, flags, reason_code, properties=None) -> None:
        outcome["rc"] = reason_code
        answered.set()

    def on_disconnect(c, userdata, flags, reason_code, properties=None) -> None:
        outcome.setdefault("rc", reason_code)
        outcome.setdefault("closed", True)
        answered.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(host, port, keepalive=keepalive)
    except ssl.SSLError as exc:
        raise ConnectRefused(f"TLS handshake refused: {exc}") from None
    client.loop_start()
    if not answered.wait(timeout):
        client.loop_stop()
        raise TimeoutError(f"no CONNACK from {host}:{port} within {timeout}s")
    rc = outcome["rc"]
    if outcome.get("closed") or rc.is_failure:
        client.loop_stop()
        raise ConnectRefused(f"{client_id}: connection refused: {rc}")
    return client
