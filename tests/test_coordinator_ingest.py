"""Ingest: results stored exactly once, acks contiguous and monotone, telemetry and status stored."""

from __future__ import annotations

import json
import threading

import pytest
from test_coordinator_standins import MODEL, StandIn, db_rows, wait_for

from lepton.coordinator.acks import AckTracker
from lepton.coordinator.bus import Bus
from lepton.coordinator.config import load_config
from lepton.coordinator import ingest as ingest_module
from lepton.coordinator.ingest import Inbound, Ingest
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

CAM = {"id": "cam", "model": "digits", "rate_hz": 5, "payload_bytes": 192}


def test_ack_is_contiguous_then_jumps_the_floor():
    t = AckTracker()
    assert t.committed("d", [1, 2, 4], floor=1) == 2  # 3 missing: stop at 2
    assert t.pending("d") == 1
    assert t.committed("d", [3], floor=1) == 4  # the gap filled: 4 was already stored
    assert t.committed("d", [9], floor=8) == 7  # the device dropped 5..7: floor 8 says so; 8 is still due
    assert t.committed("d", [8], floor=8) == 9
    assert t.committed("d", [2], floor=1) == 9  # a late duplicate never moves the ack back


def test_frontier_is_the_ack_a_batch_would_give_and_changes_nothing():
    t = AckTracker()
    t.load("d", 10, [13])
    assert t.frontier("d", 1, [11, 15]) == 11  # 12 missing
    assert t.frontier("d", 1, [11, 12]) == 13  # 13 is stored already
    assert t.frontier("d", 15, []) == 14  # the floor: 11..14 settled by the device
    assert t.acked["d"] == 10 and t.pending("d") == 1


def test_ack_restores_from_database_state():
    t = AckTracker()
    t.load("d", 10, [12, 13, 11, 20])
    assert t.acked["d"] == 13 and t.pending("d") == 1
    assert t.committed("d", [14, 15, 16, 17, 18, 19], floor=1) == 20


def start_ingest(cfg, topics: Topics, db_path) -> tuple[Bus, Ingest, threading.Event]:
    """The real ingest path (Bus + Ingest) in this process, connected; set the event, join, stop the bus to end it."""
    holder: dict = {}
    bus = Bus(cfg.broker, topics, lambda item: holder["ingest"].submit(item))
    ing = holder["ingest"] = Ingest(str(db_path), topics, bus)
    stop = threading.Event()
    ing.start(stop)
    bus.start()
    assert bus.wait_connected(5)
    return bus, ing, stop


@pytest.fixture
def ingest(broker, prefix, tmp_path):
    """The real ingest path (Bus + Ingest) in this process, on the test's broker."""
    topics = Topics(prefix)
    cfg = load_config(data={"prefix": prefix, "broker": {"port": broker.port, "client_id": "coord-ingest"}})
    bus, ing, stop = start_ingest(cfg, topics, tmp_path / "c.db")
    yield ing, topics, tmp_path / "c.db"
    stop.set()
    ing.join()
    bus.stop()


def test_duplicates_stored_once_and_gaps_hold_the_ack(ingest, broker):
    ing, topics, db = ingest
    dev = StandIn(broker.port, topics, "dev-1", streams=[CAM]).connect()
    try:
        for seq in [1, 2, 3, 2, 3, 5, 6]:  # re-sends and a gap at 4
            dev.result(seq)
        wait_for(lambda: dev.last_ack() == 3 and ing.committed == 3 and ing.held() == 2, 5, what="ack 3, 5 and 6 held")
        # Above the gap, 5 and 6 wait unstored: stored, they would come before 4 (the results' order broken).
        assert db_rows(db, "SELECT seq FROM results WHERE device='dev-1' ORDER BY seq") == [(1,), (2,), (3,)]
        dev.result(4)
        wait_for(lambda: dev.last_ack() == 6, 5, what="ack 6 once 4 arrives")
        assert ing.held() == 0
        dev.result(8)  # 7 missing: 8 waits
        wait_for(lambda: ing.held() == 1, 5, what="8 held above the gap at 7")
        dev.result(9, floor=9)  # the device's outbox dropped 7 and 8: its floor says so, and 8 is stored after all
        wait_for(lambda: dev.last_ack() == 9, 5, what="ack past the floor")
        rows = db_rows(db, "SELECT seq, received_at FROM results WHERE device='dev-1' ORDER BY seq")
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6, 8, 9]
        times = [r[1] for r in rows]
        assert times == sorted(times), f"a result stored after a higher seq: {rows}"
        assert db_rows(db, "SELECT seq FROM acks WHERE device='dev-1'") == [(9,)]
        assert dev.acks == sorted(dev.acks), "acks went backwards"
        assert ing.held() == 0
    finally:
        dev.close()


