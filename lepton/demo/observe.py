"""What the demo sees: an MQTT subscriber on the whole tree plus the coordinator's last plan.

Everything shown comes from the same places an operator would look: the
topic tree (what `mosquitto_sub` shows on the prefix) and the
coordinator's database (as `lepton status` reads it).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from lepton.errors import LeptonError
from lepton.protocol import Topics, decode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)


@dataclass
class StreamView:
    origin: str
    stream: str
    model: str = ""
    results: int = 0
    computed_on: Counter = field(default_factory=Counter)
    last_at: float = 0.0
    last_output: str = ""
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=50))
    correct: int = 0
    judged: int = 0

    def p50_ms(self) -> float | None:
        values = sorted(self.latency_ms)
        return values[len(values) // 2] if values else None


@dataclass
class DeviceView:
    id: str
    state: str = "unknown"
    role: str = ""
    outbox: int | None = None
    models: dict = field(default_factory=dict)  # reported: name -> state
    timings: dict = field(default_factory=dict)  # telemetry: name -> p50 ms
    generation: int | None = None


def summarise_output(output: dict) -> str:
    """One short phrase for a result's output."""
    if "top" in output and output["top"]:
        best = output["top"][0]
        return f"{best.get('label', best.get('index'))} ({best.get('score', 0):.2f})"
    if "anomaly" in output:
        return f"{'FAULT' if output['anomaly'] else 'normal'} (score {output.get('score', 0):.2f})"
    return "raw"


class Observer:
    """Subscribes to the tree and keeps a live picture of the fleet."""

    def __init__(self, host: str, port: int, prefix: str, db_path: Path):
        self.topics, self.db_path = Topics(prefix), db_path
        self.lock = threading.Lock()
        self.devices: dict[str, DeviceView] = {}
        self.streams: dict[tuple[str, str], StreamView] = {}
        self.desired_count = 0
        self.events: deque[tuple[float, str]] = deque(maxlen=8)
        self.coordinator = "unknown"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lepton-demo-view-{port}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(self.topics.everything(), 1)
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def note(self, text: str) -> None:
        with self.lock:
            self.events.append((time.time(), text))

    def _on_message(self, client, userdata, msg) -> None:
        try:
            where = self.topics.parse(msg.topic)
            if where.kind in ("offload", "acks") or not msg.payload:
                return
            message = decode(where.kind, msg.payload)
        except LeptonError:
            return  # the coordinator logs bad payloads; the view just skips them
        with self.lock:
            self._apply(where.device, message)

    def _device(self, device: str) -> DeviceView:
        return self.devices.setdefault(device, DeviceView(device))

    def _apply(self, device: str, msg) -> None:
        if isinstance(msg, m.Status):
            view = self._device(device)
            if view.state != msg.state:
                self.events.append((time.time(), f"{device} is {msg.state}" + (f" ({msg.reason})" if msg.reason else "")))
            view.state = msg.state
        elif isinstance(msg, m.Telemetry):
            view = self._device(device)
            view.outbox = msg.outbox_depth
            view.timings = {k: t.p50_ms for k, t in msg.models.items()}
        elif isinstance(msg, m.Reported):
            view = self._device(device)
            view.models = {k: s.state for k, s in msg.models.items()}
        elif isinstance(msg, m.Desired):
            self.desired_count += 1
            self._device(device).generation = msg.generation
        elif isinstance(msg, m.Result):
            self._result(msg)
        elif isinstance(msg, m.CoordinatorStatus):
            self.coordinator = msg.state

    def _result(self, msg: m.Result) -> None:
        view = self.streams.setdefault((msg.device, msg.stream), StreamView(msg.device, msg.stream))
        view.model = msg.model.name
        view.results += 1
        view.computed_on[msg.computed_on] += 1
        view.last_at = time.time()
        view.last_output = summarise_output(msg.output)
        view.latency_ms.append(max(0.0, (view.last_at - msg.captured_at) * 1000))
        truth = (msg.output.get("source") or {}).get("truth")
        top = (msg.output.get("top") or [{}])[0]
        if truth is not None and "label" in top:
            view.judged += 1
            view.correct += int(str(top["label"]) == str(truth))

    def last_plan(self) -> dict | None:
        """The coordinator's newest plan (read-only; None before the first)."""
        if not self.db_path.exists():
            return None
        try:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=1)
            try:
                row = con.execute("SELECT id, ts, trigger, path, objective, solve_s, plan FROM plans "
                                  "ORDER BY id DESC LIMIT 1").fetchone()
                count = con.execute("SELECT count(*) FROM plans").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return None
        if not row:
            return None
        plan = json.loads(row[6] or "{}")
        return {"id": row[0], "ts": row[1], "trigger": row[2], "path": row[3], "objective": row[4],
                "solve_s": row[5], "routes": plan.get("routes", {}), "unserved": plan.get("unserved", {}),
                "placement": plan.get("placement", {}), "count": count}
