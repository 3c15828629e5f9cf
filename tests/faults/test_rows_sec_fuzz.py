"""Fault-plan row 10: fuzzed payloads on every topic the coordinator and an agent subscribe to.

A real coordinator and a real agent run against one broker until they are
quiet (the agent's only frame produced, stored and acknowledged, its
placement applied and reported; telemetry and replanning an hour away).
Then Hypothesis publishes malformed payloads (random bytes, truncated JSON,
wrong types, NaN, deep nesting, oversize, and well-formed messages with one
thing wrong: another device's id, a missing field, an unknown key, the
schema version) on:

- the coordinator's topics: status, telemetry, placement/reported, results
  (the cases of tests/test_coordinator_fuzz.py, reused);
- the agent's: placement/desired, acks, offload addressed to it, replies to
  it, coordinator status.

Both must stay alive, log exactly one line per payload naming the topic and
the reason, and change nothing they store: the coordinator's database dump,
the agent's outbox (rows and counters) and the model set it reports.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")

from fuzz_cases import one_thing_wrong as _one_thing_wrong  # noqa: E402
from test_coordinator_fuzz import dump, topic_for  # noqa: E402
from test_coordinator_fuzz import cases as coordinator_cases  # noqa: E402

from lepton.protocol import Topics, encode  # noqa: E402
from lepton.protocol import messages as m  # noqa: E402
from lepton.protocol.messages import MAX_DEPTH, MAX_JSON_BYTES  # noqa: E402
from lepton.protocol.offload import MAGIC, MAX_FRAME_BYTES  # noqa: E402

DEVICE = "dev-1"
MODEL = "digits-int8"
SENDERS = ["dev-2", "dev-9"]  # other devices that may offload to it or answer it
COORD_LINE = "invalid payload from device"
AGENT_LINE = f"invalid message for device {DEVICE} on"
NOW = 1_790_000_000.25  # a fixed timestamp: Hypothesis needs the same draws for the same choices

# --- the agent's side: valid messages to break ---------------------------------------------------------


def agent_valid(kind: str, sender: str) -> dict:
    """A valid message of *kind* addressed to DEVICE (replies: from *sender*), as a dict to break."""
    now = NOW
    msg = {
        "desired": lambda: m.Desired(device=DEVICE, generation=99, ts=now, models=[m.ModelRef(
            name=MODEL, version="9.9.9", sha256="0" * 64, size=1, url="http://127.0.0.1:9/none")],
            routes={"s0": [m.Route(device=sender, share=1.0)]}),
        # Above any seq the agent numbers (its outbox numbers from the clock in microseconds, ~1.8e15): an ack
        # taken by mistake would delete its rows and move its counters on, which the outbox dump shows.
        "acks": lambda: m.Ack(device=DEVICE, seq=10**17),
        "coordinator": lambda: m.CoordinatorStatus(state="offline", ts=now),
        "replies": lambda: m.Reply(server=sender, origin=DEVICE, request=1, model=MODEL, output={"k": 1}),
    }[kind]()
    return json.loads(encode(msg))


REQUIRED = {"desired": ["device", "generation", "ts"], "acks": ["device", "seq"], "coordinator": ["state", "ts"],
            "replies": ["server", "origin", "request", "model"]}
NUMBER = {"desired": "ts", "acks": "seq", "coordinator": "ts", "replies": "infer_ms"}
ID_FIELD = {"desired": "device", "acks": "device", "coordinator": "device", "replies": "origin"}
OTHER_IDS = ["dev-2", "other-device", "a/b", "+", "#", "", "x" * 65]


@st.composite
def one_thing_wrong(draw, kind: str, sender: str) -> bytes:
    """A valid message with exactly one thing wrong: a type, a missing or unknown field, the schema
    version, another device's id (for the coordinator's status, which names none: an unknown key), NaN."""

    def other_id(draw, data: dict) -> None:
        field = "server" if kind == "replies" and draw(st.booleans()) else ID_FIELD[kind]
        data[field] = draw(st.sampled_from([i for i in OTHER_IDS if i != data.get(field)]))  # really another

    return _one_thing_wrong(draw, agent_valid(kind, sender), REQUIRED[kind], NUMBER[kind], other_id)


def junk(valid: bytes, limit: int, deep_char: bytes = b"[") -> st.SearchStrategy[bytes]:
    """Payloads wrong before any schema: random bytes and text, truncations of a valid one, oversize,
    nesting past the limit, and the usual suspects."""
    close = {b"[": b"]", b"{": b"}"}[deep_char]
    return st.one_of(
        st.binary(max_size=300),
        st.text(max_size=200).map(str.encode),
        st.integers(1, max(1, len(valid) - 1)).map(lambda n: valid[:-n]),
        st.integers(limit + 1, limit + 4096).map(lambda n: b'{"v": 1, "pad": "' + b"a" * n + b'"}'),
        st.integers(MAX_DEPTH + 1, 5000).map(lambda n: deep_char * n + close * n),
        st.sampled_from([b"", b"null", b"[]", b"{}", b'"online"', b"1e999", b'{"v": 1}', b"\xff\xfe", b"NaN"]),
    )


def json_payloads(kind: str, sender: str) -> st.SearchStrategy[bytes]:
    valid = json.dumps(agent_valid(kind, sender)).encode()
    return st.one_of(junk(valid, MAX_JSON_BYTES), st.sampled_from([b"{" * 40 + b"}" * 40]),
                     one_thing_wrong(kind, sender))


# --- offload frames --------------------------------------------------------------------------------------


def frame(header: dict | bytes, body: bytes, declared: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(head) if declared is None else declared) + head + body


def valid_header(sender: str) -> dict:
    return {"v": 1, "origin": sender, "stream": "s0", "request": 1, "model": MODEL, "encoding": "raw",
            "dtype": "uint8", "shape": [1, 8, 8, 1], "sent_at": NOW}


# Values no header field of that name accepts (1.5 would be a fine sent_at, "abc" a fine stream id).
WRONG_HEADER = {"origin": [None, [], 5, "a/b", ""], "stream": [None, {}, 5, "a/b"], "request": [None, "abc", -1, 1.5],
                "model": [None, [], "a/b", "+"], "dtype": [None, 1, "complex128"], "shape": [None, {}, [0], [-1], "abc"],
                "sent_at": [None, [], "abc", -1]}


@st.composite
def bad_frames(draw, sender: str) -> bytes:
    """LPO1 frames with one thing wrong: header type, field, version, origin or model other than the
    topic's, NaN, a body that does not fit the shape, a header length that does not fit the frame."""
    header, body = valid_header(sender), bytes(64)
    how = draw(st.sampled_from(["type", "missing", "extra", "version", "origin", "model", "nan", "body",
                                "length", "header-json"]))
    if how == "type":
        key = draw(st.sampled_from(sorted(WRONG_HEADER)))
        header[key] = draw(st.sampled_from(WRONG_HEADER[key]))
    elif how == "missing":
        del header[draw(st.sampled_from(["origin", "stream", "request", "model"]))]
    elif how == "extra":
        header["bogus"] = 1
    elif how == "version":
        header["v"] = draw(st.sampled_from([0, 2, None]))
    elif how == "origin":
        header["origin"] = draw(st.sampled_from([DEVICE] + [s for s in SENDERS if s != sender]))
    elif how == "model":
        header["model"] = draw(st.sampled_from(["digits", "vibration", "probe"]))
    elif how == "nan":
        header["sent_at"] = math.nan
    elif how == "body":
        body = bytes(draw(st.sampled_from([0, 1, 63, 65, 128])))
    elif how == "length":
        return frame(header, body, declared=draw(st.sampled_from([10**6, 2**32 - 1, 70 * 1024])))
    else:
        return frame(json.dumps(header).encode()[:-draw(st.integers(1, 20))], body)
    return frame(header, body)


