"""Protocol-level device stand-ins for the coordinator tests, and a coordinator runner.

A ``StandIn`` is a real paho client speaking the v1 protocol as an agent
would: birth with capabilities and streams, a last will, telemetry, results,
reported placement; it records the acks and desired placements it receives.
``CoordinatorProcess`` runs ``lepton coordinator`` as a real subprocess.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_for  # noqa: F401 (the coordinator tests import it from here)

from lepton.broker import free_port
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

MODEL = m.ModelId(name="digits", version="1.0.0", sha256="ab" * 32)


class StandIn:
    """One device, as the coordinator sees it on the wire."""

    def __init__(self, port: int, topics: Topics, device: str, streams=(), keepalive: int = 10,
                 cpu: int = 4, memory_mb: float = 2048, link: dict | None = None, models=()):
        self.port, self.topics, self.device, self.keepalive = port, topics, device, keepalive
        self.streams = [m.StreamInfo(**s) if isinstance(s, dict) else s for s in streams]
        self.caps = m.Capabilities(cpu_count=cpu, memory_mb=memory_mb, arch="x86_64", runtime="ai-edge-litert",
                                   runtime_version="2", cpu_share=cpu, models=list(models), link=link or {})
        self.acks: list[int] = []
        self.desired: list[m.Desired] = []
        self.lock = threading.Lock()
        self.up = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        will = m.Status(device=device, state="offline", ts=time.time(), reason="last will")
        self.client.will_set(topics.status(device), encode(will), qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect

    def _on_connect(self, client, userdata, flags, rc, props):
        client.subscribe([(self.topics.acks(self.device), 1), (self.topics.desired(self.device), 1)])
        self.birth()
        self.up.set()

    def _on_message(self, client, userdata, msg):
        kind = self.topics.parse(msg.topic).kind
        with self.lock:
            if kind == "acks":
                self.acks.append(decode("acks", msg.payload).seq)
            elif kind == "desired":
                self.desired.append(decode("desired", msg.payload))

    def connect(self) -> "StandIn":
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        assert self.up.wait(10), f"{self.device} could not connect"
        return self

    def birth(self, streams=None) -> None:
        if streams is not None:
            self.streams = [m.StreamInfo(**s) if isinstance(s, dict) else s for s in streams]
        msg = m.Status(device=self.device, state="online", ts=time.time(), capabilities=self.caps,
                       streams=self.streams, agent_version="standin")
        self.client.publish(self.topics.status(self.device), encode(msg), qos=1, retain=True)

    def telemetry(self, models: dict | None = None, link: dict | None = None) -> None:
        timings = {k: m.ModelTiming(p50_ms=v, p95_ms=v, count=10) for k, v in (models or {}).items()}
        msg = m.Telemetry(device=self.device, ts=time.time(), models=timings, link=m.Link(**(link or {})))
        self.client.publish(self.topics.telemetry(self.device), encode(msg), qos=0)

    def result(self, seq: int, floor: int = 1, stream: str = "cam") -> mqtt.MQTTMessageInfo:
        now = time.time()
        r = m.Result(device=self.device, stream=stream, seq=seq, floor=floor, model=MODEL, captured_at=now,
                     inferred_at=now, infer_ms=1.0, computed_on=self.device, output={"top": [{"index": seq % 10}]})
        return self.client.publish(self.topics.result(self.device, stream), encode(r), qos=1)

    def report(self, generation: int, models: dict) -> None:
        states = {k: m.ModelState(**v) for k, v in models.items()}
        msg = m.Reported(device=self.device, generation=generation, ts=time.time(), models=states)
        self.client.publish(self.topics.reported(self.device), encode(msg), qos=1, retain=True)

    def last_ack(self) -> int:
        with self.lock:
            return self.acks[-1] if self.acks else 0

    def last_desired(self) -> m.Desired | None:
        with self.lock:
            return self.desired[-1] if self.desired else None

    def freeze(self) -> None:
        """Go silent without closing the socket, as a partitioned device does: the broker
        fires the last will only after 1.5 x keepalive."""
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def coordinator_config(tmp: Path, broker_port: int, prefix: str, **sections) -> Path:
    """Write a coordinator TOML for a test; *sections* override whole tables' keys."""
    cfg = {
        "prefix": prefix,
        "broker": {"port": broker_port, "keepalive": 5, "client_id": f"coord-{prefix.split('/')[0]}"},
        "db": {"path": str(tmp / "coordinator.db")},
        "http": {"port": 0},
        "planner": {"interval_s": 3600, "time_limit_s": 2},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = tmp / "coordinator.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


class CoordinatorProcess:
    """``lepton coordinator --config FILE`` as a subprocess, with its log kept."""

    def __init__(self, config: Path, env: dict | None = None):
        self.config, self.env = config, env or {}
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "CoordinatorProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lepton.cli", "coordinator", "--config", str(self.config)],
                                         stdout=log, stderr=log, env=env, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def db_rows(path: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(path, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def test_standin_speaks_valid_protocol():
    """The stand-in's own messages pass the protocol's validation (else the other tests prove nothing)."""
    topics = Topics("t/v1")
    dev = StandIn(free_port(), topics, "dev-1", streams=[{"id": "cam", "model": "digits", "rate_hz": 5, "payload_bytes": 100}])
    status = m.Status(device="dev-1", state="online", ts=1.0, capabilities=dev.caps, streams=dev.streams)
    assert decode("status", encode(status)).streams[0].id == "cam"


def serve(argv: list[str]) -> None:
    """Run one stand-in until killed: ``python tests/test_coordinator_standins.py PORT PREFIX DEVICE KEEPALIVE CPU MODEL_MS``.

    Sends its birth, then telemetry every 0.5 s; prints "up" once connected.
    """
    port, prefix, device, keepalive, cpu, model_ms = argv
    dev = StandIn(int(port), Topics(prefix), device, keepalive=int(keepalive), cpu=int(cpu),
                  link={"up_mbps": 100, "down_mbps": 100, "rtt_ms": 1})
    dev.connect()
    print("up", flush=True)
    while True:
        dev.telemetry(models={"digits": float(model_ms)})
        time.sleep(0.5)


if __name__ == "__main__":
    serve(sys.argv[1:])
