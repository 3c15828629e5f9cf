"""Results retention: old results are deleted, new ones and the acks are kept, ingest goes on."""

from __future__ import annotations

import re
import threading

import pytest

from test_coordinator_process import CAM, CoordinatorWatch
from test_coordinator_standins import CoordinatorProcess, StandIn, coordinator_config, db_rows, wait_for

from lepton.coordinator.db import open_db, write_tx
from lepton.coordinator.retention import CHUNK, Retention, prune_below
from lepton.protocol import Topics

INSERT = ("INSERT INTO results (device, seq, stream, model, computed_on, captured_at, infer_ms, received_at, payload) "
          "VALUES (?, ?, 's', 'm', ?, 0, 1, ?, '{}')")


def fill(db, device: str, arrivals: dict[int, float]) -> None:
    with write_tx(db):
        db.conn.executemany(INSERT, [(device, seq, device, at) for seq, at in arrivals.items()])
        db.execute("INSERT INTO acks (device, seq) VALUES (?, ?) ON CONFLICT (device) DO UPDATE SET seq = excluded.seq",
                   [device, max(arrivals)])


def seqs(db, device: str) -> list[int]:
    return [r[0] for r in db.execute("SELECT seq FROM results WHERE device = ? ORDER BY seq", [device]).fetchall()]


def test_prune_deletes_what_arrived_before_the_cutoff_per_device(tmp_path):
    db = open_db(tmp_path / "c.db")
    # a: seqs with gaps (dropped by the device), arriving one per second from t=100
    a = {s: 100.0 + i for i, s in enumerate([1, 2, 5, 6, 7, 10, 11, 20, 21, 22])}
    fill(db, "a", a)
    fill(db, "b", {s: 50.0 + s for s in range(1, 6)})  # all old
    fill(db, "c", {s: 500.0 + s for s in range(1, 6)})  # all new
    for cutoff, below in ((100.0, 0), (100.5, 2), (104.0, 7), (104.5, 10), (109.5, 23), (200.0, 23)):
        assert prune_below(db, "a", cutoff) == below, cutoff
    pruned = Retention(str(tmp_path / "c.db"), 1, 3600).prune(db, cutoff=104.5)
    assert pruned == 5 + 5
    assert seqs(db, "a") == [10, 11, 20, 21, 22]
    assert seqs(db, "b") == []
    assert seqs(db, "c") == [1, 2, 3, 4, 5]
    assert dict(db.execute("SELECT device, seq FROM acks").fetchall()) == {"a": 22, "b": 5, "c": 5}


def test_a_step_of_the_wall_clock_does_not_prune_what_this_run_stored(tmp_path, monkeypatch):
    """A coordinator whose clock is set forward by 90 days must not take an hour's results (acked, so deleted on
    the devices) for 90-day-old ones: they go when they are 30 days old by the boot clock."""
    import time

    import lepton.clock
    from lepton.coordinator.retention import DAY_S, RunFloor

    db = open_db(tmp_path / "c.db")
    keep = 30 * DAY_S
    run = RunFloor()
    real, boot, start = time.time, lepton.clock.boot_clock, time.time()

    def days_later(days: float, step_days: float = 90) -> None:  # time passes (both clocks) after the step
        monkeypatch.setattr(lepton.clock, "boot_clock", lambda: boot() + days * DAY_S)
        monkeypatch.setattr(time, "time", lambda: real() + (step_days + days) * DAY_S)

    fill(db, "old", {1: start - 31 * DAY_S})  # an earlier run's result, past the retention on any clock
    fill(db, "a", {1: start, 2: start + 0.5})  # stored by this run, before the step
    days_later(0)  # the step: the wall clock alone moves
    fill(db, "a", {3: time.time()})  # and after it
    prune = Retention(str(tmp_path / "c.db"), 30, 3600).prune
    prune(db, run.cutoff(keep))
    assert seqs(db, "a") == [1, 2, 3], "the step did not age this run's results"
    assert seqs(db, "old") == [], "what is old on either clock still goes"
    days_later(29)
    prune(db, run.cutoff(keep))
    assert seqs(db, "a") == [1, 2, 3]
    days_later(31)  # 31 days old by the boot clock: those from before the step go; the one after is 31 days old
    prune(db, run.cutoff(keep))  # too, but goes only once 90 more days passed: kept longer, never lost
    assert seqs(db, "a") == [3]


