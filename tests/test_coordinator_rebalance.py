"""Rebalancing on a real registry database with the real planner: what gets published, to whom, and why."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from lepton.coordinator.config import load_config
from lepton.coordinator.db import open_db
from lepton.coordinator.rebalance import Rebalancer
from lepton.coordinator.registry import FleetRegistry
from lepton.protocol import Topics, decode
from lepton.protocol import messages as m

pytest.importorskip("lepton.coordinator.planner")

SHA = "cd" * 32


class Recorder:
    """Collects what the rebalancer publishes (the MQTT side is tested in the process-level tests)."""

    def __init__(self, topics: Topics):
        self.topics, self.sent = topics, []

    def publish(self, topic, payload, qos, retain=False):
        assert qos == 1 and retain, "placements are QoS 1 and retained"
        self.sent.append(decode("desired", payload))

    def take(self) -> dict[str, m.Desired]:
        out = {d.device: d for d in self.sent}
        self.sent = []
        return out


def birth(reg, device, cpu, streams=(), link=None, now=None):
    caps = m.Capabilities(cpu_count=cpu, memory_mb=1024, arch="aarch64", runtime="ai-edge-litert",
                          runtime_version="2", cpu_share=cpu, link=link or {})
    msg = m.Status(device=device, state="online", ts=now or time.time(), capabilities=caps,
                   streams=[m.StreamInfo(**s) for s in streams])
    with reg.db.atomic():
        return reg.apply_status(msg, time.time())


def telemetry(reg, device, ms):
    msg = m.Telemetry(device=device, ts=time.time(), models={"digits": m.ModelTiming(p50_ms=ms, p95_ms=ms, count=5)})
    with reg.db.atomic():
        return reg.apply_telemetry(msg, time.time())


@pytest.fixture
def fleet(tmp_path):
    """A weak camera device (1 core, 80 ms per input) beside a strong peer (8 cores, 2 ms)."""
    db_path = tmp_path / "c.db"
    reg = FleetRegistry(open_db(db_path))
    reg.set_models([{"name": "digits", "version": "1.0.0", "sha256": SHA, "size": 200_000, "memory_mb": 4.0,
                     "compute_ms": 3.0, "family": "digits", "variant": "int8"}])
    cam = {"id": "cam", "model": "digits", "rate_hz": 10, "payload_bytes": 256}
    fast = {"up_mbps": 100, "down_mbps": 100, "rtt_ms": 2}
    birth(reg, "weak", 1, [cam], fast)
    birth(reg, "strong", 8, [], fast)
    telemetry(reg, "weak", 80.0)
    telemetry(reg, "strong", 2.0)
    topics = Topics("t/v1")
    rec = Recorder(topics)
    cfg = load_config(data={"planner": {"time_limit_s": 2, "migration_penalty_ms": 20}})
    reb = Rebalancer(str(db_path), topics, rec, cfg.planner, 15.0, "http://models.example:8080")
    reb.attach()
    yield reg, reb, rec, db_path


def test_offload_to_the_strong_peer_is_published_to_both(fleet):
    reg, reb, rec, _ = fleet
    reb.plan_once("test")
    sent = rec.take()
    assert set(sent) == {"weak", "strong"}
    assert [(r.device, r.share) for r in sent["weak"].routes["cam"]] == [("strong", 1.0)]
    assert sent["weak"].models == []
    assert sent["strong"].serve == {"weak": ["cam"]}
    ref = sent["strong"].models[0]
    assert (ref.name, ref.version, ref.sha256, ref.size) == ("digits", "1.0.0", SHA, 200_000)
    assert ref.url == "http://models.example:8080/models/digits/1.0.0/model.tflite"
    assert sent["strong"].generation == 1
    reb.plan_once("again")
    assert rec.take() == {}, "nothing changed: nothing published"
    kinds = [r["kind"] for r in reg.db.query("SELECT kind FROM events WHERE kind = 'placement'")]
    assert len(kinds) == 2


def test_failed_load_degrades_and_is_excluded_next_time(fleet):
    reg, reb, rec, _ = fleet
    reb.plan_once("test")
    rec.take()
    failed = m.Reported(device="strong", generation=1, ts=time.time(),
                        models={"digits": m.ModelState(state="failed", version="1.0.0", reason="sha256 mismatch")})
    with reg.db.atomic():
        changes = reg.apply_reported(failed, time.time())
    assert [c.kind for c in changes] == ["failed"]
    dev = reg.device("strong")
    assert dev["degraded"] == 1 and dev["degraded_reason"] == "digits"
    reb.plan_once("failed strong")
    sent = rec.take()
    assert [(r.device, r.share) for r in sent["weak"].routes["cam"]] == [("weak", 1.0)]
    assert [r.name for r in sent["weak"].models] == ["digits"]
    assert sent["strong"].models == [] and sent["strong"].generation == 2
    detail = [r["detail"] for r in reg.db.query("SELECT detail FROM events WHERE kind = 'model-failed'")]
    assert detail == ["digits 1.0.0: sha256 mismatch"]


def test_degraded_clears_when_the_report_names_no_failure_and_a_repeat_failure_is_excluded_again(fleet):
    reg, reb, rec, _ = fleet
    fail = {"digits": m.ModelState(state="failed", version="1.0.0", reason="sha256 mismatch")}

    def report(generation, models):
        with reg.db.atomic():
            return reg.apply_reported(m.Reported(device="strong", generation=generation, ts=time.time(), models=models),
                                      time.time())

    def routes():
        reb.plan_once("test")
        row = list(reg.db.query("SELECT plan FROM plans ORDER BY id DESC LIMIT 1"))[0]
        return [(r["device"], r["share"]) for r in json.loads(row["plan"])["routes"]["cam"]]

    assert routes() == [("strong", 1.0)]
    report(1, fail)
    assert routes() == [("weak", 1.0)]
    report(2, {})  # the plan took digits away: the report no longer names it
    assert reg.device("strong")["degraded"] == 0
    assert routes() == [("weak", 1.0)], "still excluded within exclude_failed_s"
    with reg.db.atomic():  # the exclusion window (600 s) has passed
        reg.db.execute("UPDATE failures SET at = at - 700")
    assert routes() == [("strong", 1.0)]
    assert [c.kind for c in report(3, fail)] == ["failed"], "the same failure on a new attempt is news"
    assert reg.device("strong")["degraded"] == 1
    assert routes() == [("weak", 1.0)], "excluded again"
    events = [r["kind"] for r in reg.db.query("SELECT kind FROM events WHERE device = 'strong' ORDER BY rowid")]
    assert events.count("model-failed") == 2 and "recovered" in events


def test_a_new_version_the_devices_refuse_leaves_the_old_one_serving_where_it_was(fleet):
    """digits 1.1.0 is signed with a key the devices do not trust. The device told to load it keeps serving
    1.0.0 and reports 1.1.0 failed; the next plan must keep the stream there on 1.0.0, not take the model
    off that device and send 1.1.0 to the next one (which refused it too, until the stream was unserved)."""
    reg, reb, rec, _ = fleet
    with reg.db.atomic():  # the stream is served on strong, with 1.0.0
        reg.apply_reported(m.Reported(device="strong", generation=1, ts=time.time(), models={
            "digits": m.ModelState(state="loaded", version="1.0.0", sha256=SHA, invoke_ms=2.0)}), time.time())
    reg.set_models([
        {"name": "digits", "version": v, "sha256": sha, "size": 200_000, "memory_mb": 4.0, "compute_ms": 3.0,
         "family": "digits", "variant": "int8"} for v, sha in (("1.0.0", SHA), ("1.1.0", "ef" * 32))])
    reb.plan_once("a new version in the registry")
    sent = rec.take()
    assert [(r.name, r.version) for r in sent["strong"].models] == [("digits", "1.1.0")]

    def report(generation, state, version):
        reason = "" if state == "loaded" else "signature check failed (still serving version 1.0.0)"
        with reg.db.atomic():
            return reg.apply_reported(m.Reported(device="strong", generation=generation, ts=time.time(), models={
                "digits": m.ModelState(state=state, version=version, sha256=SHA if version == "1.0.0" else "ef" * 32,
                                       reason=reason)}), time.time())

    assert [c.kind for c in report(2, "failed", "1.1.0")] == ["failed"]
    reb.plan_once("failed strong")
    sent = rec.take()
    assert set(sent) == {"strong"}, "the camera's routes did not change: it is not told anything new"
    assert [(r.name, r.version) for r in sent["strong"].models] == [("digits", "1.0.0")]
    assert sent["strong"].serve == {"weak": ["cam"]}
    report(3, "loaded", "1.0.0")  # it runs the old version: the failure of the new one stays on record
    reb.plan_once("timer")
    assert rec.take() == {}, "no new generation: 1.0.0 stays, 1.1.0 is not tried again within the window"
    row = list(reg.db.query("SELECT plan FROM plans ORDER BY id DESC LIMIT 1"))[0]
    assert [(r["device"], r["share"]) for r in json.loads(row["plan"])["routes"]["cam"]] == [("strong", 1.0)]
    with reg.db.atomic():  # past the exclusion window, the new version is tried again
        reg.db.execute("UPDATE failures SET at = at - 700")
    reb.plan_once("timer")
    assert [(r.name, r.version) for r in rec.take()["strong"].models] == [("digits", "1.1.0")]


def test_a_share_that_moves_by_measurement_noise_is_not_published_again(fleet):
    """One core at 80% holds 10 inputs/s of 80 ms: a stream measured at 10.1-10.2 Hz is split (~99% served),
    and its share moves a little with each measurement. Only a real move makes a new generation."""
    reg, reb, rec, _ = fleet
    with reg.db.atomic():
        reg.apply_status(m.Status(device="strong", state="offline", ts=time.time()), time.time())

    def timer_plan(rate_hz: float) -> dict:
        with reg.db.atomic():
            reg.apply_telemetry(m.Telemetry(device="weak", ts=time.time(), streams={"cam": rate_hz}), time.time())
        reb.plan_once("timer")
        return rec.take()

    first = timer_plan(10.1)
    assert [r.share for r in first["weak"].routes["cam"]] == [pytest.approx(10 / 10.1, abs=1e-3)]
    for rate in (10.15, 10.05, 10.2):
        assert timer_plan(rate) == {}, f"re-published at {rate} Hz"
    moved = timer_plan(15.0)
    assert [r.share for r in moved["weak"].routes["cam"]] == [pytest.approx(10 / 15, abs=1e-3)]
    assert moved["weak"].generation == first["weak"].generation + 1


def test_measurement_noise_between_two_equal_workers_moves_no_stream(fleet):
    """Two strong workers hold the model and cost the same but for noise: each timer plan used to send the stream
    to whichever measured a fraction faster last (a walkthrough saw 474 such moves back and forth in 8 minutes).
    A move needs more than ``route_hold`` (5%); a real difference still moves it."""
    reg, reb, rec, _ = fleet
    birth(reg, "strong2", 8, [], {"up_mbps": 100, "down_mbps": 100, "rtt_ms": 2})
    for dev in ("strong", "strong2"):
        with reg.db.atomic():
            reg.apply_reported(m.Reported(device=dev, generation=1, ts=time.time(), models={
                "digits": m.ModelState(state="loaded", version="1.0.0", sha256=SHA, invoke_ms=2.0)}), time.time())

    def measured(dev: str, ms: float) -> None:
        for _ in range(20):  # the whole window: the median is ms
            telemetry(reg, dev, ms)

    reb.plan_once("test")
    first = rec.take()["weak"].routes["cam"]
    assert len(first) == 1 and first[0].device in ("strong", "strong2")
    serving = first[0].device
    other = "strong2" if serving == "strong" else "strong"
    for ms in (1.96, 1.9, 1.97):  # 2-5% faster on the other worker: noise
        measured(other, ms)
        reb.plan_once("timer")
        assert rec.take() == {}, f"moved for {ms} ms against 2 ms"
    measured(other, 1.0)  # twice as fast: a real difference
    reb.plan_once("timer")
    assert [r.device for r in rec.take()["weak"].routes["cam"]] == [other]


def test_a_new_device_is_assumed_as_fast_as_devices_of_its_kind_not_the_bench_machine(fleet):
    """A device that has run nothing was planned with the zoo's bench profile (3 ms, the build machine): a camera
    that just joined was sent other devices' streams and lost them when it measured 80 ms two seconds later."""
    from lepton.coordinator import fleetview

    reg, reb, rec, _ = fleet
    with reg.db.atomic():
        reg.apply_status(m.Status(device="strong", state="offline", ts=time.time()), time.time())
    birth(reg, "weak2", 1, [], {"up_mbps": 100, "down_mbps": 100, "rtt_ms": 2})  # a camera like weak
    birth(reg, "odd", 4, [], {"up_mbps": 100, "down_mbps": 100, "rtt_ms": 2})  # a kind nobody measured
    emulated = m.Capabilities(cpu_count=1, memory_mb=1024, arch="aarch64", runtime="ai-edge-litert",
                              runtime_version="2 (slowdown x400)", cpu_share=1)  # like weak, but runs slower
    with reg.db.atomic():
        reg.apply_status(m.Status(device="emu", state="online", ts=time.time(), capabilities=emulated), time.time())
    devices = {d["id"]: d for d in fleetview.build(reg, reb.params).snapshot["devices"]}
    assert devices["emu"]["compute_scale"] == 1.0, "another runtime version: another kind"
    assert devices["weak"]["compute_scale"] == pytest.approx(80 / 3, rel=1e-3)  # its own: 80 ms against 3
    assert devices["weak2"]["compute_scale"] == devices["weak"]["compute_scale"]  # its kind's
    assert devices["odd"]["compute_scale"] == 1.0  # nothing better known: the bench profile
    reb.plan_once("new devices")
    # not to the untried twin of the camera; to the untried device of unknown kind, taken at the bench profile
    assert [r.device for r in rec.take()["weak"].routes["cam"]] == ["odd"]


