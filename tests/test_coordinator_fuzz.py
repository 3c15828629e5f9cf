"""1000 malformed, oversized and wrong-schema payloads on every topic the coordinator subscribes to:
the coordinator keeps running, logs one line for each, and its database does not change."""

from __future__ import annotations

import json
import sqlite3
import time

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from fuzz_cases import one_thing_wrong
from test_coordinator_process import CoordinatorWatch
from test_coordinator_standins import CoordinatorProcess, StandIn, coordinator_config, wait_for

from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

EXAMPLES = 1000
KINDS = ("status", "telemetry", "reported", "results")


def valid(kind: str, device: str) -> dict:
    """A valid message of *kind* (for *device*, when the topic tree allows that id), as a dict to break."""
    data = _valid(kind)
    data["device"] = device
    return data


def _valid(kind: str, device: str = "dev-1") -> dict:
    now = time.time()
    msg = {
        "status": lambda: m.Status(device=device, state="online", ts=now, capabilities=m.Capabilities(
            cpu_count=2, memory_mb=512, arch="armv7l", runtime="ai-edge-litert", runtime_version="2"),
            streams=[m.StreamInfo(id="cam", model="digits", rate_hz=5, payload_bytes=100)]),
        "telemetry": lambda: m.Telemetry(device=device, ts=now, models={"digits": m.ModelTiming(p50_ms=1, p95_ms=2, count=3)}),
        "reported": lambda: m.Reported(device=device, generation=1, ts=now,
                                       models={"digits": m.ModelState(state="failed", reason="x")}),
        "results": lambda: m.Result(device=device, stream="cam", seq=99, model=m.ModelId(name="digits", version="1", sha256="a"),
                                    captured_at=now, inferred_at=now, infer_ms=1, computed_on=device, output={"k": 1}),
    }[kind]()
    return json.loads(encode(msg))


REQUIRED = {"status": ["device", "state", "ts"], "telemetry": ["device", "ts"], "reported": ["device", "generation", "ts"],
            "results": ["device", "stream", "seq", "model", "captured_at", "inferred_at", "infer_ms", "computed_on", "output"]}
NUMBER = {"status": "ts", "telemetry": "load1", "reported": "ts", "results": "infer_ms"}


@st.composite
def wrong_schema(draw, kind: str, device: str) -> bytes:
    """A valid message with exactly one thing made wrong: a field's type, a missing field, an unknown
    key, the schema version, another device's id, or a NaN."""

    def other_device(draw, data: dict) -> None:
        data["device"] = draw(st.sampled_from(["other-device", "a/b", "+", "", "x" * 65]))

    return one_thing_wrong(draw, valid(kind, device), REQUIRED[kind], NUMBER[kind], other_device)


def payloads(kind: str, device: str):
    truncated = st.integers(1, 40).map(lambda n: json.dumps(valid(kind, device)).encode()[:-n])
    oversized = st.integers(256 * 1024 + 1, 300 * 1024).map(lambda n: b'{"v": 1, "pad": "' + b"a" * n + b'"}')
    deep = st.integers(17, 5000).map(lambda n: b"[" * n + b"]" * n)
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        truncated,
        oversized,
        deep,
        wrong_schema(kind, device),
        st.sampled_from([b"", b"null", b"[]", b"{}", b'"online"', b"1e999", b'{"v": 1}', b"\xff\xfe"]),
    )


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    # The known device (its state is what a bug would corrupt), or an id the topic tree refuses.
    device = draw(st.sampled_from(["dev-1", "dev-1", "dev-1", "bad id", "-lead", "x" * 65, "ü"]))
    return kind, device, draw(payloads(kind, device))


def topic_for(topics: Topics, kind: str, device: str) -> str:
    base = f"{topics.prefix}/devices/{device}"
    return {"status": f"{base}/status", "telemetry": f"{base}/telemetry", "reported": f"{base}/placement/reported",
            "results": f"{base}/results/cam"}[kind]


def dump(path) -> list[str]:
    with sqlite3.connect(path, timeout=30) as conn:
        return list(conn.iterdump())


def test_fuzzed_payloads_change_nothing(broker, prefix, tmp_path):
    topics = Topics(prefix)
    cfg = coordinator_config(tmp_path, broker.port, prefix, liveness={"stale_after_s": 3600})
    db = tmp_path / "coordinator.db"
    coord = CoordinatorProcess(cfg).start()
    watch = CoordinatorWatch(broker.port, topics)
    dev = None
    fuzzer = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer")
    fuzzer.max_inflight_messages_set(100)
    try:
        wait_for(watch.online, 20, what="coordinator online")
        # Real state first, so a payload that slipped through would have something to corrupt.
        dev = StandIn(broker.port, topics, "dev-1", streams=[{"id": "cam", "model": "digits", "rate_hz": 5,
                                                               "payload_bytes": 100}]).connect()
        dev.telemetry(models={"digits": 4.0})
        for seq in (1, 2, 3):
            dev.result(seq)
        wait_for(lambda: dev.last_ack() == 3 and dev.last_desired(), 20, what="ack and placement")
        time.sleep(0.5)  # let the plan's writes land
        before = dump(db)
        fuzzer.connect("127.0.0.1", broker.port)
        fuzzer.loop_start()
        sent = []

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def publish(case):
            kind, device, payload = case
            fuzzer.publish(topic_for(topics, kind, device), payload, qos=1).wait_for_publish(10)
            sent.append(case)

        publish()
        n = len(sent)
        assert n >= EXAMPLES
        wait_for(lambda: coord.log_text().count("invalid payload from device") >= n, 60,
                 what=f"{n} refusals logged")
        time.sleep(0.5)
        assert coord.alive(), "the coordinator died"
        assert dump(db) == before, "a refused payload changed the database"
        log = coord.log_text()
        assert log.count("invalid payload from device") == n, "one log line per refused payload"
        assert "Traceback" not in log
        # Still serving: a genuine result after the storm is stored and acked.
        dev.result(4)
        wait_for(lambda: dev.last_ack() == 4, 10, what="ack after the fuzzing")
        kinds = {k for k, _, _ in sent}
        print(f"\n{n} fuzzed payloads over {sorted(kinds)}: coordinator alive, database unchanged")
    finally:
        fuzzer.disconnect()
        fuzzer.loop_stop()
        if dev:
            dev.close()
        watch.close()
        coord.stop()
