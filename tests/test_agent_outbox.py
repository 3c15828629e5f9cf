"""The agent's SQLite outbox: numbering, floor, bounds, expiry, acks, crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lepton.agent.outbox import Outbox, Pending


def item(tag: int = 0, deadline: float | None = None, size: int = 0) -> Pending:
    def build(seq: int, floor: int) -> bytes:
        return json.dumps({"seq": seq, "floor": floor, "tag": tag, "pad": "x" * size}).encode()

    return Pending("s1", "t/s1", build, deadline)


def seqs(box: Outbox) -> list[int]:
    return [r.seq for r in box.pending(0, 1_000_000)]


def test_numbers_from_one_in_order_and_payload_carries_seq_and_floor(tmp_path):
    box = Outbox(tmp_path / "o.db", first_seq=1)
    rows = box.enqueue([item(i) for i in range(3)])
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [json.loads(r.payload) for r in rows][2] == {"seq": 3, "floor": 1, "tag": 2, "pad": ""}
    box.ack(2)
    (row,) = box.enqueue([item(9)])
    assert (row.seq, json.loads(row.payload)["floor"]) == (4, 3)


def test_ack_deletes_only_up_to_its_seq_and_counters_survive_reopen(tmp_path):
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([item(i) for i in range(10)])
    assert box.ack(4) == 4
    assert seqs(box) == list(range(5, 11))
    assert box.ack(3) == 0  # an older ack changes nothing
    box.close()
    again = Outbox(tmp_path / "o.db", first_seq=1)
    assert seqs(again) == list(range(5, 11))
    assert again.stats() == {"depth": 6, "bytes": again.bytes, "dropped": 0, "expired": 0, "acked": 4,
                                  "next_seq": 11, "floor": 5, "first_seq": 1}
    assert again.enqueue([item()])[0].seq == 11  # never a seq twice


def test_full_outbox_drops_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "o.db", max_rows=5, first_seq=1)
    box.enqueue([item(i) for i in range(8)])
    assert seqs(box) == [4, 5, 6, 7, 8]
    assert (box.dropped, box.floor) == (3, 4)
    by_bytes = Outbox(tmp_path / "b.db", max_rows=1000, max_bytes=2048, first_seq=1)
    for _ in range(10):
        by_bytes.enqueue([item(size=400)])
    assert by_bytes.bytes <= 2048 and by_bytes.dropped == 10 - by_bytes.depth
    assert seqs(by_bytes)[-1] == 10  # the newest are kept


def test_expired_results_are_deleted_and_counted(tmp_path):
    box = Outbox(tmp_path / "o.db", first_seq=1)
    now = time.time()
    box.enqueue([item(0), item(1, deadline=now - 1), item(2, deadline=now + 60)])
    assert box.expire(now) == 1
    assert seqs(box) == [1, 3] and box.expired == 1


def test_an_ack_above_anything_numbered_numbers_the_held_results_again_above_it(tmp_path):
    """The coordinator acks 500 to an outbox that numbered only 1-3: it holds an older outbox's results up to
    500 (this one replaced it with the clock behind) and stored none of these. They are kept, numbered from
    501 in their order, their payloads with them (the ack once deleted them unsent)."""
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([item(tag) for tag in range(3)])
    assert box.ack(500) == 0
    held = box.pending(0, 10)
    assert [r.seq for r in held] == [501, 502, 503] and box.floor == 501
    assert [json.loads(r.payload) for r in held] == [{"seq": 501 + t, "floor": 501, "tag": t, "pad": ""} for t in range(3)]
    assert box.enqueue([item(9)])[0].seq == 504
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert again.stats()["acked"] == 500 and seqs(again) == [501, 502, 503, 504]
    assert again.ack(502) == 2 and seqs(again) == [503, 504]


def test_a_clock_step_moves_the_deadlines_this_run_made_renumbered_or_not(tmp_path):
    """Rows an earlier run held were made on that run's clock; this run's rows are this run's after they are
    numbered again above an ack too."""
    now = time.time()
    earlier = Outbox(tmp_path / "o.db", first_seq=1)
    earlier.enqueue([item(0, deadline=now + 10)])
    earlier.close()
    box = Outbox(tmp_path / "o.db")
    assert box.run_first_seq == 2
    box.enqueue([item(1, deadline=now + 10), item(2, deadline=now + 10)])
    box.ack(500)  # numbered again: 501 (the earlier run's), 502, 503
    assert seqs(box) == [501, 502, 503] and box.run_first_seq == 502
    assert box.shift_deadlines(3600.0, box.run_first_seq) == 2
    assert [r.deadline - now for r in box.pending(0, 10)] == pytest.approx([10, 3610, 3610])


def test_wal_and_full_sync(tmp_path):
    Outbox(tmp_path / "o.db", first_seq=1).close()
    conn = sqlite3.connect(tmp_path / "o.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_close_is_bounded_when_another_process_holds_the_file(tmp_path):
    """A stop must not wait the busy timeout (5 s) for another writer: close gives up in time, loses nothing."""
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([item(i) for i in range(3)])
    other = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a backup or an inspection holding the write lock
    try:
        started = time.monotonic()
        box.close(timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        other.execute("ROLLBACK")
        other.close()
    again = Outbox(tmp_path / "o.db", first_seq=1)
    assert seqs(again) == [1, 2, 3]
    again.close()


def test_close_gives_up_on_a_write_still_running(tmp_path):
    box = Outbox(tmp_path / "o.db", first_seq=1)
    box.enqueue([item()])
    box._lock.acquire()  # a write still in progress (e.g. waiting on a lock)
    try:
        started = time.monotonic()
        assert box.close(timeout=0.3) is False
        assert time.monotonic() - started < 1.0
    finally:
        box._lock.release()
    assert box.close(timeout=1.0) is True
    assert seqs(Outbox(tmp_path / "o.db", first_seq=1)) == [1]


WRITER = """
import json, sys, time
from lepton.agent.outbox import Outbox, Pending
box = Outbox(sys.argv[1], max_rows=200, first_seq=1)
print("ready", flush=True)
n = 0
while True:
    n += 1
    box.enqueue([Pending("s", "t", lambda seq, floor: json.dumps({"seq": seq}).encode()) for _ in range(n % 7 + 1)])
    if n % 5 == 0:
        box.ack(box.next_seq - 3)