def test_offline_device_is_planned_around_and_not_told(fleet):
    reg, reb, rec, _ = fleet
    reb.plan_once("test")
    rec.take()
    will = m.Status(device="strong", state="offline", ts=time.time(), reason="last will")
    with reg.db.atomic():
        assert [c.kind for c in reg.apply_status(will, time.time())] == ["offline"]
        assert reg.apply_status(will, time.time()) == [], "a replayed will changes nothing"
    reb.plan_once("offline strong")
    sent = rec.take()
    assert set(sent) == {"weak"}
    assert [(r.device, r.share) for r in sent["weak"].routes["cam"]] == [("weak", 1.0)]


def test_stale_telemetry_makes_a_device_offline_for_planning(fleet):
    reg, reb, rec, _ = fleet
    reb.plan_once("test")
    rec.take()
    reg.db.execute("UPDATE devices SET status_at = ?, telemetry_at = ? WHERE id = 'strong'", [1.0, 1.0])
    with reg.db.atomic():
        changes = reg.mark_stale(time.time(), 15.0)
    assert [(c.kind, c.device) for c in changes] == [("stale", "strong")]
    reb.plan_once("stale strong")
    assert [(r.device, r.share) for r in rec.take()["weak"].routes["cam"]] == [("weak", 1.0)]
    assert [c.kind for c in telemetry(reg, "strong", 2.0)] == ["measured", "online"]


