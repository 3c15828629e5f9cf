"""One real agent and a real coordinator through the harness, end to end.

The agent runs in its own network namespace and produces results from a
synthetic camera through a zoo model; its link is reset for two seconds in
the middle. Every result it numbered must be stored by the coordinator
exactly once, in order, and acknowledged back.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")
registry = pytest.importorskip("lepton.models.registry", reason="the model registry is not built into this install")
if not (registry.zoo_dir() / "digits-int8" / "manifest.json").is_file():
    pytest.skip("the zoo has no digits-int8 model yet (models/build)", allow_module_level=True)


@pytest.mark.netns
@pytest.mark.row("smoke", "one agent + coordinator, 2 s link reset")
def test_one_agent_and_coordinator_lose_nothing_across_a_link_reset(fleet_factory, figures):
    fleet = fleet_factory(devices=1)
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    fleet.start_coordinator()
    fleet.start_agent("dev-1", rate_hz=10)
    counter.wait_count(10, timeout=30)

    cut_at = fleet.cut("dev-1", mode="reject")
    time.sleep(2)
    restored_at = fleet.restore("dev-1")
    counter.wait_new(restored_at, 10, timeout=30)
    fleet.stop("dev-1")  # clean stop: the outbox says how many were numbered

    produced = fleet.produced()
    drained_at = counter.wait_for(produced, timeout=30)
    acked_at = counter.wait_acked(produced, timeout=30)
    report, db = fleet.report(produced), fleet.check_db(produced)
    outage = counter.outage(cut_at, restored_at, "dev-1")
    figures.update(produced=len(produced["dev-1"]), lost=db.lost_total, dups=db.duplicates,
                   inversions=report.inversions_total, wire_dups=report.wire_duplicates,
                   outage_s=round(restored_at - cut_at, 2), **outage,
                   drain_s=round(drained_at - restored_at, 2), ack_s=round(acked_at - restored_at, 2))
    assert len(produced["dev-1"]) >= 20
    assert report.lost_total == 0 and report.inversions_total == 0
    assert db.lost_total == 0 and db.duplicates == 0 and db.extra == 0 and db.integrity == "ok"