def test_birth_telemetry_and_will_are_stored(ingest, broker):
    ing, topics, db = ingest
    dev = StandIn(broker.port, topics, "dev-2", streams=[CAM], keepalive=1).connect()
    wait_for(lambda: db_rows(db, "SELECT liveness FROM devices WHERE id='dev-2'") == [("online",)], 5, what="birth")
    for ms in (4.0, 6.0, 100.0):
        dev.telemetry(models={"digits": ms}, link={"rtt_ms": 12.0, "up_mbps": 8.0})
    wait_for(lambda: db_rows(db, "SELECT ms FROM compute WHERE device='dev-2'") == [(6.0,)], 5, what="median of the window")
    assert db_rows(db, "SELECT rtt_ms, up_mbps, down_mbps FROM links") == [(12.0, 8.0, None)]
    assert db_rows(db, "SELECT stream, model, rate_hz FROM streams") == [("cam", "digits", 5.0)]
    dev.client.socket().close()  # a crash: the broker sends the last will at once
    wait_for(lambda: db_rows(db, "SELECT liveness, reason FROM devices WHERE id='dev-2'") == [("offline", "last will")],
             5, what="last will")
    kinds = [k for (k,) in db_rows(db, "SELECT kind FROM events WHERE device='dev-2' ORDER BY id")]
    assert kinds == ["device-new", "streams", "device-offline"]
    dev.client.loop_stop()


def test_payload_naming_another_device_is_refused(ingest, broker):
    ing, topics, db = ingest
    dev = StandIn(broker.port, topics, "dev-3", streams=[CAM]).connect()
    try:
        wait_for(lambda: db_rows(db, "SELECT id FROM devices WHERE id='dev-3'"), 5, what="birth")
        spoof = dev.result(1)  # publish a result for dev-4 on dev-3's topic
        forged = m.Result(device="dev-4", stream="cam", seq=1, model=MODEL, captured_at=1, inferred_at=1, infer_ms=1,
                          computed_on="dev-4", output={})
        dev.client.publish(topics.result("dev-3", "cam"), encode(forged), qos=1)
        spoof.wait_for_publish(5)
        wait_for(lambda: dev.last_ack() == 1, 5, what="ack of the genuine result")
        wait_for(lambda: ing.depth() == 0, 5, what="queue drained")
        assert db_rows(db, "SELECT device, seq FROM results") == [("dev-3", 1)]
    finally:
        dev.close()


def test_sequence_number_beyond_sqlite_is_refused_and_ingest_goes_on(ingest, broker):
    """seq 2**63 does not fit SQLite's INTEGER: refused as invalid (it once killed the ingest thread, and again
    after every restart as the broker re-delivered it)."""
    ing, topics, db = ingest
    dev = StandIn(broker.port, topics, "dev-5", streams=[CAM]).connect()
    try:
        good = m.Result(device="dev-5", stream="cam", seq=1, model=MODEL, captured_at=1, inferred_at=1, infer_ms=1,
                        computed_on="dev-5", output={})
        huge = good.model_dump(mode="json") | {"seq": 2**63}
        dev.client.publish(topics.result("dev-5", "cam"), json.dumps(huge), qos=1).wait_for_publish(5)
        dev.result(1)
        wait_for(lambda: dev.last_ack() == 1, 5, what="ack of the result after the oversized one")
        assert ing._thread.is_alive()
        assert db_rows(db, "SELECT device, seq FROM results") == [("dev-5", 1)]
    finally:
        dev.close()


class _Sink:
    def __init__(self) -> None:
        self.pubacks: list[int] = []
        self.published: list[tuple[str, bytes]] = []

    def puback(self, mid, qos, conn) -> None:
        self.pubacks.append(mid)

    def publish(self, topic, payload, qos, retain=False) -> None:
        self.published.append((topic, payload))


class _Unstorable(Ingest):
    """Ingest whose database refuses one result the schema accepted (what the seq bound once let through)."""

    def _one(self, item, batch, now):
        super()._one(item, batch, now)
        if b'"seq":2,' in bytes(item.payload):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")


def test_a_result_the_database_refuses_is_isolated_from_its_batch(tmp_path):
    topics, sink, stop = Topics("t/v1"), _Sink(), threading.Event()
    ing = _Unstorable(str(tmp_path / "c.db"), topics, sink)
    try:
        for mid, seq in enumerate((1, 2, 3), start=10):
            r = m.Result(device="d", stream="cam", seq=seq, model=MODEL, captured_at=1, inferred_at=1, infer_ms=1,
                         computed_on="d", output={})
            ing.submit(Inbound(topics.result("d", "cam"), encode(r), 1, mid))
        ing.start(stop)  # queued before the thread starts: the three commit as one batch
        wait_for(lambda: len(sink.pubacks) == 3, 5, what="all three PUBACKed")
        assert ing._thread.is_alive()
        assert db_rows(tmp_path / "c.db", "SELECT seq FROM results ORDER BY seq") == [(1,)]
        assert ing.held() == 1  # 3 waits above the gap 2 left
        acks = [decode("acks", p).seq for t, p in sink.published]
        assert acks and acks[-1] == 1, acks  # 2 never stored: the ack stops below it
    finally:
        stop.set()
        ing.join()