def test_no_device_is_called_stale_while_the_coordinator_itself_is_cut_off(fleet):
    """A broker outage silences every device at once: the sweep waits while the coordinator's own session is
    down, and gives devices one liveness period after it reconnects, instead of marking the fleet stale."""
    reg, reb, rec, _ = fleet

    def sweep() -> list[str]:
        reb._swept = 0.0
        reb._due(False)
        return sorted(d["id"] for d in reg.devices() if d["liveness"] == "stale")

    reb.started = time.monotonic() - 100  # long past start-up
    with reg.db.atomic():
        reg.db.execute("UPDATE devices SET status_at = status_at - 60, telemetry_at = telemetry_at - 60")
    reb.bus_connected = lambda: False
    assert sweep() == []
    reb.bus_connected = lambda: True
    reb.republish()  # what the bus calls on reconnect
    assert sweep() == [], "one period of grace after the reconnect"
    reb.started -= 16  # stale_after_s (15 s) passed since the reconnect and still nothing heard
    assert sweep() == ["strong", "weak"]


@pytest.mark.parametrize("step_s", [90 * 86400.0, -2 * 3600.0])
def test_liveness_follows_a_step_of_the_wall_clock(fleet, monkeypatch, step_s):
    """Set forward by 90 days, the clock made every device look silent for 90 days (all called stale at once);
    set back by 2 hours, a device that then went silent stayed online for 2 hours. The times devices were last
    heard move with the step; what is heard after it is not moved."""
    reg, reb, rec, _ = fleet
    reb.started = time.monotonic() - 100  # long past start-up
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + step_s)
    reb._swept = 0.0
    reb._due(False)
    assert sorted(d["id"] for d in reg.devices() if d["liveness"] == "stale") == []
    now = time.time()
    assert [d["id"] for d in reg.silent(now + 1, 15.0)] == [], "heard just now on the new clock"
    assert sorted(d["id"] for d in reg.silent(now + 16, 15.0)) == ["strong", "weak"], "stale 15 s from now"
    time.sleep(1.1)
    telemetry(reg, "strong", 2.0)  # heard after the step, a second later: on the new clock already
    reb._swept = 0.0
    reb._due(False)  # no second step: nothing moves again
    assert [d["id"] for d in reg.silent(now + 16, 15.0)] == ["weak"]
    events = [(e["kind"], e["detail"]) for e in reg.db.query("SELECT kind, detail FROM events WHERE kind = 'clock-step'")]
    assert len(events) == 1 and ("forward" if step_s > 0 else "back") in events[0][1]


