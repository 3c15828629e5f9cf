"""The MQTT topic tree (v1). The only module that spells a topic.

    {prefix}/devices/{id}/status                     device -> all, QoS 1, retained
    {prefix}/devices/{id}/telemetry                  device -> coordinator, QoS 0
    {prefix}/devices/{id}/placement/desired          coordinator -> device, QoS 1, retained
    {prefix}/devices/{id}/placement/reported         device -> coordinator, QoS 1, retained
    {prefix}/devices/{id}/results/{stream}           device -> all, QoS 1
    {prefix}/devices/{id}/offload/{target}/{model}   device -> target device, QoS 1
    {prefix}/devices/{id}/replies/{origin}           serving device -> origin, QoS 1
    {prefix}/devices/{id}/acks                       coordinator -> device, QoS 1
    {prefix}/coordinator/status                      coordinator -> all, QoS 1, retained
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lepton.errors import ProtocolError

DEFAULT_PREFIX = "lepton/v1"

# Ids travel inside topics: no MQTT wildcards, no separators, bounded length.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

QOS = {
    "status": 1,
    "telemetry": 0,
    "desired": 1,
    "reported": 1,
    "results": 1,
    "offload": 1,
    "replies": 1,
    "acks": 1,
    "probe": 1,
    "coordinator": 1,
}
RETAINED = frozenset({"status", "desired", "reported", "coordinator"})


def check_id(value: str, what: str = "id") -> str:
    """Return *value* if it is a valid device, stream or model id, else raise ProtocolError."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ProtocolError(
            f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ . - (no '/', '+', '#'), starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Parsed:
    """What a received topic says: its kind and the ids in it."""

    kind: str
    device: str = ""
    stream: str = ""
    target: str = ""
    model: str = ""
    origin: str = ""


@dataclass(frozen=True)
class Topics:
    """Builds and parses topics under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ProtocolError(f"invalid topic prefix {self.prefix!r}")

    def _dev(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_id(device, 'device id')}"

    # --- topics a message is published on -------------------------------
    def status(self, device: str) -> str:
        return f"{self._dev(device)}/status"

    def telemetry(self, device: str) -> str:
        return f"{self._dev(device)}/telemetry"

    def desired(self, device: str) -> str:
        return f"{self._dev(device)}/placement/desired"

    def reported(self, device: str) -> str:
        return f"{self._dev(device)}/placement/reported"

    def result(self, device: str, stream: str) -> str:
        return f"{self._dev(device)}/results/{check_id(stream, 'stream id')}"

    def offload(self, origin: str, target: str, model: str) -> str:
        return f"{self._dev(origin)}/offload/{check_id(target, 'device id')}/{check_id(model, 'model name')}"

    def reply(self, server: str, origin: str) -> str:
        return f"{self._dev(server)}/replies/{check_id(origin, 'device id')}"

    def probe(self, device: str) -> str:
        """The link probe sink: nobody subscribes; the broker's PUBACK times the device's upload."""
        return f"{self._dev(device)}/probe"

    def acks(self, device: str) -> str:
        return f"{self._dev(device)}/acks"

    def coordinator_status(self) -> str:
        return f"{self.prefix}/coordinator/status"

    # --- subscription filters --------------------------------------------
    def device_subscriptions(self, device: str) -> list[tuple[str, int]]:
        """What an agent subscribes to: only what is addressed to it."""
        p, d = self.prefix, check_id(device, "device id")
        return [
            (self.desired(d), 1),
            (self.acks(d), 1),
            (f"{p}/devices/+/offload/{d}/+", 1),
            (f"{p}/devices/+/replies/{d}", 1),
            (self.coordinator_status(), 1),
        ]

    def coordinator_subscriptions(self) -> list[tuple[str, int]]:
        """What the coordinator subscribes to."""
        p = self.prefix
        return [
            (f"{p}/devices/+/status", 1),
            (f"{p}/devices/+/telemetry", 0),
            (f"{p}/devices/+/placement/reported", 1),
            (f"{p}/devices/+/results/+", 1),
        ]

    def all_results(self) -> str:
        return f"{self.prefix}/devices/+/results/+"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def everything(self) -> str:
        return f"{self.prefix}/#"

    # --- parsing ----------------------------------------------------------
    def parse(self, topic: str) -> Parsed:
        """Split a received topic into its kind and ids; ProtocolError if it is not ours."""
        if not topic.startswith(self.prefix + "/"):
            raise ProtocolError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(self.prefix) + 1 :].split("/")
        if parts == ["coordinator", "status"]:
            return Parsed("coordinator")
        if len(parts) < 3 or parts[0] != "devices" or not ID_PATTERN.match(parts[1]):
            raise ProtocolError(f"unknown topic {topic!r}")
        dev, rest = parts[1], parts[2:]
        for part in rest[1:]:
            if not ID_PATTERN.match(part):
                raise ProtocolError(f"invalid id {part!r} in topic {topic!r}")
        if rest in (["status"], ["telemetry"], ["acks"], ["probe"]):
            return Parsed(rest[0], device=dev)
        if rest in (["placement", "desired"], ["placement", "reported"]):
            return Parsed(rest[1], device=dev)
        if len(rest) == 2 and rest[0] == "results":
            return Parsed("results", device=dev, stream=rest[1])
        if len(rest) == 2 and rest[0] == "replies":
            return Parsed("replies", device=dev, origin=rest[1])
        if len(rest) == 3 and rest[0] == "offload":
            return Parsed("offload", device=dev, target=rest[1], model=rest[2])
        raise ProtocolError(f"unknown topic {topic!r}")
