"""Rows 1 and 2 of the fault plan: the broker dies while three devices produce.

Three agents produce 10 results/s each; the broker is SIGKILLed (row 1), or
stopped with SIGTERM, or SIGKILLed with persistence off (row 2), stays down
for the outage (8 s; 60 s with --long) and comes back on the same port.
What the user relies on: every result the devices numbered is stored by the
coordinator exactly once, each device's results arrive in order, and the
backlog drains in a few seconds. The guarantee must not rest on the broker:
a broker without persistence forgets every session and queue, and the
devices' outboxes still hold everything until the coordinator acks it.
"""

from __future__ import annotations

import signal
import time

import pytest

from . import rowkit
from .harness.observe import wall

pytestmark = pytest.mark.timeout(1800)  # the --long variants run for minutes
pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")

RATE_HZ = 10.0


def broker_outage(fleet_factory, figures: dict, long_run: bool, sig: int, persistence: bool,
                  queue: int = 1000, rate_hz: float = RATE_HZ, agent: dict | None = None) -> None:
    """One broker outage with three producing devices; asserts and records the row's figures.

    *queue* is the broker's max_queued_messages (per client, so also for the coordinator):
    1000 is Mosquitto's default and what ``lepton provision`` writes for a fleet this small.
    *agent*: agent config overrides.
    """
    outage = 60.0 if long_run else 8.0
    fleet = fleet_factory(devices=3, netns=False)
    fleet.start_broker(persistence=persistence, max_queued_messages=queue)
    counter = fleet.start_counter()
    fleet.start_coordinator()
    fleet.start_agents(rate_hz=rate_hz, overrides=agent)
    counter.wait_new(time.monotonic(), 10, timeout=30)  # every device flows before the fault

    down = fleet.mark("broker down")
    fleet.stop("broker", sig)
    time.sleep(outage)
    fleet.start("broker")
    up = fleet.mark("broker up")
    counter.wait_new(up, 10, timeout=60)  # fresh results of every device: the backlog went before them
    rowkit.wait_stored(fleet, timeout=120)

    produced, db, reruns = rowkit.finish(fleet)
    if reruns:
        figures["reruns"] = reruns  # agents started again to re-send what a broker dropped at their stop
    rows = rowkit.stored(fleet.coordinator_db)
    wire = fleet.report(produced)
    figures.update(
        produced=rowkit.count(produced), lost=db.lost_total, dups=db.duplicates,
        inversions=wire.inversions_total, db_inversions=rowkit.db_inversions(rows),
        wire_lost=wire.lost_total, wire_dups=wire.wire_duplicates, outage_s=round(up - down, 2),
        drain_s=rowkit.drain_s(rows, wall(up)), resume_s=counter.outage(down, up)["resume_s"],
        queue_limit=queue, integrity=db.integrity)
    assert db.lost_total == 0, f"results never stored: {rowkit.lost_summary(db)}"
    assert db.duplicates == 0 and db.extra == 0 and db.integrity == "ok"
    assert wire.inversions_total == 0, f"order broken on the wire: {wire.inversions}"
    assert figures["db_inversions"] == 0, "the coordinator stored a device's results out of order"
    assert rowkit.count(produced) >= 3 * rate_hz * outage * 0.8  # the devices kept producing while it was down


@pytest.mark.row(1, "broker SIGKILLed, 3 devices x 10/s")
def test_broker_sigkilled_while_three_devices_produce_loses_nothing(fleet_factory, figures, long_run):
    broker_outage(fleet_factory, figures, long_run, signal.SIGKILL, persistence=True)


@pytest.mark.row(2, "broker stop / amnesia, 3 x 10/s")
@pytest.mark.parametrize("sig, persistence", [(signal.SIGTERM, True), (signal.SIGKILL, False)],
                         ids=["sigterm", "kill-nopersist"])
def test_broker_stop_or_amnesia_loses_nothing(fleet_factory, figures, long_run, sig, persistence):
    broker_outage(fleet_factory, figures, long_run, sig, persistence)


@pytest.mark.row(1, "backlog 2.5x the broker's queue")
def test_backlog_larger_than_the_broker_queue_keeps_order(fleet_factory, figures, long_run):
    """An 8 s outage at 3 x 20/s leaves ~480 results to re-send into a broker queue of 100 (+100
    in flight). The devices keep at most ``ack_window`` results past the coordinator's last ack
    on the wire, set as docs/reliability.md says: devices x ack_window <= max_queued_messages."""
    broker_outage(fleet_factory, figures, long_run, signal.SIGKILL, persistence=True, queue=100, rate_hz=20.0,
                  agent={"outbox": {"ack_window": 30}})
