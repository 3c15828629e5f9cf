"""Delivery rules against a real Mosquitto: hold while the coordinator is away, re-send, floor, expiry, backoff."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lepton.agent.config import load_config
from lepton.agent.delivery import Delivery
from lepton.agent.outbox import Outbox, Pending
from lepton.agent.session import Backoff, Outgoing, Session
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m
from test_agent_standins import wait_for


class Wire:
    """A plain subscriber that records result payloads in arrival order."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.got: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.all_results(), 1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.append(json.loads(msg.payload))

    def seqs(self) -> list[int]:
        with self.lock:
            return [g["seq"] for g in self.got]

    def coordinator(self, state: str) -> None:
        payload = encode(m.CoordinatorStatus(state=state, ts=time.time()))
        self.client.publish(self.topics.coordinator_status(), payload, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def setup(broker, prefix, tmp_path):
    topics = Topics(prefix)
    wire = Wire(broker.port, topics)
    parts = {}

    def make(coordinator: str | None = None, mqtt_version: str = "3.1.1", **outbox):
        if coordinator:
            wire.coordinator(coordinator)
        cfg = load_config(data={"device_id": "dev1", "prefix": prefix,
                                "broker": {"port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                                           "mqtt_version": mqtt_version},
                                "outbox": {"path": str(tmp_path / "o.db"), **outbox}})
        will = Outgoing(topics.status("dev1"), b"{}", 1, True)
        session = Session(cfg.broker, "dev1", topics, "dev1", will, lambda: [])
        outbox_ = Outbox(cfg.outbox.path, cfg.outbox.max_rows, cfg.outbox.max_bytes, first_seq=1)
        delivery = Delivery(outbox_, session, cfg.outbox)
        parts.update(session=session, outbox=outbox_, delivery=delivery)
        session.start()
        delivery.start()
        assert session.wait_connected(5)
        inbound = threading.Thread(target=_pump, args=(session, delivery, topics), daemon=True)
        inbound.start()
        return delivery, outbox_

    yield make, wire, topics
    if parts:
        parts["delivery"].stop(1)
        parts["session"].close()
        parts["outbox"].close()
    wire.close()


def _pump(session: Session, delivery: Delivery, topics: Topics) -> None:
    """The agent's inbound dispatch, reduced to what delivery needs."""
    from lepton.protocol import decode

    while session.connected.is_set() or not session._halt.is_set():
        try:
            topic, payload, retained = session.inbound.get(timeout=0.2)
        except Exception:
            continue
        kind = topics.parse(topic).kind
        if kind == "coordinator":
            delivery.coordinator_state(decode(kind, payload).state, live=not retained)
        elif kind == "acks":
            delivery.ack(decode(kind, payload).seq)


def result(topics: Topics, deadline: float | None = None) -> Pending:
    return Pending("s1", topics.result("dev1", "s1"),
                   lambda seq, floor: json.dumps({"seq": seq, "floor": floor}).encode(), deadline)


def test_results_wait_while_the_coordinator_is_offline_then_go_in_order(setup):
    make, wire, topics = setup
    delivery, outbox = make(coordinator="offline", max_rows=5)
    wait_for(lambda: delivery.coordinator == "offline", 5, "the retained offline status")
    for _ in range(8):
        delivery.submit(result(topics))
    wait_for(lambda: outbox.next_seq == 9, 5, "8 results committed")
    time.sleep(0.3)
    assert wire.seqs() == [] and outbox.depth == 5 and outbox.dropped == 3
    wire.coordinator("online")
    wait_for(lambda: len(wire.seqs()) == 5, 5, "the held results")
    assert wire.seqs() == [4, 5, 6, 7, 8]
    assert {g["floor"] for g in wire.got} == {4}  # raised past the dropped ones, so acks do not stall


def test_a_restart_with_a_backlog_waits_for_the_coordinators_status_before_sending(setup, tmp_path):
    """An outbox a coordinator acknowledged before says one exists: at a start, nothing of the backlog goes out
    before its retained status is known (offline here: nothing at all), then it goes in order from the floor."""
    make, wire, topics = setup
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([result(topics) for _ in range(600)])
    box.ack(100)
    box.close()
    delivery, outbox = make(coordinator="offline")
    wait_for(lambda: delivery.coordinator == "offline", 5, "the retained offline status")
    time.sleep(0.5)
    assert wire.seqs() == [], f"{len(wire.seqs())} results sent before the coordinator's status was known"
    wire.coordinator("online")
    wait_for(lambda: len(wire.seqs()) >= 200, 5, "the backlog, once the coordinator is online")
    assert wire.seqs()[:200] == list(range(101, 301))  # ack_window (200) past the floor: the rest waits for acks


def test_a_wait_for_a_coordinator_status_that_never_comes_is_logged(setup, tmp_path, monkeypatch, caplog):
    """An outbox a coordinator acknowledged, on a broker with no coordinator status: results wait, and the log
    says why (it would otherwise wait in silence)."""
    import logging

    from lepton.agent import delivery as delivery_module

    monkeypatch.setattr(delivery_module, "STATUS_WAIT_LOG_S", 0.5)
    caplog.set_level(logging.WARNING, logger="lepton.agent.delivery")
    make, wire, topics = setup
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([result(topics) for _ in range(20)])
    box.ack(5)
    box.close()
    make()  # no coordinator status on this broker
    lines = wait_for(lambda: [r.getMessage() for r in caplog.records if "wait for the coordinator's status" in
                              r.getMessage()], 5, "the warning")
    assert lines[0].startswith("15 result(s) wait for the coordinator's status"), lines
    time.sleep(1.0)
    assert wire.seqs() == [] and len([r for r in caplog.records if "coordinator's status" in r.getMessage()]) == 1
    wire.coordinator("online")
    wait_for(lambda: wire.seqs()[:15] == list(range(6, 21)), 5, "the results once the status comes")


@pytest.mark.parametrize("mqtt_version", ["3.1.1", "5"])
def test_unacked_results_are_resent_after_resend_after_s_until_acked(setup, mqtt_version):
    make, wire, topics = setup
    delivery, outbox = make(coordinator="online", mqtt_version=mqtt_version, resend_after_s=1.0)
    wait_for(lambda: delivery.coordinator == "online", 5, "the coordinator's status")
    for _ in range(3):
        delivery.submit(result(topics))
    wait_for(lambda: wire.seqs() == [1, 2, 3], 5, "first sends")
    wait_for(lambda: wire.seqs()[3:6] == [1, 2, 3], 5, "a re-send in order")
    wire.client.publish(topics.acks("dev1"), encode(m.Ack(device="dev1", seq=3)), qos=1)
    wait_for(lambda: outbox.depth == 0, 5, "the ack to delete")
    sent = len(wire.seqs())
    time.sleep(1.5)
    assert len(wire.seqs()) == sent and delivery.resent >= 3


def test_after_each_reconnect_results_go_out_in_seq_order(setup, broker, long_run):
    """A new connection carries nothing before the re-send from the floor: results produced while delivery
    has not yet seen the reconnect wait for it (they once went out first, ahead of older unacknowledged ones)."""
    make, wire, topics = setup
    delivery, outbox = make(coordinator="online")
    wait_for(lambda: delivery.coordinator == "online", 5, "the coordinator's status")
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            delivery.submit(result(topics))
            time.sleep(0.001)

    done = threading.Event()

    def acknowledge() -> None:  # as the coordinator does: the highest contiguous seq, so the outbox stays short
        while not done.is_set():
            seen, top = set(wire.seqs()), 0
            while top + 1 in seen:
                top += 1
            if top:
                wire.client.publish(topics.acks("dev1"), encode(m.Ack(device="dev1", seq=top)), qos=1)
            time.sleep(0.05)

    producer = threading.Thread(target=produce, daemon=True)
    acks = threading.Thread(target=acknowledge, daemon=True)
    producer.start()
    acks.start()
    session = delivery.session
    try:
        for _ in range(100 if long_run else 12):  # take the session over (same client id): the broker drops ours, the agent reconnects
            generation = session.generation
            intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev1")
            intruder.connect("127.0.0.1", broker.port)
            intruder.disconnect()
            wait_for(lambda: session.generation > generation, 5, "the reconnect")
            time.sleep(0.05)
    finally:
        stop.set()
        producer.join()
    try:
        wait_for(lambda: outbox.depth == 0, 20, "every result on the wire and acknowledged")
    finally:
        done.set()
        acks.join()
    first, seen = [], set()
    for seq in wire.seqs():
        if seq not in seen:
            seen.add(seq)
            first.append(seq)
    assert first == sorted(first), [(a, b) for a, b in zip(first, first[1:]) if b < a][:5]


def test_results_wait_in_memory_while_the_outbox_refuses_writes_and_none_is_lost(setup, tmp_path):
    """A commit that fails (here: another process holds the outbox's write lock past busy_timeout, as a full
    disk would fail it) keeps its results and the acks that came with them, and commits them when it can."""
    import sqlite3

    make, wire, topics = setup
    delivery, outbox = make()
    for _ in range(5):
        delivery.submit(result(topics))
    wait_for(lambda: wire.seqs() == [1, 2, 3, 4, 5], 5, "the first five")
    holder = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(5):
            delivery.submit(result(topics))
        delivery.ack(3)
        time.sleep(6.0)  # past the outbox's busy_timeout (5 s): at least one commit failed
        assert wire.seqs() == [1, 2, 3, 4, 5] and outbox.next_seq == 6
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: wire.seqs()[5:] == [6, 7, 8, 9, 10], 10, "the five held in memory, in order")
    wait_for(lambda: outbox.floor == 4, 5, "the ack that arrived meanwhile")
    assert delivery.lost_uncommitted == 0


def test_on_a_full_outbox_acks_free_the_room_new_results_need(setup):
    """A full disk refuses every commit that grows the file. The coordinator's ack deletes rows and frees
    pages, so it is applied before the commits that wait: they then fit (before, the ack waited behind the
    refused commits, and the outbox stayed full for good). SQLite's page limit gives the same SQLITE_FULL
    that a full file system gives."""
    make, wire, topics = setup
    delivery, outbox = make()
    big = Pending("s1", topics.result("dev1", "s1"),
                  lambda seq, floor: json.dumps({"seq": seq, "floor": floor, "pad": "x" * 3000}).encode())
    for _ in range(200):
        delivery.submit(big)
    wait_for(lambda: outbox.next_seq == 201, 10, "the first 200 committed")
    with outbox._lock:
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full from here on
    for _ in range(20):
        delivery.submit(big)
    wait_for(lambda: delivery.uncommitted == 20, 10, "the 20 refused, waiting in memory")
    delivery.ack(150)  # arrives while they wait: with the commits first, it waited behind them for good
    wait_for(lambda: outbox.floor == 151, 10, "the ack applied on the full disk")
    wait_for(lambda: outbox.next_seq == 221, 10, "the 20 new results committed into the freed room")
    assert delivery.lost_uncommitted == 0 and outbox.depth == 70


def test_a_standalone_agent_keeps_no_send_marks(setup):
    """With no coordinator no ack ever comes: nothing may grow per send (send marks time the wait for an
    ack, and once grew by 10 a second for as long as a standalone agent ran)."""
    make, wire, topics = setup
    delivery, outbox = make(max_rows=50)
    for _ in range(300):
        delivery.submit(result(topics))
        time.sleep(0.005)
    wait_for(lambda: len(wire.seqs()) == 300, 10, "every result sent")
    assert outbox.depth == 50 and outbox.dropped == 250
    assert len(delivery._sent_marks) == 0


def test_send_marks_of_results_the_outbox_dropped_are_forgotten(setup):
    """With a coordinator that does not ack, drop-oldest moves the floor: marks below it time nothing."""
    make, wire, topics = setup
    delivery, outbox = make(coordinator="online", max_rows=20, resend_after_s=600.0)
    wait_for(lambda: delivery.coordinator == "online", 5, "the coordinator's status")
    for _ in range(300):
        delivery.submit(result(topics))
        time.sleep(0.005)
    wait_for(lambda: outbox.dropped == 280, 10, "the oldest dropped")
    time.sleep(1.0)  # a timer round or two
    floor = outbox.floor
    assert all(seq >= floor for seq, _ in list(delivery._sent_marks)[1:]) and len(delivery._sent_marks) <= 3


def test_a_resend_keeps_to_the_ack_window_past_the_floor(setup):
    """After acks moved the floor, a re-send goes out from the floor and no further than ack_window past it (it
    once sent as many rows as the floor's seq number past it: with three devices, more than the broker queues for
    the coordinator, which dropped the oldest of every re-send and the coordinator's ack never moved again)."""
    make, wire, topics = setup
    delivery, outbox = make(coordinator="online", resend_after_s=1.0, ack_window=50)
    wait_for(lambda: delivery.coordinator == "online", 5, "the coordinator's status")
    for _ in range(150):
        delivery.submit(result(topics))
    wait_for(lambda: wire.seqs() == list(range(1, 51)), 5, "the first window")
    wire.client.publish(topics.acks("dev1"), encode(m.Ack(device="dev1", seq=30)), qos=1)
    wait_for(lambda: outbox.floor == 31, 5, "the ack")
    wait_for(lambda: 31 in wire.seqs()[50:], 5, "a re-send from the floor")
    time.sleep(1.5)  # at least one more re-send
    assert max(wire.seqs()) == 80, f"sent up to {max(wire.seqs())}, the window ends at 80"


def test_acks_that_lag_but_keep_coming_cause_no_resend(setup):
    """A coordinator working through a backlog acks late but steadily: that is not a lost message, and a
    re-send would double what the broker queues for it. A real stall (no ack at all) still re-sends."""
    make, wire, topics = setup
    delivery, outbox = make(coordinator="online", resend_after_s=1.0, ack_window=1000)
    wait_for(lambda: delivery.coordinator == "online", 5, "the coordinator's status")
    for _ in range(60):
        delivery.submit(result(topics))
    wait_for(lambda: len(wire.seqs()) == 60, 5, "the first sends")
    for seq in range(4, 61, 4):  # 4 more every 0.25 s: 3.75 s for all, the last ones acked 3.5 s after sending
        time.sleep(0.25)
        wire.client.publish(topics.acks("dev1"), encode(m.Ack(device="dev1", seq=seq)), qos=1)
    wait_for(lambda: outbox.depth == 0, 5, "every ack applied")
    assert delivery.resent == 0 and len(wire.seqs()) == 60
    delivery.submit(result(topics))  # no ack for this one: re-sent after resend_after_s
    wait_for(lambda: wire.seqs().count(61) >= 2, 5, "the re-send of an unacknowledged result")


def test_a_result_past_its_deadline_is_never_sent(setup):
    make, wire, topics = setup
    delivery, outbox = make()
    delivery.submit(result(topics, deadline=time.time() - 1))
    delivery.submit(result(topics, deadline=time.time() + 60))
    wait_for(lambda: wire.seqs() == [2], 5, "only the live result")
    wait_for(lambda: outbox.expired == 1, 5, "the expiry counted")


@pytest.mark.parametrize("step_s", [90 * 86400.0, -2 * 3600.0])
def test_held_deadlines_move_with_a_step_of_the_wall_clock(setup, monkeypatch, tmp_path, step_s):
    """A Pi boots at its image's date and NTP steps its clock forward by months: the results it holds must not
    all expire at once; set back by hours, a result must still expire its deadline_s after capture."""
    make, wire, topics = setup
    if step_s > 0:  # a result an earlier run held, on the clock of that run: its deadline does not move
        earlier = Outbox(str(tmp_path / "o.db"), 1000, 2**20, first_seq=1)
        earlier.enqueue([result(topics, deadline=time.time() + 30.0)])
        earlier.close()
    delivery, outbox = make(coordinator="offline")
    wait_for(lambda: delivery.coordinator == "offline", 5, "the retained offline status")
    keep = 1.5 if step_s < 0 else 30.0
    held = outbox.depth
    for _ in range(3):
        delivery.submit(result(topics, deadline=time.time() + keep))
    wait_for(lambda: outbox.depth == held + 3, 5, "3 results held")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + step_s)  # the clock is set, for this whole process
    if step_s > 0:
        wait_for(lambda: outbox.expired == 1, 5, "the earlier run's result, 90 days past its deadline")
        time.sleep(1.2)  # a few delivery rounds on the new clock: nothing else expires
        delivery.submit(result(topics, deadline=time.time() + keep))  # made after the step
        wire.coordinator("online")
        wait_for(lambda: [q for q in wire.seqs() if q > 1] == [2, 3, 4, 5], 10, "every result this run held")
        # (seq 1 may have gone out at the connect, before the retained offline status arrived)
        assert outbox.expired == 1
    else:
        wait_for(lambda: outbox.expired == 3, 5, "the held results expired 1.5 s after capture, not 2 h later")
        wire.coordinator("online")
        time.sleep(0.5)
        assert wire.seqs() == []