def test_a_clock_step_whose_write_fails_is_applied_at_the_next_round(fleet, monkeypatch):
    """A locked or full database when the step is seen: the step waits, no device is called stale on the unmoved
    times, and the next round moves them."""
    reg, reb, rec, _ = fleet
    reb.started = time.monotonic() - 100
    weak_at = reg.device("weak")["telemetry_at"]
    real, shift = time.time, reb.registry.shift_clock
    monkeypatch.setattr(time, "time", lambda: real() + 90 * 86400)

    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(reb.registry, "shift_clock", full)
    with pytest.raises(sqlite3.OperationalError):
        reb._due(False)
    assert reg.device("weak")["liveness"] == "online" and reg.device("weak")["telemetry_at"] == weak_at
    monkeypatch.setattr(reb.registry, "shift_clock", shift)
    reb._swept = 0.0
    reb._due(False)
    assert reg.device("weak")["telemetry_at"] == pytest.approx(weak_at + 90 * 86400, abs=3)
    assert sorted(d["id"] for d in reg.devices() if d["liveness"] == "stale") == []


def test_a_clock_step_leaves_times_an_earlier_run_wrote(fleet, monkeypatch):
    """Times written before this coordinator started were on the clock of their own run: a step seen now is not
    theirs (moved, a device heard before a restart would have looked heard in the future after a forward step)."""
    reg, reb, rec, _ = fleet
    before_run = reb._run_from - 50
    reg.db.execute("UPDATE devices SET status_at = ?, telemetry_at = ? WHERE id = 'strong'", [before_run, before_run])
    weak_at = reg.device("weak")["telemetry_at"]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 90 * 86400)
    reb._due(False)
    strong, weak = reg.device("strong"), reg.device("weak")
    assert (strong["status_at"], strong["telemetry_at"]) == (before_run, before_run)
    assert weak["telemetry_at"] == pytest.approx(weak_at + 90 * 86400, abs=3)