def frame_payloads(sender: str) -> st.SearchStrategy[bytes]:
    valid = frame(valid_header(sender), bytes(64))
    return st.one_of(junk(valid, 70 * 1024), bad_frames(sender),
                     st.binary(min_size=8, max_size=100).map(lambda b: MAGIC + b))


@st.composite
def agent_cases(draw) -> tuple[str, str, bytes]:
    """(kind, topic, payload) for one of the agent's subscriptions."""
    kind = draw(st.sampled_from(["desired", "acks", "coordinator", "replies", "offload"]))
    sender = draw(st.sampled_from(SENDERS))
    payload = draw(frame_payloads(sender) if kind == "offload" else json_payloads(kind, sender))
    return kind, sender, payload


def agent_topic(topics: Topics, kind: str, sender: str) -> str:
    return {"desired": topics.desired(DEVICE), "acks": topics.acks(DEVICE), "coordinator": topics.coordinator_status(),
            "replies": topics.reply(sender, DEVICE), "offload": topics.offload(sender, DEVICE, MODEL)}[kind]


# --- the state that must not change -------------------------------------------------------------------


def outbox_dump(path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def reported_models(counter) -> str:
    """What the agent last reported it runs (its models and generation), without the timestamp."""
    rep = counter.reported.get(DEVICE)
    return "" if rep is None else json.dumps({"generation": rep.generation, "models": {
        k: v.model_dump() for k, v in rep.models.items()}}, sort_keys=True)


def state(fleet, counter) -> dict:
    return {"coordinator_db": dump(fleet.coordinator_db), "outbox": outbox_dump(fleet.outbox_path(DEVICE)),
            "reported": reported_models(counter)}


def what_changed(before: dict, after: dict, most: int = 6) -> dict:
    """For a failure message: per part of the state, the lines only one side has (a few of each)."""
    out = {}
    for key in before:
        old, new = before[key], after[key]
        if old == new:
            continue
        if isinstance(old, list):
            gone, came = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            out[key] = {"before only": [g[:200] for g in gone[:most]], "after only": [c[:200] for c in came[:most]]}
        else:
            out[key] = {"before": str(old)[:400], "after": str(new)[:400]}
    return out


def wait_quiet(fleet, counter, timeout: float = 30.0) -> dict:
    """The state once the device runs the coordinator's first plan and two reads 1 s apart agree (the
    start-up traffic has settled). The first plan alone may take longer than 1 s to reach the device on a
    slow machine (its solve took 0.86 s once): two reads before it agreed, and it landed mid-fuzz."""
    deadline = time.monotonic() + timeout
    while (counter.reported.get(DEVICE) is None or counter.reported[DEVICE].generation < 1) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    before = state(fleet, counter)
    while True:
        time.sleep(1.0)
        now = state(fleet, counter)
        if now == before:
            return now
        if time.monotonic() > deadline:
            changed = [k for k in now if now[k] != before[k]]
            raise AssertionError(f"the fleet never went quiet: {changed} kept changing")
        before = now


def lines(proc, needle: str) -> list[str]:
    return [ln for ln in proc.log_text().splitlines() if needle in ln]


@pytest.mark.row(10, "fuzzed payloads: coordinator and agent")
def test_fuzzed_payloads_are_refused_and_change_nothing(fleet_factory, figures, long_run):
    fleet = fleet_factory(devices=[DEVICE], netns=False)
    fleet.start_broker()
    counter = fleet.start_counter()
    coord = fleet.start_coordinator({"planner": {"interval_s": 3600}, "liveness": {"stale_after_s": 3600}})
    agent = fleet.start_agent(DEVICE, rate_hz=0.002, overrides={"telemetry": {"interval_s": 3600}})
    counter.wait_acked({DEVICE: fleet.outbox_counters(DEVICE)["first_seq"]}, timeout=30)  # its first result
    before = wait_quiet(fleet, counter)
    placement_lines = len(lines(agent, "placement generation"))
    topics, fuzzer = Topics(fleet.prefix), fleet.mqtt_client("lxf-fuzzer")
    t0 = time.monotonic()
    sent = fuzz(fuzzer, topics, examples=10000 if long_run else 1000)
    n_coord = sum(v for k, v in sent.items() if k.startswith("coordinator/"))
    n_agent = sum(v for k, v in sent.items() if k.startswith("agent/"))
    wait_lines(coord, agent, n_coord, n_agent, timeout=60)
    fuzz_s = time.monotonic() - t0
    time.sleep(1.0)  # anything a payload set off would have landed by now
    after = state(fleet, counter)
    coord_lines, agent_lines = lines(coord, COORD_LINE), lines(agent, AGENT_LINE)
    changed = [k for k in after if after[k] != before[k]]
    tracebacks = coord.log_text().count("Traceback") + agent.log_text().count("Traceback")
    figures.update(sent=n_coord + n_agent, rejected=min(len(coord_lines), n_coord) + min(len(agent_lines), n_agent),
                   coordinator_sent=n_coord, coordinator_lines=len(coord_lines), agent_sent=n_agent,
                   agent_lines=len(agent_lines), alive=int(coord.running) + int(agent.running),
                   state_changed=changed, tracebacks=tracebacks,
                   longest_line=max(map(len, coord_lines + agent_lines), default=0),
                   per_topic=dict(sorted(sent.items())), fuzz_s=round(fuzz_s, 1),
                   models_reported=sorted(json.loads(before["reported"] or "{}").get("models", {})))
    assert coord.running and agent.running, "a process died of a payload"
    assert len(coord_lines) == n_coord, "one line per payload refused by the coordinator"
    assert len(agent_lines) == n_agent, "one line per payload refused by the agent"
    assert changed == [] and tracebacks == 0, f"a refused payload changed {changed}: {what_changed(before, after)}"
    assert len(lines(agent, "placement generation")) == placement_lines, "a fuzzed desired was applied"
    assert all(len(line) < 2000 for line in coord_lines + agent_lines), "a log line echoes the payload"
    assert all(re.search(r" on .+?: \S", line) for line in coord_lines + agent_lines), "a line without a reason"
    assert not counter.seen_status(DEVICE, "offline", t0), "the agent dropped off the broker"
    serving = still_serving(fleet, fuzzer, topics, after)
    figures.update(**serving)
    assert serving["coordinator_stores"] and serving["agent_answers"], serving


def fuzz(fuzzer, topics: Topics, examples: int) -> dict[str, int]:
    """Publish *examples* cases on the coordinator's topics, as many on the agent's, and one oversize
    offload frame; returns how many went to each "process/kind"."""
    sent: dict[str, int] = {}

    def publish(topic: str, payload: bytes, label: str) -> None:
        fuzzer.publish(topic, payload, qos=1).wait_for_publish(30)
        sent[label] = sent.get(label, 0) + 1

    run = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))

    @run
    @given(coordinator_cases())
    def fuzz_coordinator(case):
        kind, device, payload = case
        publish(topic_for(topics, kind, device), payload, f"coordinator/{kind}")

    @run
    @given(agent_cases())
    def fuzz_agent(case):
        kind, sender, payload = case
        publish(agent_topic(topics, kind, sender), payload, f"agent/{kind}")

    fuzz_coordinator()
    fuzz_agent()
    # Past the frame limit: too big to draw hundreds of.
    publish(topics.offload(SENDERS[0], DEVICE, MODEL), MAGIC + bytes(MAX_FRAME_BYTES), "agent/offload")
    return sent


