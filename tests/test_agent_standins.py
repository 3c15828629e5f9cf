"""Helpers for the agent tests: the agent as a real subprocess, and a stand-in coordinator.

``Consumer`` is a real paho client that does what the coordinator promises:
commits each result to a real SQLite file (``INSERT ... ON CONFLICT (device,
seq) DO NOTHING``), then publishes the highest contiguous committed seq
(raised to ``floor - 1``) on the device's ``acks`` topic. It announces a
retained ``online`` coordinator status and records statuses and telemetry.
"""

from __future__ import annotations

import json
import os
import queue
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
from waiting import wait_for  # noqa: F401 (the agent tests import it from here)

from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

REPO = Path(__file__).resolve().parents[1]


def agent_config(tmp_path: Path, port: int, prefix: str, device: str = "dev1", **sections) -> dict:
    """A config with its own outbox, fast reconnects and fast telemetry; *sections* replace whole sections."""
    base = {
        "device_id": device,
        "prefix": prefix,
        "broker": {"port": port, "keepalive": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "ready_timeout_s": 5},
        "outbox": {"path": str(tmp_path / f"{device}-outbox.db"), "resend_after_s": 5.0},
        "telemetry": {"interval_s": 1.0},
        "models": {"cache_dir": str(tmp_path / "models")},
        "sources": [{"id": "cam0", "type": "synthetic", "pattern": "digits", "fps": 20.0, "width": 32, "height": 32}],
        "streams": [{"id": "digits-cam", "source": "cam0", "model": "digits-int8"}],
    }
    base.update(sections)
    return base


class AgentProcess:
    """``python -m lepton.cli agent --config FILE`` as a child process."""

    def __init__(self, config: dict, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.path = self.workdir / f"{config['device_id']}.toml"
        self.path.write_text(tomli_w.dumps(config))
        self.log_path = self.workdir / f"{config['device_id']}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def outbox_path(self) -> Path:
        return Path(self.config["outbox"]["path"])

    def start(self) -> "AgentProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lepton.cli", "agent", "--config", str(self.path)],
                                     stdout=log, stderr=log, env=self.env, cwd=REPO)
        log.close()
        return self

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def outbox_state(self) -> tuple[str, dict[str, int], list[int]]:
        """(integrity_check, counters, held seqs) of the outbox, read-only."""
        conn = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True, timeout=10)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            counters = dict(conn.execute("SELECT name, value FROM counters"))
            held = [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        finally:
            conn.close()
        return integrity, counters, held


class Consumer:
    """The stand-in coordinator: commit, then ack."""

    def __init__(self, port: int, topics: Topics, db_path: Path, ack: bool = True) -> None:
        self.topics, self.ack_enabled = topics, ack
        self.db_path = db_path
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[int]] = {}  # device -> seqs in first-arrival order
        self.results: dict[tuple[str, int], m.Result] = {}
        self.acked: dict[str, int] = {}
        self.statuses: list[tuple[float, m.Status]] = []
        self.telemetry: list[m.Telemetry] = []
        self.duplicates = 0
        self.mismatched: list[tuple[str, int]] = []  # a seq seen twice with different content
        self._above: dict[str, set[int]] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"standin-{os.getpid()}-{id(self)}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.will_set(topics.coordinator_status(), encode(m.CoordinatorStatus(state="offline", ts=time.time())),
                             qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self._queue.put((msg.topic, msg.payload))
        self.port = port
        self._thread = threading.Thread(target=self._run, name="standin-commit", daemon=True)

    def start(self) -> "Consumer":
        self.db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (device TEXT, seq INTEGER, payload TEXT, "
                        "PRIMARY KEY (device, seq))")
        self._thread.start()
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        self._thread.join(2)
        self.db.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        p = self.topics
        client.subscribe([(p.all_results(), 1), (p.all_status(), 1), (f"{p.prefix}/devices/+/telemetry", 0)])
        client.publish(p.coordinator_status(), encode(m.CoordinatorStatus(state="online", ts=time.time())),
                       qos=1, retain=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._commit(batch)

    def _commit(self, batch) -> None:
        results = []
        for topic, payload in batch:
            kind = self.topics.parse(topic).kind
            msg = decode(kind, payload)
            with self.lock:
                if kind == "status":
                    self.statuses.append((time.monotonic(), msg))
                elif kind == "telemetry":
                    self.telemetry.append(msg)
                elif kind == "results":
                    results.append((msg, payload))
        if not results:
            return
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO results (device, seq, payload) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            [(r.device, r.seq, p.decode()) for r, p in results])
        self.db.execute("COMMIT")
        acks = {}
        with self.lock:
            for result, _ in results:
                key = (result.device, result.seq)
                known = self.results.get(key)
                if known is not None:  # a re-send: still acked, the device may have missed the ack
                    self.duplicates += 1
                    if known.captured_at != result.captured_at or known.output != result.output:
                        self.mismatched.append(key)
                else:
                    self.results[key] = result
                    self.arrivals.setdefault(result.device, []).append(result.seq)
                acks[result.device] = self._contiguous(result.device, result.seq, result.floor)
        if self.ack_enabled:
            for device, seq in acks.items():
                self.client.publish(self.topics.acks(device), encode(m.Ack(device=device, seq=seq)), qos=1)

    def _contiguous(self, device: str, seq: int, floor: int) -> int:
        acked = max(self.acked.get(device, 0), floor - 1)
        above = self._above.setdefault(device, set())
        if seq > acked:
            above.add(seq)
        while acked + 1 in above:
            acked += 1
            above.discard(acked)
        self.acked[device] = acked
        return acked

    # --- what the tests look at ----------------------------------------------------
    def seqs(self, device: str) -> list[int]:
        with self.lock:
            return list(self.arrivals.get(device, []))

    def stored(self, device: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT seq FROM results WHERE device = ?", (device,))}

    def last_status(self, device: str) -> m.Status | None:
        with self.lock:
            mine = [s for _, s in self.statuses if s.device == device]
        return mine[-1] if mine else None

    def status_at(self, device: str, state: str, since: float) -> float | None:
        """When (monotonic) a *state* status for *device* arrived after *since*."""
        with self.lock:
            return next((t for t, s in self.statuses if s.device == device and s.state == state and t >= since), None)

    def outputs(self, device: str) -> list[m.Result]:
        with self.lock:
            return [r for (d, _), r in sorted(self.results.items()) if d == device]


def results_json(consumer: Consumer, device: str) -> list[dict]:
    return [json.loads(r.model_dump_json()) for r in consumer.outputs(device)]
