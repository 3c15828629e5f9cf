"""``lepton agent`` as a real process against a real Mosquitto, with a stand-in coordinator that commits and acks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lepton.protocol import Topics, decode
from test_agent_standins import AgentProcess, Consumer, agent_config, wait_for

NOISE = [{"id": "cam0", "type": "synthetic", "pattern": "noise", "fps": 20.0, "width": 32, "height": 32}]


@pytest.fixture
def topics(prefix) -> Topics:
    return Topics(prefix)


@pytest.fixture
def consumer(broker, topics, tmp_path):
    c = Consumer(broker.port, topics, tmp_path / "coordinator.db").start()
    yield c
    c.close()


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def start(agents, cfg, tmp_path, env=None) -> AgentProcess:
    agent = AgentProcess(cfg, tmp_path, env).start()
    agents.append(agent)
    return agent


def online(consumer, agent, device="dev1", timeout=30.0):
    def up():
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_tail()}")
        status = consumer.last_status(device)
        return status if status is not None and status.state == "online" else None

    return wait_for(up, timeout, "the agent's online status")


def retained_status(port: int, topics: Topics, device: str):
    """What a newcomer sees on the device's status topic (the retained message)."""
    got = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, msg: got.append(decode("status", msg.payload))
    client.connect("127.0.0.1", port)
    client.subscribe(topics.status(device), 1)
    client.loop_start()
    try:
        wait_for(lambda: got, 5, "the retained status")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def test_digits_stream_publishes_correct_labels_then_stops_cleanly(broker, consumer, topics, tmp_path, agents):
    from lepton.models.registry import default_registry

    from lepton.broker import free_port

    entry = default_registry().get("digits-int8")
    metrics_port = free_port()
    cfg = agent_config(tmp_path, broker.port, topics.prefix, metrics={"port": metrics_port},
                       link={"up_mbps": 20.0, "rtt_ms": 15.0, "probe_interval_s": 30.0}, runtime={"slowdown": 1.5})
    agent = start(agents, cfg, tmp_path)
    birth = online(consumer, agent)
    # an emulated slower device says so: the coordinator takes it for another kind than a full-speed twin
    assert birth.capabilities.runtime_version.endswith(" (slowdown x1.5)"), birth.capabilities.runtime_version
    assert birth.capabilities.link == {"up_mbps": 20.0, "rtt_ms": 15.0}  # the hints, not the agent's own settings
    assert birth.capabilities.cpu_count == os.cpu_count() and "digits-int8" in birth.capabilities.models
    assert birth.capabilities.runtime and birth.streams[0].id == "digits-cam" and birth.streams[0].payload_bytes > 0
    wait_for(lambda: len(consumer.seqs("dev1")) >= 60 and consumer.telemetry, 30, "60 results and telemetry")
    results = consumer.outputs("dev1")
    correct = sum(r.output["top"][0]["label"] == str(r.output["source"]["truth"]) for r in results)
    assert correct / len(results) >= 0.9, f"{correct}/{len(results)} labels match the rendered digits"
    first = results[0]
    assert (first.model.name, first.model.version, first.model.sha256) == (
        "digits-int8", entry.manifest.version, entry.manifest.sha256)
    assert all(r.computed_on == "dev1" and r.captured_at <= r.inferred_at and r.infer_ms > 0 for r in results)
    seqs = consumer.seqs("dev1")
    _, counters, _ = agent.outbox_state()  # a new outbox numbers from the clock in microseconds
    assert seqs == sorted(seqs) and seqs[0] == counters["first_seq"] > 1
    telemetry = consumer.telemetry[-1]
    assert telemetry.models["digits-int8"].p50_ms > 0 and telemetry.frames_in > 0 and telemetry.link.rtt_ms is not None
    assert telemetry.streams["digits-cam"] == pytest.approx(20.0, rel=0.25)  # the source's 20 fps: the demand
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'lepton_agent_results_total{device="dev1"}' in metrics
    assert 'lepton_agent_invoke_p95_seconds{device="dev1",model="digits-int8"}' in metrics

    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - started < 10
    status = retained_status(broker.port, topics, "dev1")
    assert (status.state, status.reason) == ("offline", "stopped")
    integrity, counters, held = agent.outbox_state()
    assert integrity == "ok" and set(range(counters["first_seq"], counters["next_seq"])) == (
        consumer.stored("dev1") | set(held))