def test_after_a_backward_step_nothing_this_run_stored_is_pruned_early(tmp_path, monkeypatch):
    import time

    from lepton.coordinator.retention import DAY_S, RunFloor

    run = RunFloor()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 2 * 3600)
    assert run.cutoff(30 * DAY_S) == pytest.approx(time.time() - 30 * DAY_S, abs=1)
    monkeypatch.setattr(time, "time", lambda: real() + 90 * DAY_S)  # and then forward: floored at the lowest
    assert run.cutoff(30 * DAY_S) <= real() - 2 * 3600  # time this run stored anything at


def test_prune_goes_in_chunks_and_stops_when_asked(tmp_path):
    db = open_db(tmp_path / "c.db")
    n = 3 * CHUNK + 7
    fill(db, "a", {s: float(s) for s in range(1, n + 1)})
    stop = threading.Event()
    seen, statements = [], []
    db.conn.set_trace_callback(statements.append)
    r = Retention(str(tmp_path / "c.db"), 1, 3600, on_pruned=seen.append)
    assert r.prune(db, cutoff=n - 99.5) == n - 100
    assert seqs(db, "a") == list(range(n - 99, n + 1)) and seen == [n - 100] and r.pruned == n - 100
    # one write transaction per CHUNK rows, so ingest (another connection) gets the lock in between
    assert sum(q.startswith("BEGIN IMMEDIATE") for q in statements) == -(-(n - 100) // CHUNK) == 3
    stop.set()
    assert r.prune(db, cutoff=float(n + 1), stop=stop) == 0  # asked to stop: nothing more deleted
    assert len(seqs(db, "a")) == 100


def test_keep_zero_starts_no_thread(tmp_path):
    r = Retention(str(tmp_path / "c.db"), 0, 0.1)
    r.start(threading.Event())
    assert r._thread is None


def test_running_coordinator_prunes_old_results_and_keeps_acking(broker, prefix, tmp_path):
    """A real coordinator keeping results 6 s: what arrived before is deleted within a pass, what arrives
    after is stored and acked as always, and a re-sent recent result is still stored once."""
    keep_s = 6.0
    topics = Topics(prefix)
    cfg = coordinator_config(tmp_path, broker.port, prefix,
                             db={"keep_results_days": keep_s / 86400, "prune_every_s": 0.5})
    db = tmp_path / "coordinator.db"
    coord = CoordinatorProcess(cfg).start()
    watch = CoordinatorWatch(broker.port, topics)
    dev = StandIn(broker.port, topics, "dev-1", streams=[CAM]).connect()
    try:
        wait_for(watch.online, 20, what="coordinator online")
        for seq in range(1, 6):
            dev.result(seq)
        wait_for(lambda: dev.last_ack() == 5, 15, what="ack 5")
        assert [s for (s,) in db_rows(db, "SELECT seq FROM results ORDER BY seq")] == [1, 2, 3, 4, 5]
        wait_for(lambda: db_rows(db, "SELECT count(*) FROM results")[0][0] == 0, keep_s + 10, what="old results pruned")
        for seq in (6, 7, 8, 7):
            dev.result(seq)
        wait_for(lambda: dev.last_ack() == 8, 15, what="ack 8")
        assert [s for (s,) in db_rows(db, "SELECT seq FROM results ORDER BY seq")] == [6, 7, 8]
        assert db_rows(db, "SELECT seq FROM acks WHERE device = 'dev-1'") == [(8,)]
        # the 5 old ones may go in one pass or two
        assert sum(int(n) for n in re.findall(r"pruned (\d+) result\(s\)", coord.log_text())) >= 5
        assert dev.acks == sorted(dev.acks)
    finally:
        dev.close()
        watch.close()
        coord.stop()