def test_status_shows_a_device_whose_clock_is_off(fleet):
    """A Pi before NTP dates its results at its image's date; the operator sees it in `lepton status`."""
    from lepton.coordinator.status import fleet_status, render_status

    reg, _, _, _ = fleet
    msg = m.Telemetry(device="weak", ts=time.time() - 90 * 86400, models={})
    with reg.db.atomic():
        reg.apply_telemetry(msg, time.time())
    status = fleet_status(reg.db)
    offsets = {d["id"]: d["clock_offset_s"] for d in status["devices"]}
    assert offsets["weak"] == pytest.approx(-90 * 86400, abs=5) and abs(offsets["strong"]) < 5
    rows = {line.split()[0]: line for line in render_status(status).splitlines()[1:] if line.strip()}
    assert "online clock -90d" in rows["weak"] and "clock" not in rows["strong"]


def test_no_device_is_called_stale_while_ingest_cannot_store_telemetry(fleet):
    """A full disk stops ingest: telemetry arrives but is not stored, so every device looks silent. Devices
    were all called stale once it could store again, before the backlog was in; now the sweep waits while
    ingest fails and gives devices one liveness period after it recovers."""
    reg, reb, rec, _ = fleet

    def sweep() -> list[str]:
        reb._swept = 0.0
        reb._due(False)
        return sorted(d["id"] for d in reg.devices() if d["liveness"] == "stale")

    reb.started = time.monotonic() - 100
    with reg.db.atomic():
        reg.db.execute("UPDATE devices SET status_at = status_at - 60, telemetry_at = telemetry_at - 60")
    reb.ingest_ok = lambda: False
    assert sweep() == []
    reb.ingest_ok = lambda: True
    assert sweep() == [], "one period of grace after ingest recovers"
    reb.started -= 16
    assert sweep() == ["strong", "weak"]