def test_a_clock_step_the_outbox_cannot_take_yet_is_applied_later_and_nothing_expires_meanwhile(setup, monkeypatch):
    """A full disk when the step is seen: nothing is committed or expired on deadlines not yet moved; once the
    outbox takes the move, the held results go out, none expired."""
    make, wire, topics = setup
    delivery, outbox = make(coordinator="offline")
    wait_for(lambda: delivery.coordinator == "offline", 5, "the retained offline status")
    delivery.submit(result(topics, deadline=time.time() + 30))
    wait_for(lambda: outbox.depth == 1, 5, "a result held")
    shift, calls = outbox.shift_deadlines, []

    def full(*args):
        calls.append(args)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(outbox, "shift_deadlines", full)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 90 * 86400)
    wait_for(lambda: len(calls) >= 2, 5, "the move tried again")
    delivery.submit(result(topics, deadline=time.time() + 30))  # made on the new clock: waits in memory
    time.sleep(0.6)
    assert outbox.depth == 1 and outbox.expired == 0
    monkeypatch.setattr(outbox, "shift_deadlines", shift)
    wire.coordinator("online")
    wait_for(lambda: len(wire.seqs()) >= 2, 10, "both results")
    assert outbox.expired == 0


def test_backoff_doubles_to_the_cap_with_jitter():
    backoff = Backoff(0.5, 10.0, random.Random(1))
    waits = [backoff.next() for _ in range(8)]
    assert all(w <= 10.0 for w in waits) and waits[-1] >= 10.0 * 0.75
    assert 0.5 * 0.75 <= waits[0] <= 0.5 * 1.25 and waits[2] > waits[0]
    assert len({round(w, 6) for w in waits[-3:]}) > 1  # jittered, not lockstep
    backoff.reset()
    assert backoff.next() <= 0.5 * 1.25


