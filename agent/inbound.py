"""What arrives for this device: acks, desired placement, the coordinator's status,
inputs other devices offload here and the replies to ours.

paho's callback only queues ``(topic, payload)``; this thread validates each
message against its schema and hands it on. A payload that fails validation
is logged with device, topic and reason and dropped: it changes nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from lepton.errors import ProtocolError
from lepton.protocol import decode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)


class Inbound:
    """The dispatcher thread for one agent."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.invalid = 0
        self.ignored = 0
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._run, args=(stop,), name="inbound", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        inbox = self.agent.session.inbound
        while not stop.is_set():
            try:
                topic, payload, retained = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.handle(topic, payload, retained)
            except Exception:  # one message must never end the dispatcher
                log.exception("handling a message on %s failed", topic)

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Validate one message and act on it (*retained*: the broker's stored copy, not a live publish)."""
        agent = self.agent
        try:
            parsed = agent.topics.parse(topic)
            if parsed.kind == "offload":
                if parsed.target != agent.device:
                    raise ProtocolError(f"addressed to device {parsed.target!r}, this is {agent.device!r}")
                agent.offload_server.handle(parsed.device, parsed.model, payload)
                return
            msg = decode(parsed.kind, payload)
            if parsed.kind == "replies":
                if parsed.origin != agent.device:
                    raise ProtocolError(f"addressed to device {parsed.origin!r}, this is {agent.device!r}")
                agent.offload_client.on_reply(parsed.device, msg)  # the topic names the sender: the broker vouches
                return
            if parsed.kind in ("acks", "desired") and (parsed.device != agent.device or msg.device != agent.device):
                raise ProtocolError(f"addressed to device {msg.device!r}, this is {agent.device!r}")
        except ProtocolError as exc:
            self.invalid += 1
            log.warning("invalid message for device %s on %s: %s", agent.device, topic, exc)
            return
        if isinstance(msg, m.Ack):
            agent.delivery.ack(msg.seq)
        elif isinstance(msg, m.Desired):
            agent.apply_desired(msg)
        elif isinstance(msg, m.CoordinatorStatus):
            agent.delivery.coordinator_state(msg.state, live=not retained)
        else:
            self.ignored += 1