def test_drift_in_measured_compute_triggers_a_replan(fleet):
    reg, reb, rec, _ = fleet
    reb.plan_once("test")
    reb.notify([])
    assert reb._drift() == ""
    for _ in range(8):  # the window's median moves only once most samples say so
        telemetry(reg, "strong", 40.0)
    from lepton.coordinator.registry import Change

    reb.notify([Change("measured", "strong")])
    assert reb._drift().startswith("drift digits@strong 2->40")


def test_live_decision_replays_offline(fleet, tmp_path):
    """`lepton coordinator snapshot` writes what was planned on; `plan` on it gives the same placement."""
    reg, reb, rec, db_path = fleet
    reg.set_meta("planner", reb.params)
    reb.plan_once("test")
    live = json.loads(list(reg.db.query("SELECT plan FROM plans ORDER BY id DESC LIMIT 1"))[0]["plan"])
    out = tmp_path / "snap.json"
    subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", "snapshot", "--db", str(db_path),
                    "--out", str(out)], check=True, capture_output=True)
    from lepton.coordinator.planner import plan
    from lepton.coordinator.snapshot import load_snapshot

    replay = plan(load_snapshot(out))
    assert {d: sorted(ms) for d, ms in replay.placement.items() if ms} == \
        {d: sorted(ms) for d, ms in live["placement"].items() if ms}
    exact = subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", "snapshot", "--db", str(db_path),
                            "--plan", "last"], check=True, capture_output=True, text=True).stdout
    recorded = json.loads(list(reg.db.query("SELECT snapshot FROM plans ORDER BY id DESC LIMIT 1"))[0]["snapshot"])
    assert json.loads(exact) == recorded


def test_plans_lists_the_recorded_plans_to_replay(fleet, tmp_path):
    """`lepton coordinator plans` names each recorded plan (id, trigger, path, changes); its id replays the
    exact snapshot that plan was made from."""
    reg, reb, rec, db_path = fleet
    reb.plan_once("startup")
    with reg.db.atomic():
        reg.apply_status(m.Status(device="strong", state="offline", ts=time.time()), time.time())
    reb.plan_once("device-offline strong")
    recorded = list(reg.db.query("SELECT id, trigger, path, changed, snapshot FROM plans ORDER BY id"))
    assert len(recorded) == 2

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", *args, "--db", str(db_path)],
                              capture_output=True, text=True, timeout=60)

    listed = json.loads(cli("plans", "--json").stdout)
    assert [(p["id"], p["trigger"], p["path"], p["changed"]) for p in listed] == \
        [(r["id"], r["trigger"], r["path"], r["changed"]) for r in recorded]
    assert listed[1]["changed"] >= 1  # the offline device's streams moved
    text = cli("plans", "--limit", "1").stdout
    assert f"#{recorded[1]['id']}" in text and "device-offline strong" in text and f"#{recorded[0]['id']} " not in text
    first = cli("snapshot", "--plan", str(listed[0]["id"]))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == json.loads(recorded[0]["snapshot"])
    bad = cli("plans", "--limit", "0")
    assert bad.returncode == 2 and "--limit" in bad.stderr


def test_load_spike_in_measured_stream_rate_replans(fleet):
    """A stream measured at 3x its configured rate is a drift; the next plan uses the measured rate."""
    reg, reb, rec, _ = fleet
    with reg.db.atomic():
        reg.apply_status(m.Status(device="strong", state="offline", ts=time.time()), time.time())
    reb.plan_once("test")
    rec.take()
    spike = m.Telemetry(device="weak", ts=time.time(), streams={"cam": 30.0})
    with reg.db.atomic():
        reg.apply_telemetry(spike, time.time())
    from lepton.coordinator.registry import Change

    reb.notify([Change("measured", "weak")])
    assert reb._drift() == "drift cam.rate_hz 10->30"
    reb.plan_once("spike")
    row = list(reg.db.query("SELECT plan, snapshot FROM plans ORDER BY id DESC LIMIT 1"))[0]
    assert json.loads(row["snapshot"])["streams"][0]["rate_hz"] == 30.0
    # one core at 80% holds 10 inputs/s of 80 ms: two thirds of 30/s cannot be served
    assert json.loads(row["plan"])["unserved"]["cam"] > 0.6
    reb.plan_once("timer")  # still unserved: said once
    assert [e["detail"][:4] for e in reg.db.query("SELECT detail FROM events WHERE kind = 'unserved'")] == ["cam "]


