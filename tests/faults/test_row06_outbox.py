"""Rows 6 and 7 of the fault plan: the device's outbox under crashes and under a long outage.

Row 6: agents are SIGKILLed while they write their outbox (6 times; 100
with --long), one of them while its link is cut. Every kill must leave an
outbox that passes ``PRAGMA integrity_check``, sequence numbers must never
go back (a reused seq would be stored once and the other result silently
lost), and every result the outbox committed must reach the coordinator.

Row 7: devices stay offline much longer than their outbox holds (bounds of
100 rows, or 48 KiB of payload; 1000 rows / 480 KiB with --long). The bound
must hold at every moment, the oldest results go first, each drop is
counted and reported in telemetry, nothing still held is lost, and the
agent's memory stays flat.
"""

from __future__ import annotations

import random
import sqlite3
import time

import pytest

from . import rowkit
from .harness.observe import Sampler

pytestmark = pytest.mark.timeout(1800)  # the --long variants run for minutes
pytest.importorskip("lepton.agent.cli", reason="the agent is not built into this install")
pytest.importorskip("lepton.coordinator.app", reason="the coordinator is not built into this install")


def wait_writing(fleet, devices: list[str], before: dict[str, int], timeout: float = 30.0) -> None:
    """Wait until each device numbered a result since *before* (it is writing its outbox)."""
    deadline = time.monotonic() + timeout
    waiting = set(devices)
    while waiting:
        waiting = {d for d in waiting if fleet.outbox_counters(d)["next_seq"] <= before[d]}
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"{sorted(waiting)} wrote nothing within {timeout}s:\n{fleet.log_tails()}")
        time.sleep(0.01)


def kill_round(fleet, rng: random.Random, numbered: dict[str, range | None], failures: list[str]) -> int:
    """SIGKILL every agent at a random moment while it writes, check its outbox, start it again.

    Appends integrity failures to *failures*, updates *numbered* (the seqs each outbox
    has numbered, ``range(first_seq, next_seq)``) and returns how many outboxes numbered
    less than before or numbered from elsewhere (a replaced file: what the old one held is gone).
    """
    before = {d: fleet.outbox_counters(d)["next_seq"] for d in fleet.devices}
    wait_writing(fleet, fleet.devices, before)
    time.sleep(rng.uniform(0.0, 0.3))
    for dev in fleet.devices:
        fleet.kill(dev)
    went_back = 0
    for dev in fleet.devices:
        verdict = fleet.outbox_integrity(dev)
        if verdict != "ok":
            failures.append(f"{dev}: {verdict}")
        counters = fleet.outbox_counters(dev)
        after, last = range(counters["first_seq"], counters["next_seq"]), numbered[dev]
        went_back += last is not None and (after.start != last.start or after.stop < last.stop)
        numbered[dev] = after
        fleet.start(dev)
    return went_back


@pytest.mark.netns
@pytest.mark.row(6, "agent SIGKILLed mid-write (one partitioned)")
def test_agent_killed_mid_write_keeps_outbox_and_loses_nothing(fleet_factory, figures, long_run):
    kills = 100 if long_run else 6
    rng = random.Random(6)
    fleet = fleet_factory(devices=2)
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    fleet.start_coordinator()
    # Two streams at 25/s each: a group commit every few tens of milliseconds, so a kill
    # at a random moment often lands inside one.
    fleet.start_agents(rate_hz=25, streams=2)
    counter.wait_new(time.monotonic(), 10, timeout=30)
    fleet.cut("dev-2", "drop")

    failures, went_back, numbered = [], 0, {d: None for d in fleet.devices}
    for _ in range(kills):
        went_back += kill_round(fleet, rng, numbered, failures)

    restored = fleet.restore("dev-2")
    counter.wait_new(restored, 10, timeout=60)
    rowkit.wait_stored(fleet, timeout=120)
    produced, db, reruns = rowkit.finish(fleet)
    if reruns:
        figures["reruns"] = reruns  # agents started again to re-send what a broker dropped at their stop
    figures.update(lost=db.lost_total, dups=db.duplicates, kills=kills * len(fleet.devices),
                   integrity_failures=len(failures), seq_went_back=went_back, seq_reused=rowkit.seq_reuse(fleet),
                   produced=rowkit.count(produced), dropped=sum(fleet.outbox_counters(d)["dropped"] for d in fleet.devices))
    assert not failures, f"outbox integrity after SIGKILL: {failures}"
    assert went_back == 0 and figures["seq_reused"] == 0, "a sequence number was given twice (or an outbox was replaced)"
    assert db.lost_total == 0, f"committed results never stored: {rowkit.lost_summary(db)}"
    assert db.duplicates == 0 and db.extra == 0 and figures["dropped"] == 0