def wait_lines(coord, agent, n_coord: int, n_agent: int, timeout: float) -> None:
    """Until both logged a refusal per payload, one of them died, or *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and coord.running and agent.running and (
            len(lines(coord, COORD_LINE)) < n_coord or len(lines(agent, AGENT_LINE)) < n_agent):
        time.sleep(0.2)


def still_serving(fleet, fuzzer, topics: Topics, after: dict) -> dict:
    """Both still work after the storm, and the state comparison can see a change: a genuine result
    (from another device id) changes the coordinator's database; a genuine offload input is answered."""
    import threading

    from test_coordinator_fuzz import valid

    replies, got = [], threading.Event()
    fuzzer.on_message = lambda c, u, msg: (replies.append(msg.payload), got.set())
    fuzzer.subscribe(topics.reply(DEVICE, SENDERS[1]), qos=1)
    time.sleep(0.2)
    result = valid("results", "dev-7")
    fuzzer.publish(topics.result("dev-7", result["stream"]), json.dumps(result).encode(), qos=1).wait_for_publish(10)
    fuzzer.publish(topics.offload(SENDERS[1], DEVICE, MODEL), frame(valid_header(SENDERS[1]), bytes(64)),
                   qos=1).wait_for_publish(10)
    answered = got.wait(10)
    deadline = time.monotonic() + 10
    while dump(fleet.coordinator_db) == after["coordinator_db"] and time.monotonic() < deadline:
        time.sleep(0.2)
    error = json.loads(replies[0]).get("error", "") if replies else ""
    return {"coordinator_stores": dump(fleet.coordinator_db) != after["coordinator_db"],
            "agent_answers": answered, "agent_answer_error": error[:60]}