def test_vibration_stream_flags_injected_faults(broker, consumer, topics, tmp_path, agents):
    from lepton.models.registry import default_registry

    window = default_registry().get("vibration").manifest.preprocess.window_spec
    sensor = {"id": "imu0", "type": "sensor", "mode": "synthetic", "fps": 20.0, "length": window.length,
              "channels": window.channels, "fault_rate": 0.4, "seed": 3}
    cfg = agent_config(tmp_path, broker.port, topics.prefix, sources=[sensor],
                       streams=[{"id": "vib", "source": "imu0", "model": "vibration"}])
    agent = start(agents, cfg, tmp_path)
    online(consumer, agent)
    wait_for(lambda: len(consumer.seqs("dev1")) >= 80, 30, "80 vibration results")
    results = consumer.outputs("dev1")
    faults = [r for r in results if r.output["source"]["fault"]]
    normal = [r for r in results if not r.output["source"]["fault"]]
    assert faults and normal
    recall = sum(r.output["anomaly"] for r in faults) / len(faults)
    false_alarms = sum(r.output["anomaly"] for r in normal) / len(normal)
    assert recall >= 0.8 and false_alarms <= 0.1, (recall, false_alarms)


def test_last_will_turns_status_offline_after_sigkill(broker, consumer, topics, tmp_path, agents):
    keepalive = 2
    cfg = agent_config(tmp_path, broker.port, topics.prefix, sources=NOISE)
    cfg["broker"]["keepalive"] = keepalive
    agent = start(agents, cfg, tmp_path)
    online(consumer, agent)
    killed = time.monotonic()
    agent.kill()
    seen = wait_for(lambda: consumer.status_at("dev1", "offline", killed), 1.5 * keepalive + 1, "the last will")
    assert seen - killed <= 1.5 * keepalive
    status = retained_status(broker.port, topics, "dev1")
    assert (status.state, status.reason) == ("offline", "last will")