def outbox_size(fleet, device: str) -> tuple[int, int]:
    """(rows, payload bytes) held in *device*'s outbox now."""
    conn = sqlite3.connect(f"file:{fleet.outbox_path(device)}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
    finally:
        conn.close()


def wait_telemetry_dropped(fleet, device: str, dropped: int, timeout: float = 15.0) -> int:
    """Wait for telemetry from *device* that reports *dropped*; the newest figure it reported."""
    deadline = time.monotonic() + timeout
    while True:
        tele = fleet.counter.telemetry.get(device)
        reported = tele.outbox_dropped if tele is not None else -1
        if reported == dropped or time.monotonic() > deadline:
            return reported
        time.sleep(0.1)


def wait_acked_up(fleet, device: str, slack: int, timeout: float) -> None:
    """Wait until *device*'s outbox holds at most *slack* results: the coordinator acked past the gap."""
    deadline = time.monotonic() + timeout
    while fleet.outbox_counters(device)["depth"] > slack:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{device}: outbox not acknowledged down to {slack}: {fleet.outbox_counters(device)}")
        time.sleep(0.1)


def test_outbox_bound_holds_between_its_own_commits(tmp_path):
    """Row 7, in process: another reader (or a crash) at any commit boundary sees the bound held.

    A trace callback on the outbox's connection looks at the file from a second
    connection at the start of every statement, i.e. after each earlier commit.
    """
    from lepton.agent.outbox import Outbox, Pending

    box = Outbox(tmp_path / "outbox.db", max_rows=3, max_bytes=1024, first_seq=1)
    reader = sqlite3.connect(tmp_path / "outbox.db")
    seen: list[tuple[int, int]] = []

    def look(sql: str) -> None:
        if sql.startswith("BEGIN"):
            seen.append(reader.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone())

    box._db.set_trace_callback(look)
    for size in (10, 10, 10, 10, 600, 600, 10):
        box.enqueue([Pending("s", "t", lambda seq, floor, size=size: b"x" * size)])
    look("BEGIN")
    reader.close()
    assert box.dropped > 0 and seen
    assert max(r for r, _ in seen) <= 3 and max(b for _, b in seen) <= 1024, f"over the bound between commits: {seen}"


def offline(fleet, seconds: float) -> tuple[dict, dict, dict[str, int]]:
    """Cut every device's link for *seconds*, sampling outbox size (0.1 s) and RSS (1 s).

    Returns (size samplers, RSS samplers, the seq each device had acknowledged at the cut).
    """
    acked_at_cut = {}
    for dev in fleet.devices:
        acked_at_cut[dev] = fleet.outbox_counters(dev)["acked"]
        fleet.cut(dev, "drop")
    sizes = {d: Sampler(f"size-{d}", lambda d=d: outbox_size(fleet, d), 0.1).start() for d in fleet.devices}
    rss = {d: Sampler(f"rss-{d}", lambda d=d: fleet.rss_mb(d), 1.0).start() for d in fleet.devices}
    time.sleep(seconds)
    for sampler in [*sizes.values(), *rss.values()]:
        sampler.stop()
    return sizes, rss, acked_at_cut


def check_policy(dev: str, missing: list[int], dropped: int, reported: int, acked_at_cut: int) -> None:
    """Drop-oldest, as the coordinator's store shows it: the results never stored are one run of
    the oldest of the outage, no more than the drops counted, and telemetry reported the count.
    (Fewer can be missing than were dropped: a dropped result may have reached the coordinator
    just before the cut, with its ack lost.)"""
    assert missing, f"{dev}: nothing was dropped: the bound was never reached"
    assert missing == list(range(missing[0], missing[-1] + 1)), f"{dev}: drops not one oldest run: {missing[:20]}"
    assert missing[0] > acked_at_cut, f"{dev}: a result acknowledged before the outage is missing"
    assert len(missing) <= dropped, f"{dev}: {len(missing)} missing but only {dropped} drops counted"
    assert reported == dropped, f"{dev}: telemetry reported {reported} drops of {dropped}"


def rss_points(sizes: Sampler, rss: Sampler, bound: dict) -> tuple[float, float, float]:
    """RSS (MB) when the outage began, when the outbox first reached its bound, and at the end."""
    rows_max, bytes_max = bound.get("max_rows", 10**9), bound.get("max_bytes", 10**12)
    # A byte bound is reached within one payload of it.
    full_t = next((t for t, (r, b) in sizes.samples if r >= rows_max or b >= 0.95 * bytes_max), None)
    if full_t is None:
        raise AssertionError(f"the outbox never reached its bound {bound}")
    at_full = next((v for t, v in rss.samples if t >= full_t), rss.samples[-1][1])
    return rss.samples[0][1], at_full, rss.samples[-1][1]


@pytest.mark.netns
@pytest.mark.row(7, "outbox full: bound, drop-oldest, counted")
def test_full_outbox_holds_its_bound_and_drops_the_oldest(fleet_factory, figures, long_run):
    scale = 10 if long_run else 1
    offline_s = 300.0 if long_run else 15.0
    bounds = {"dev-1": {"max_rows": 100 * scale}, "dev-2": {"max_bytes": 48 * 1024 * scale}}
    fleet = fleet_factory(devices=2)
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    fleet.start_coordinator()
    for dev, bound in bounds.items():
        fleet.start_agent(dev, rate_hz=10, overrides={"outbox": bound})
    counter.wait_new(time.monotonic(), 10, timeout=30)

    sizes, rss, acked_at_cut = offline(fleet, offline_s)
    for dev in fleet.devices:
        fleet.restore(dev)
    for dev in fleet.devices:
        wait_acked_up(fleet, dev, slack=30, timeout=120)
    dropped = {d: fleet.outbox_counters(d)["dropped"] for d in fleet.devices}
    reported = {d: wait_telemetry_dropped(fleet, d, dropped[d]) for d in fleet.devices}
    produced = rowkit.stop_all(fleet)
    db = rowkit.wait_last_stored(fleet, produced, timeout=60)  # lost here = results the policy dropped

    max_rows = max(r for r, _ in sizes["dev-1"].values())
    max_bytes = max(b for _, b in sizes["dev-2"].values())
    figures.update(produced=rowkit.count(produced), dropped=sum(dropped.values()), reported=sum(reported.values()),
                   max_rows_seen=max_rows, row_bound=bounds["dev-1"]["max_rows"], max_bytes_seen=max_bytes,
                   byte_bound=bounds["dev-2"]["max_bytes"], offline_s=offline_s)
    lost = 0
    for dev in fleet.devices:
        missing = db.lost.get(dev, [])
        lost += max(0, len(missing) - dropped[dev])
        rss_start, rss_full, rss_end = rss_points(sizes[dev], rss[dev], bounds[dev])
        figures.update({f"{dev}_dropped": dropped[dev], f"{dev}_missing": len(missing),
                        f"{dev}_rss_mb": f"{rss_start:.1f}->{rss_full:.1f}->{rss_end:.1f}"})
        check_policy(dev, missing, dropped[dev], reported[dev], acked_at_cut[dev])
        assert rss_end - rss_full <= 8.0, f"{dev}: RSS grew {rss_full:.1f} -> {rss_end:.1f} MB while full"
    figures.update(lost=lost, dups=db.duplicates)
    assert max_rows <= bounds["dev-1"]["max_rows"] and max_bytes <= bounds["dev-2"]["max_bytes"]
    assert db.duplicates == 0 and db.extra == 0 and db.integrity == "ok"
