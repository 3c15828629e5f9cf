"""Socket options shared by every MQTT client of the fleet."""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger(__name__)


def nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: send small writes at once (TCP_NODELAY).

    paho leaves Nagle on. A message that ends in a part-filled segment then
    waits for the peer's delayed ACK (40 ms on Linux): an offload round trip
    took 20 or 60 ms at random on a shaped link until this was set.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError, ValueError) as exc:  # not TCP (a websocket wrapper, a unix socket)
        log.debug("TCP_NODELAY not set: %s", exc)