class OutboxWatch:
    """Samples the outbox while the agent runs: nothing may leave it before the consumer acked it."""

    def __init__(self, agent: AgentProcess, consumer: Consumer) -> None:
        self.agent, self.consumer = agent, consumer
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            acked = self.consumer.acked.get("dev1", 0)  # read first: it only grows
            try:
                integrity, counters, held = self.agent.outbox_state()
            except Exception:
                continue  # not created yet
            self.samples += 1
            floor = held[0] if held else counters["next_seq"]
            deleted = floor - 1 if floor > counters["first_seq"] else 0  # below first_seq nothing was ever numbered
            if integrity != "ok" or deleted > max(acked, self.consumer.acked.get("dev1", 0)):
                self.violations.append(f"{integrity}: deleted up to {deleted}, acked {acked}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def outage(broker, consumer, topics, tmp_path, agents, seconds: float) -> None:
    cfg = agent_config(tmp_path, broker.port, topics.prefix, sources=NOISE)
    agent = start(agents, cfg, tmp_path)
    online(consumer, agent)
    with OutboxWatch(agent, consumer) as watch:
        wait_for(lambda: len(consumer.seqs("dev1")) >= 20, 20, "results before the outage")
        broker.stop()
        time.sleep(seconds)
        _, during, _ = agent.outbox_state()
        broker.start()
        last, produced = during["next_seq"] - 1, during["next_seq"] - during["first_seq"]
        wait_for(lambda: consumer.acked.get("dev1", 0) >= last, 30, f"every seq up to {last} acked")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    integrity, counters, held = agent.outbox_state()
    seqs = consumer.seqs("dev1")
    assert integrity == "ok" and not watch.violations and watch.samples > 5
    assert counters["first_seq"] == during["first_seq"]
    assert set(range(counters["first_seq"], counters["next_seq"])) == set(seqs) | set(held), "a seq never arrived"
    assert seqs == sorted(seqs), "order per device not kept"
    assert not consumer.mismatched
    assert produced - 20 >= seconds * 20 * 0.5  # results kept flowing into the outbox during the outage


def test_broker_outage_loses_nothing(broker, consumer, topics, tmp_path, agents):
    outage(broker, consumer, topics, tmp_path, agents, seconds=5)


@pytest.mark.slow
def test_broker_outage_30s_loses_nothing(broker, consumer, topics, tmp_path, agents):
    outage(broker, consumer, topics, tmp_path, agents, seconds=30)


def restarted(agents, cfg, tmp_path, consumer) -> AgentProcess:
    """Start the agent and wait for this run's own birth (results still arriving from a killed run do not count)."""
    since = time.monotonic()
    agent = start(agents, cfg, tmp_path)
    wait_for(lambda: consumer.status_at("dev1", "online", since) or agent.proc.poll() is not None, 30, "its birth")
    return agent


def test_sigkill_mid_stream_20_times_loses_nothing(broker, consumer, topics, tmp_path, agents, long_run):
    rng = random.Random(7)
    cfg = agent_config(tmp_path, broker.port, topics.prefix,
                       sources=[dict(NOISE[0], fps=100.0)])
    cfg["outbox"]["batch_max"] = 8  # many small transactions: more moments to be killed in
    kills = 100 if long_run else 20
    first_seq = next_seq = None
    for _ in range(kills):
        agent = restarted(agents, cfg, tmp_path, consumer)
        seen = len(consumer.seqs("dev1"))
        wait_for(lambda: len(consumer.seqs("dev1")) > seen or agent.proc.poll() is not None, 30, "a new result")
        time.sleep(rng.uniform(0, 0.3))
        agent.kill()
        acked = consumer.acked.get("dev1", 0)
        integrity, counters, held = agent.outbox_state()
        assert integrity == "ok"
        assert first_seq is None or counters["first_seq"] == first_seq, "the outbox was replaced"
        assert next_seq is None or counters["next_seq"] >= next_seq, "seq counter went backwards"
        first_seq, next_seq = counters["first_seq"], counters["next_seq"]
        floor = held[0] if held else next_seq
        assert floor - 1 <= max(acked, consumer.acked.get("dev1", 0), first_seq - 1), "deleted before its ack"
        assert set(range(floor, next_seq)) == set(held), "an unacknowledged result is missing"
    agent = restarted(agents, cfg, tmp_path, consumer)
    wait_for(lambda: consumer.acked.get("dev1", 0) >= next_seq - 1, 30, "the backlog acked")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    integrity, counters, held = agent.outbox_state()
    assert counters["first_seq"] == first_seq
    assert set(range(first_seq, counters["next_seq"])) == consumer.stored("dev1") | set(held)
    assert not consumer.mismatched, "a seq was reused for a different result"


def test_sd_notify_ready_after_broker_session_and_watchdog_pings(broker, consumer, topics, tmp_path, agents):
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    messages: list[str] = []

    def receive(until) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not until():
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass

    cfg = agent_config(tmp_path, broker.port, topics.prefix, sources=NOISE)
    agent = start(agents, cfg, tmp_path, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"})
    try:
        receive(lambda: any(msg.startswith("READY=1") for msg in messages))
        ready = next(msg for msg in messages if msg.startswith("READY=1"))
        assert "broker connected" in ready  # READY waited for the broker session
        assert wait_for(lambda: consumer.last_status("dev1"), 5, "the birth").state == "online"
        receive(lambda: messages.count("WATCHDOG=1") >= 3 and any(m.startswith("STATUS=") for m in messages))
        assert messages.count("WATCHDOG=1") >= 3
        assert any(m.startswith("STATUS=1 stream(s)") and "results/s" in m for m in messages)
        agent.signal(signal.SIGTERM)
        receive(lambda: any(msg.startswith("STOPPING=1") for msg in messages))
        assert agent.wait(10) == 0
    finally:
        sock.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lepton.cli", *args], capture_output=True, text=True, timeout=60)


def test_check_config_exit_codes(tmp_path):
    import tomli_w

    good = agent_config(tmp_path, 1883, "lepton/v1")
    path = tmp_path / "good.toml"
    path.write_text(tomli_w.dumps(good))
    ok = run_cli("agent", "--check-config", str(path))
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "dev1-outbox.db").exists()  # checking changes nothing
    for change, named in (({"broker": {"port": 1883, "hots": "x"}}, "broker.hots"),
                          ({"streams": [{"id": "s", "source": "cam0", "model": "no-such-model"}]}, "no-such-model"),
                          ({"sources": [{"id": "acc", "type": "sensor"}],
                            "streams": [{"id": "s", "source": "acc", "model": "vibration", "offload_jpeg_quality": 80}]},
                           "streams[0].offload_jpeg_quality: model 'vibration' takes window input")):
        path.write_text(tomli_w.dumps({**good, **change}))
        bad = run_cli("agent", "--check-config", str(path))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and named in lines[0], bad.stderr


def test_sigterm_while_waiting_for_the_broker_at_start_up_stops_at_once(tmp_path, agents):
    """Start-up waits up to ready_timeout_s for the broker; a SIGTERM meanwhile ends the wait (it used to be
    served only once the wait ran out)."""
    from lepton.broker import free_port

    cfg = agent_config(tmp_path, free_port(), "t/v1")  # nothing listens there
    cfg["broker"]["ready_timeout_s"] = 60
    agent = AgentProcess(cfg, tmp_path).start()
    agents.append(agent)
    wait_for(lambda: "cannot connect to broker" in agent.log_tail(), 30, "the connection refused")
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert time.monotonic() - started < 5, agent.log_tail()