def test_results_held_above_a_gap_are_bounded_in_count_and_time_and_stored_at_a_stop(tmp_path, monkeypatch):
    """Holding keeps the order while it can; past its bounds a result is stored as it comes, never dropped, and
    the ack still counts only what is stored."""
    monkeypatch.setattr(ingest_module, "HOLD_MAX_ROWS", 3)
    topics, sink, stop = Topics("t/v1"), _Sink(), threading.Event()
    ing = Ingest(str(tmp_path / "c.db"), topics, sink)
    mids = iter(range(1, 1000))

    def send(*seqs: int, ack: int) -> None:
        for seq in seqs:
            r = m.Result(device="d", stream="cam", seq=seq, model=MODEL, captured_at=1, inferred_at=1, infer_ms=1,
                         computed_on="d", output={})
            ing.submit(Inbound(topics.result("d", "cam"), encode(r), 1, next(mids)))
        n = len(sink.pubacks) + len(seqs)
        wait_for(lambda: len(sink.pubacks) == n and sink.published
                 and decode("acks", sink.published[-1][1]).seq == ack, 5, what=f"{seqs} PUBACKed, ack {ack}")

    def stored() -> list[int]:
        return [r[0] for r in db_rows(tmp_path / "c.db", "SELECT seq FROM results ORDER BY received_at, seq")]

    ing.start(stop)
    try:
        send(1, ack=1)
        send(3, 4, 5, 6, 7, ack=1)  # 2 missing: three held, 6 and 7 past the bound are stored as they come
        assert stored() == [1, 6, 7] and ing.held() == 3
        send(2, ack=7)
        assert stored() == [1, 6, 7, 2, 3, 4, 5] and ing.held() == 0
        monkeypatch.setattr(ingest_module, "HOLD_MAX_S", 0.0)
        send(9, ack=7)  # held, then stored though nothing else arrives: it waited too long
        wait_for(lambda: ing.held() == 0 and stored()[-1] == 9, 5, what="9 stored after waiting too long")
        send(8, 10, ack=10)
        monkeypatch.setattr(ingest_module, "HOLD_MAX_S", 120.0)
        send(12, ack=10)
        assert ing.held() == 1
    finally:
        stop.set()
        ing.join()
    assert stored()[-1] == 12, "a result held at the stop is stored, not dropped"
    assert sorted(stored()) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]


def test_a_replaced_outbox_below_the_ack_stores_what_was_held_and_is_acked_above_it(tmp_path):
    """Rule 8 with results held above a gap: they are stored (their outbox may be gone) and the ack covers them,
    so the device numbers what it holds above them."""
    topics, sink, stop = Topics("t/v1"), _Sink(), threading.Event()
    ing = Ingest(str(tmp_path / "c.db"), topics, sink)
    mids = iter(range(1, 1000))

    def send(seq: int, tag: str, floor: int) -> None:
        r = m.Result(device="d", stream="cam", seq=seq, floor=floor, model=MODEL, captured_at=1, inferred_at=1,
                     infer_ms=1, computed_on="d", output={"tag": tag})
        ing.submit(Inbound(topics.result("d", "cam"), encode(r), 1, next(mids)))
        n = len(sink.pubacks) + 1
        wait_for(lambda: len(sink.pubacks) == n, 5, what=f"{seq} PUBACKed")

    ing.start(stop)
    try:
        for seq in (100, 101, 103, 104):
            send(seq, "old", 100)  # 102 missing: 103 and 104 held
        assert ing.held() == 2
        send(50, "new", 50)  # a replaced outbox numbering below the ack (101)
        wait_for(lambda: decode("acks", sink.published[-1][1]).seq == 104, 5, what="acked above the held ones")
        rows = db_rows(tmp_path / "c.db", "SELECT seq FROM results ORDER BY seq")
        assert rows == [(100,), (101,), (103,), (104,)] and ing.held() == 0  # 50 refused: numbered again above
    finally:
        stop.set()
        ing.join()


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_broker_queues_for_the_persistent_session_while_away(broker, prefix, tmp_path, version):
    """Results published while the coordinator is down arrive when it reconnects under its client id."""
    topics = Topics(prefix)
    cfg = load_config(data={"prefix": prefix, "broker": {"port": broker.port, "client_id": "coord-away",
                                                          "mqtt_version": version}})
    bus, ing, stop = start_ingest(cfg, topics, tmp_path / "c.db")
    dev = StandIn(broker.port, topics, "dev-1", streams=[CAM]).connect()
    try:
        dev.result(1)
        wait_for(lambda: dev.last_ack() == 1, 5, what="first ack")
        stop.set()
        ing.join()
        bus.stop()
        infos = [dev.result(seq) for seq in range(2, 52)]
        for info in infos:
            info.wait_for_publish(5)
        bus, ing, stop = start_ingest(cfg, topics, tmp_path / "c.db")
        wait_for(lambda: dev.last_ack() == 51, 10, what="queued results acked after the reconnect")
        assert db_rows(tmp_path / "c.db", "SELECT count(*) FROM results") == [(51,)]
    finally:
        dev.close()
        stop.set()
        ing.join()
        bus.stop()