"""


def test_sigkill_mid_write_keeps_the_file_sound_and_numbering_monotonic(tmp_path):
    path = tmp_path / "o.db"
    last_next = 1
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.1 * (_ % 3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counters = dict(conn.execute("SELECT name, value FROM counters"))
        held = [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")]
        conn.close()
        assert counters["next_seq"] >= last_next
        # every numbered seq is held, acked, or counted dropped: nothing vanished unaccounted
        assert all(s < counters["next_seq"] for s in held)
        assert held == list(range(held[0], held[-1] + 1)) if held else True
        if held:
            assert held[0] <= counters["acked"] + 1 or counters["dropped"] > 0
        last_next = counters["next_seq"]


class OutboxMachine(RuleBasedStateMachine):
    """Enqueue, ack, expire and crash (reopen) in any order; the file matches a plain model of the policy."""

    MAX = 20

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.path = os.path.join(tempfile.mkdtemp(), "o.db")
        self.box = Outbox(self.path, max_rows=self.MAX, first_seq=1)
        self.model: dict[int, bool] = {}  # held seq -> has a past deadline
        self.next = 1
        self.acked = self.dropped = self.expired = 0

    @rule(n=st.integers(1, 8), past=st.booleans())
    def enqueue(self, n, past):
        self.box.enqueue([item(deadline=time.time() - 1 if past else None) for _ in range(n)])
        for _ in range(n):
            self.model[self.next] = past
            self.next += 1
        while len(self.model) > self.MAX:
            del self.model[min(self.model)]
            self.dropped += 1

    @rule(back=st.integers(0, 10))
    def ack(self, back):
        seq = max(0, self.next - 1 - back)
        self.box.ack(seq)
        if seq > self.acked:
            self.acked = seq
            self.model = {s: p for s, p in self.model.items() if s > seq}

    @rule()
    def expire(self):
        self.box.expire()
        self.expired += sum(self.model.values())
        self.model = {s: p for s, p in self.model.items() if not p}

    @rule()
    def crash(self):
        self.box._db.close()  # no checkpoint, no goodbye
        self.box = Outbox(self.path, max_rows=self.MAX, first_seq=1)

    @invariant()
    def matches_model(self):
        assert seqs(self.box) == sorted(self.model)
        stats = self.box.stats()
        assert (stats["next_seq"], stats["acked"], stats["dropped"], stats["expired"]) == (
            self.next, self.acked, self.dropped, self.expired)
        assert stats["depth"] == len(self.model)
        assert stats["floor"] == (min(self.model) if self.model else self.next)

    def teardown(self):
        self.box._db.close()


def test_outbox_state_machine():
    test = OutboxMachine.TestCase
    test.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
    test().runTest()


# -- where numbering starts ---------------------------------------------------------------


def test_a_new_outbox_numbers_from_the_clock_and_an_existing_one_keeps_its_count(tmp_path):
    from lepton.agent.outbox import RANDOM_SPAN, clock_seq

    before = int(time.time() * 1_000_000)
    box = Outbox(tmp_path / "o.db")
    first = box.enqueue([item()])[0].seq
    assert before <= first <= int(time.time() * 1_000_000) + RANDOM_SPAN and box.stats()["first_seq"] == first
    assert len({clock_seq(1.8e9) for _ in range(20)}) == 20  # the random offset: two outboxes made at once differ
    box.close()
    again = Outbox(tmp_path / "o.db")  # reopened: numbering goes on, the clock is not read again
    assert again.enqueue([item()])[0].seq == first + 1 and again.first_seq == first
    again.close()
    assert 1 <= clock_seq(1_000_000.0) <= RANDOM_SPAN  # a clock plainly unset (1970): a random start, a warning


def test_an_outbox_from_before_first_seq_was_kept_goes_on_numbering(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, topic TEXT NOT NULL, "
                     "payload BLOB NOT NULL, created REAL NOT NULL, deadline REAL);"
                     "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
                     "INSERT INTO counters VALUES ('next_seq', 42), ('acked', 41), ('dropped', 0), ('expired', 0);")
    db.close()
    box = Outbox(path)
    assert box.enqueue([item()])[0].seq == 42 and box.first_seq == 1
    box.close()


@pytest.mark.parametrize("start, old_results", [(None, 20), (-10**9, 20), (5, 100)], ids=["as-made", "below", "among"])
def test_a_replaced_outbox_loses_nothing_at_a_real_coordinator(broker, prefix, tmp_path, start, old_results):
    """The device's card is re-imaged (its outbox file is gone) and it keeps its identity. Numbering from 1
    again, the coordinator, deduping on (device, seq), took each new result for an old one, acked it, and the
    device deleted it. As made now, a new outbox starts at the clock plus a random offset: above the old
    one, or far below it. A re-imaged Pi boots with its clock at the image's build date, before NTP, so it
    may also number below the old results (here 1000 s below) or among them. The coordinator refuses what
    comes at or below the ack and is not stored as sent, and acks up to the highest seq it holds; the device
    numbers those again above it. Each result is stored once, above the old ones."""
    import sqlite3 as sq

    from test_agent_standins import AgentProcess, agent_config, wait_for
    from test_coordinator_standins import CoordinatorProcess, coordinator_config

    coordinator = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix)).start()
    db_path = tmp_path / "coordinator.db"

    def stored() -> list[tuple[int, float]]:
        try:
            conn = sq.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        except sq.OperationalError:
            return []  # not made yet
        try:
            return conn.execute("SELECT seq, captured_at FROM results WHERE device = 'dev1' ORDER BY seq").fetchall()
        except sq.OperationalError:
            return []
        finally:
            conn.close()

    config = agent_config(tmp_path, broker.port, prefix)
    try:
        old = AgentProcess(config, tmp_path).start()
        wait_for(lambda: len(stored()) >= old_results, 60, "results of the first outbox stored")
        old.stop()
        before = stored()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{old.outbox_path}{suffix}").unlink(missing_ok=True)
        if start is not None:  # where a clock that was behind put the new file's first seq
            Outbox(old.outbox_path, first_seq=before[0][0] + start).close()
        new = AgentProcess(config, tmp_path).start()
        wait_for(lambda: len(stored()) >= len(before) + 20, 60, "results of the new outbox stored")
        new.stop()
        integrity, counters, held = new.outbox_state()
        if counters["first_seq"] > before[-1][0]:  # numbered above the old results from the start
            made = counters["next_seq"] - counters["first_seq"]
        else:  # numbered again from the old results' ack + 1 and on from there
            made = counters["next_seq"] - 1 - before[-1][0]
        assert made >= 20 and counters["acked"] >= before[-1][0]
        wait_for(lambda: len(stored()) == len(before) + made - len(held), 20, "every result the new outbox made")
        after = stored()
        assert all(seq > before[-1][0] for seq, _ in after[len(before):]), "stored below the older results"
        assert len({captured for _, captured in after}) == len(after), "a result stored twice"
        assert [row for row in after if row[0] <= before[-1][0]] == before, "an older result replaced"
    finally:
        coordinator.stop()