def test_a_birth_without_capabilities_does_not_stop_planning_for_the_fleet(fleet):
    """The protocol lets a birth omit capabilities; that device is left out of the snapshot, and so are its
    streams (with the reason), instead of a snapshot that names an unknown origin and fails every plan."""
    reg, reb, rec, _ = fleet
    door = {"id": "door", "model": "digits", "rate_hz": 1, "payload_bytes": 256}
    msg = m.Status(device="bare", state="online", ts=time.time(), streams=[m.StreamInfo(**door)])
    with reg.db.atomic():
        reg.apply_status(msg, time.time())
    from lepton.coordinator import fleetview

    view = fleetview.build(reg, reb.params)
    assert "bare/door: the device announced no capabilities" in view.skipped
    assert reb.plan_once("test") is not None
    assert set(rec.take()) == {"weak", "strong"}
    assert not list(reg.db.query("SELECT * FROM events WHERE kind = 'plan-failed'"))
    for _ in range(3):  # plan after plan, the same skip is one event: named again only once it changes
        reb.plan_once("timer")
    skipped = [e["detail"] for e in reg.db.query("SELECT detail FROM events WHERE kind = 'stream-skipped'")]
    assert skipped == ["bare/door: the device announced no capabilities"]


def test_stream_ids_stay_distinct_when_a_qualified_id_is_another_stream_s_own():
    from lepton.coordinator.fleetview import stream_keys

    pairs = [("cam", "door"), ("cam2", "door"), ("gate", "cam.door"), ("cam2", "yard")]
    keys = stream_keys(pairs)
    assert len(set(keys.values())) == 4, keys
    assert keys[("gate", "cam.door")] == "cam.door" and keys[("cam2", "door")] == "cam2.door"
    assert keys[("cam2", "yard")] == "yard"
    assert keys[("cam", "door")].startswith("door.")  # "cam.door" was taken


def test_a_zero_slo_is_refused_by_the_protocol_as_by_the_snapshot():
    from lepton.errors import ProtocolError
    from lepton.protocol import encode

    bad = m.StreamInfo.model_construct(id="cam", model="digits", rate_hz=1.0, payload_bytes=1, reply_bytes=256, slo_ms=0)
    body = encode(m.Status.model_construct(v=1, device="d", state="online", ts=1.0, reason="", agent_version="",
                                           capabilities=None, streams=[bad]))
    with pytest.raises(ProtocolError, match="slo_ms"):
        decode("status", body)


def test_the_newest_version_is_the_one_devices_call_newest(tmp_path):
    """PEP 440 order, as the agent's older-version check uses: a release candidate comes before its release,
    1.10 after 1.9. (Splitting on dots called 1.0.0rc1 newer than 1.0.0: devices would refuse it as older.)"""
    reg = FleetRegistry(open_db(tmp_path / "c.db"))
    reg.set_models([{"name": "digits", "version": v, "sha256": SHA, "size": 1, "memory_mb": 1.0, "compute_ms": 1.0,
                     "family": "digits", "variant": ""} for v in ("1.0.0rc1", "1.0.0", "0.9")])
    assert reg.known_models()["digits"]["version"] == "1.0.0"
    assert [r["version"] for r in reg.known_versions()["digits"]] == ["1.0.0", "1.0.0rc1", "0.9"]
    reg.set_models([{"name": "digits", "version": v, "sha256": SHA, "size": 1, "memory_mb": 1.0, "compute_ms": 1.0,
                     "family": "digits", "variant": ""} for v in ("1.9", "1.10")])
    assert reg.known_models()["digits"]["version"] == "1.10"


def test_a_placement_is_the_same_whatever_the_order_of_its_routes_and_small_share_moves():
    """What counts as a change worth a new generation: another device set, or a share moved by 5% or more (link
    noise moved a split stream's shares by 2-10% at every timer plan)."""
    from lepton.coordinator.placement import same

    def content(*routes):
        return {"models": [], "serve": {}, "routes": {"s": [m.Route(device=d, share=x) for d, x in routes]}}

    stored = m.Desired(device="x", generation=1, ts=0, **content(("a", 0.6), ("b", 0.4))).model_dump_json()
    assert same(stored, content(("b", 0.4), ("a", 0.6)))
    assert same(stored, content(("a", 0.64), ("b", 0.36)))
    assert not same(stored, content(("a", 0.66), ("b", 0.34)))
    assert not same(stored, content(("a", 0.6), ("c", 0.4)))
    for a, b in ((0.6, 0.65), (0.6, 0.55), (0.3, 0.35), (0.35, 0.3), (0.1, 0.15)):  # exactly 5 points, either way
        was = m.Desired(device="x", generation=1, ts=0, **content(("a", a), ("b", 1 - a))).model_dump_json()
        assert not same(was, content(("a", b), ("b", 1 - b))), (a, b)
    small = m.Desired(device="x", generation=1, ts=0, **content(("a", 0.951), ("b", 0.049))).model_dump_json()
    assert not same(small, content(("a", 0.9998), ("b", 0.0002))), "b would serve 245 times its share"
    assert same(small, content(("a", 0.955), ("b", 0.045)))