class _FlakySession:
    """The session surface delivery uses, whose first publish raises (as a client in a bad state may):
    a unit test of delivery's bookkeeping, with the real outbox."""

    def __init__(self) -> None:
        import collections
        import queue

        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.pubacks: collections.deque = collections.deque()
        self.connected = threading.Event()
        self.connected.set()
        self.generation, self.wake_on_puback = 1, False
        self.sent: list[dict] = []
        self.events.put(("connected", 1))

    def publish(self, msg, generation=None):
        if not self.sent and not getattr(self, "raised", False):
            self.raised = True
            raise RuntimeError("the client refused the publish")
        self.sent.append(json.loads(msg.payload))
        return self.generation, len(self.sent)


def test_a_publish_that_raises_after_the_commit_does_not_commit_the_results_again(tmp_path):
    """The results were committed (numbered) before the publish failed: they must not be committed again under
    new numbers (the coordinator would store both copies)."""
    cfg = load_config(data={"device_id": "dev1", "outbox": {"path": str(tmp_path / "o.db")}})
    session, outbox = _FlakySession(), Outbox(str(tmp_path / "o.db"), first_seq=1)
    delivery = Delivery(outbox, session, cfg.outbox)
    topics = Topics("t/v1")
    delivery.start()
    try:
        for _ in range(3):
            delivery.submit(result(topics))
        wait_for(lambda: sorted(r["seq"] for r in session.sent) == [1, 2, 3], 5, "the three published once")
        time.sleep(0.3)
        assert outbox.next_seq == 4 and outbox.depth == 3 and delivery.committed == 3
    finally:
        delivery.stop(1)
        outbox.close()
