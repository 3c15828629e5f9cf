"""Rows 4 and 5 of the fault plan: the coordinator hangs, dies, and is killed mid-burst.

Row 4: the coordinator first hangs (SIGSTOP: its connection stays open, so
devices keep sending and the broker queues for it until its keepalive runs
out), then is killed and stays away (12 s in all; 300 s with --long). The
broker's queue for it is small (max_queued_messages 100; 1000 with --long),
so the broker drops results without a word. What the user relies on: the
devices re-send everything unacknowledged (after ``resend_after_s`` and when
the coordinator announces itself online again), so nothing is lost.

Row 5: the coordinator is SIGKILLed while it ingests the burst of re-sent
results that follows its return (3 times; 20 with --long). Each (device,
seq) must be stored exactly once and the database must pass
``PRAGMA integrity_check`` after every kill.
"""

from __future__ import annotations

import random
import sqlite3
import time

import pytest

from . import rowkit
from .harness.observe import broker_drop_notices, log_times, wall

pytestmark = pytest.mark.timeout(1800)  # the --long variants run for minutes
pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")

DROPPED_SYS = "$SYS/broker/publish/messages/dropped"


class SysDropped:
    """Mosquitto's own count of messages it dropped (``$SYS``, published every second)."""

    def __init__(self, fleet) -> None:
        self.value = 0
        self.client = fleet.mqtt_client(f"lxf-sys-{random.randrange(10**6)}")
        self.client.on_message = self._on_message
        self.client.subscribe(DROPPED_SYS, 0)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.value = int(msg.payload)
        except ValueError:
            pass

    def wait_above(self, floor: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.value <= floor and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.value


def resend_lines(fleet) -> int:
    """How many times the agents logged a re-send of their unacknowledged results."""
    return sum(len(log_times(fleet.procs[d].log_path, r"re-sending \d+ unacknowledged")) for d in fleet.devices)


@pytest.mark.row(4, "coordinator hung, then away; broker drops")
def test_results_the_broker_dropped_are_resent_by_the_devices(fleet_factory, figures, long_run):
    away_s, queue = (300.0, 1000) if long_run else (12.0, 100)
    # The hang lasts until the broker gives up on the coordinator (1.5 x its keepalive); a longer
    # keepalive in the long run lets more pile up than the larger queue holds.
    coordinator_keepalive = 20 if long_run else 5
    fleet = fleet_factory(devices=3, netns=False)
    fleet.start_broker(persistence=True, max_queued_messages=queue, extra_conf="sys_interval 1")
    counter = fleet.start_counter()
    sys_dropped = SysDropped(fleet)
    fleet.start_coordinator(overrides={"broker": {"keepalive": coordinator_keepalive}})
    fleet.start_agents(rate_hz=10)
    counter.wait_new(time.monotonic(), 10, timeout=30)
    dropped_before = sys_dropped.value

    hang = fleet.mark("coordinator hung")
    fleet.pause("coordinator")
    deadline = hang + 3 * coordinator_keepalive
    while not counter.seen_coordinator("offline", hang) and time.monotonic() < deadline:
        time.sleep(0.05)
    will_s = round(time.monotonic() - hang, 2) if counter.seen_coordinator("offline", hang) else None
    fleet.kill("coordinator")
    time.sleep(max(0.0, hang + away_s - time.monotonic()))
    fleet.start("coordinator", wait=30)
    up = fleet.mark("coordinator back")
    counter.wait_new(up, 10, timeout=60)
    rowkit.wait_stored(fleet, timeout=900 if long_run else 120)  # re-sends go on while the agents run

    produced, db, reruns = rowkit.finish(fleet)
    if reruns:
        figures["reruns"] = reruns  # agents started again to re-send what a broker dropped at their stop
    rows = rowkit.stored(fleet.coordinator_db)
    broker_dropped = sys_dropped.wait_above(dropped_before, timeout=3) - dropped_before
    figures.update(lost=db.lost_total, dups=db.duplicates, produced=rowkit.count(produced),
                   away_s=round(up - hang, 1), queue_limit=queue, broker_dropped=broker_dropped,
                   drop_notices=broker_drop_notices(fleet.broker.log_path), coordinator_will_s=will_s,
                   resends=resend_lines(fleet), drain_s=rowkit.drain_s(rows, wall(up)), integrity=db.integrity)
    assert broker_dropped > 0, "the broker's queue never overflowed: the row tested nothing"
    assert db.lost_total == 0, f"results never stored: {rowkit.lost_summary(db)}"
    assert db.duplicates == 0 and db.extra == 0 and db.integrity == "ok"


def db_rows(fleet) -> int:
    conn = sqlite3.connect(f"file:{fleet.coordinator_db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        conn.close()


def db_integrity(fleet) -> str:
    conn = sqlite3.connect(f"file:{fleet.coordinator_db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def kill_mid_burst(fleet, rng: random.Random, rate: float, timeout: float = 30.0) -> tuple[int, int]:
    """Start the coordinator and SIGKILL it once it is storing the re-sent backlog.

    Returns (rows stored by this run before the kill, results outstanding at the kill).
    """
    before = db_rows(fleet)
    fleet.start("coordinator")
    deadline = time.monotonic() + timeout
    while db_rows(fleet) == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the coordinator stored nothing within {timeout}s:\n{fleet.log_tails()}")
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.01))
    fleet.kill("coordinator")
    outstanding = rowkit.count(fleet.produced()) - db_rows(fleet)
    return db_rows(fleet) - before, outstanding


@pytest.mark.row(5, "coordinator SIGKILLed mid-burst")
def test_coordinator_killed_mid_burst_stores_each_result_once(fleet_factory, figures, long_run):
    # Small ingest batches: the first commit after a start takes 5 of the backlog, not all of it (it took
    # the whole backlog often enough that 3 kills could all land after it, testing nothing). The short
    # variant kills 3 times, more (up to 8) until one kill lands while a backlog is owed.
    kills, max_kills = (20, 20) if long_run else (3, 8)
    rate = 20.0
    rng = random.Random(5)
    fleet = fleet_factory(devices=3, netns=False)
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    fleet.start_coordinator(overrides={"db": {"batch_max": 5}})
    fleet.start_agents(rate_hz=rate)
    counter.wait_new(time.monotonic(), 10, timeout=30)

    fleet.kill("coordinator")
    integrity, mid_burst, stored_before_kill = [], 0, []
    while len(integrity) < kills or (not mid_burst and len(integrity) < max_kills):
        time.sleep(2.0)  # a backlog builds up in the devices' outboxes
        stored_now, outstanding = kill_mid_burst(fleet, rng, rate)
        stored_before_kill.append(stored_now)
        mid_burst += outstanding > rate * len(fleet.devices) * 0.5  # more than half a second still owed
        integrity.append(db_integrity(fleet))
    fleet.start("coordinator")  # not waited for by status: the counter may miss it in a burst
    up = fleet.mark("coordinator up for good")
    counter.wait_new(up, 10, timeout=60)
    rowkit.wait_stored(fleet, timeout=120)

    produced, db, reruns = rowkit.finish(fleet)
    if reruns:
        figures["reruns"] = reruns  # agents started again to re-send what a broker dropped at their stop
    figures.update(lost=db.lost_total, dups=db.duplicates, kills=len(integrity), mid_burst=mid_burst,
                   stored_before_kill=stored_before_kill, produced=rowkit.count(produced),
                   integrity_failures=sum(1 for v in integrity if v != "ok"), integrity=db.integrity,
                   extra=db.extra)
    assert all(v == "ok" for v in integrity), f"integrity after kills: {integrity}"
    assert mid_burst >= 1, "no kill landed while a backlog was owed: the row tested nothing"
    assert db.lost_total == 0, f"results never stored: {rowkit.lost_summary(db)}"
    assert db.duplicates == 0 and db.extra == 0 and db.integrity == "ok"