def test_a_source_that_closes_or_goes_silent_is_an_event_and_shows_in_status(tmp_path):
    """A device's camera that is gone is seen fleet-wide: ``source-down`` once it has not delivered for 10 s
    (a camera slow to give its first frame, or back within 10 s, is no event), ``source-up`` when it
    delivers again, one per change; `lepton status` names it, and a source open but silent for 30 s."""
    from lepton.coordinator.status import events, fleet_status, render_status

    reg = FleetRegistry(open_db(tmp_path / "c.db"))
    birth(reg, "cam", 2, [{"id": "door", "model": "digits", "rate_hz": 5, "payload_bytes": 256}])

    def send(**health):
        msg = m.TelemetryV2(device="cam", ts=time.time(), sources={"cam0": m.SourceHealth(**health)})
        with reg.db.atomic():
            reg.apply_telemetry(msg, time.time())
        return render_status(fleet_status(reg.db)).splitlines()[1]

    def kinds():
        return [(e["kind"], e["detail"]) for e in events(reg.db) if e["kind"].startswith("source-")]

    row = send(connected=False, frames_in=0, down_s=2.0)  # opening: not yet an outage
    assert "cam0 down 2s" in row and kinds() == []
    send(connected=True, frames_in=5, last_frame_s=0.1)  # it came within 10 s: no event at all
    assert kinds() == []
    send(connected=False, frames_in=5, last_frame_s=4.0, down_s=4.0)
    send(connected=False, frames_in=5, last_frame_s=12.0, down_s=12.0)
    assert kinds() == [("source-down", "cam0: not delivering for 12 s (last frame 12 s ago)")]
    send(connected=False, frames_in=5, last_frame_s=14.0, down_s=14.0)
    assert len(kinds()) == 1  # still down: no new event
    row = send(connected=True, frames_in=40, reconnects=1, last_frame_s=0.1)
    assert "cam0" not in row
    assert [k for k, _ in kinds()] == ["source-down", "source-up"]
    row = send(connected=True, frames_in=40, reconnects=1, last_frame_s=45.0)
    assert "cam0 no frame 45s" in row and len(kinds()) == 2
    assert fleet_status(reg.db)["devices"][0]["sources"]["cam0"]["frames_in"] == 40
    send(connected=False, frames_in=0, down_s=30.0)  # missing since the agent started: an event too
    assert kinds()[-1] == ("source-down", "cam0: not delivering for 30 s (no frame yet)")


def test_a_rebirth_with_the_same_streams_is_no_streams_event_though_its_measured_rate_moved_a_little(tmp_path):
    """A birth announces the rate its source measured (1.992 Hz for a 2 Hz camera): every reconnect recorded
    `streams +door` and replanned. A move under 5% is the same stream; a real change still is one."""
    from lepton.coordinator.status import events

    reg = FleetRegistry(open_db(tmp_path / "c.db"))

    def rebirth(rate):
        with reg.db.atomic():
            reg.apply_status(m.Status(device="cam", state="offline", ts=time.time(), reason="last will"), time.time())
        return birth(reg, "cam", 2, [{"id": "door", "model": "digits", "rate_hz": rate, "payload_bytes": 64}],
                     now=time.time())

    def stream_events():
        return [e["detail"] for e in events(reg.db) if e["kind"] == "streams"]

    birth(reg, "cam", 2, [{"id": "door", "model": "digits", "rate_hz": 2.0, "payload_bytes": 64}])
    assert stream_events() == ["+door"]
    changes = rebirth(1.992)
    assert stream_events() == ["+door"] and not [c for c in changes if c.kind == "streams"]
    changes = rebirth(3.0)
    assert stream_events() == ["+door", "+door"] and [c for c in changes if c.kind == "streams"]
