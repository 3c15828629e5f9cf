"""The coordinator as a real process: exactly-once across SIGKILL, failover on a last will, CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_coordinator_standins import CoordinatorProcess, StandIn, coordinator_config, db_rows, wait_for

from lepton.broker import free_port
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

CAM = {"id": "cam", "model": "digits", "rate_hz": 10, "payload_bytes": 256}


class CoordinatorWatch:
    """Follows the retained coordinator status, as an agent does to know when to re-send."""

    def __init__(self, port: int, topics: Topics):
        self.states: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watch")
        self.client.on_message = lambda c, u, msg: self.states.append(decode("coordinator", msg.payload).state)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.coordinator_status(), 1)
        self.client.loop_start()

    def online(self) -> bool:
        return bool(self.states) and self.states[-1] == "online"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def resend_until_acked(devices: list[StandIn], total: int, coord: CoordinatorProcess, timeout: float = 60) -> None:
    """What an agent does once the coordinator is back: re-send everything above the ack, in order,
    and again whenever acks stop moving (the broker may have dropped part of a burst)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.last_ack() >= total for d in devices):
            return
        assert coord.alive(), coord.log_text()[-3000:]
        for d in devices:
            for seq in range(d.last_ack() + 1, total + 1):
                d.result(seq)
        progress, quiet_since = [d.last_ack() for d in devices], time.monotonic()
        while time.monotonic() - quiet_since < 1.0 and not all(d.last_ack() >= total for d in devices):
            time.sleep(0.05)
            now = [d.last_ack() for d in devices]
            if now != progress:
                progress, quiet_since = now, time.monotonic()
    raise AssertionError(f"not all acked: {[(d.device, d.last_ack()) for d in devices]}")


def test_exactly_once_across_coordinator_sigkill(broker, prefix, tmp_path, long_run):
    """Results stored exactly once and acks monotone while the coordinator is SIGKILLed mid-burst."""
    topics = Topics(prefix)
    cfg = coordinator_config(tmp_path, broker.port, prefix)
    db = tmp_path / "coordinator.db"
    coord = CoordinatorProcess(cfg).start()
    watch = CoordinatorWatch(broker.port, topics)
    devices = [StandIn(broker.port, topics, f"dev-{i}", streams=[CAM]).connect() for i in range(3)]
    kills, per_burst = (20, 1000) if long_run else (2, 1500)
    total = 0
    try:
        for k in range(kills):
            wait_for(watch.online, 20, what="coordinator online")
            start = total + 1
            total += per_burst
            for seq in range(start, total + 1):  # interleaved across devices, as fast as paho takes them
                for d in devices:
                    d.result(seq)
            # Kill once part of the burst is committed (the broker may drop some of it: its queue
            # for a busy subscriber is bounded, and the devices' re-sends cover that).
            committed = 3 * (start - 1) + per_burst
            wait_for(lambda: db_rows(db, "SELECT count(*) FROM results")[0][0] >= committed, 30, what="burst under way")
            seen = len(watch.states)
            coord.kill()  # SIGKILL mid-burst: no clean shutdown, nothing flushed
            coord.start()
            wait_for(lambda: "offline" in watch.states[seen:] and watch.online(), 20, what="coordinator back")
            resend_until_acked(devices, total, coord)
        for d in devices:
            seqs = [s for (s,) in db_rows(db, "SELECT seq FROM results WHERE device = ? ORDER BY seq", [d.device])]
            assert seqs == list(range(1, total + 1)), f"{d.device}: lost or extra results"
            assert d.acks == sorted(d.acks), f"{d.device}: an ack went backwards"
            assert d.acks[-1] == total
        assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
        print(f"\n{kills} SIGKILLs, {3 * total} results from 3 devices, each stored once")
    finally:
        for d in devices:
            d.close()
        watch.close()
        coord.stop()


def _device_process(port: int, prefix: str, device: str, keepalive: int, cpu: int, ms: float) -> subprocess.Popen:
    script = Path(__file__).with_name("test_coordinator_standins.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), prefix, device, str(keepalive), str(cpu), str(ms)],
                            stdout=subprocess.PIPE, text=True, cwd=script.parent)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_device_lost_is_planned_around_within_keepalive_bound(broker, prefix, tmp_path):
    """SIGKILL the device serving a stream: a plan without it reaches the origin within 1.5 x keepalive + solve time."""
    keepalive = 2
    topics = Topics(prefix)
    coord = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix)).start()
    watch = CoordinatorWatch(broker.port, topics)
    wait_for(watch.online, 20, what="coordinator online")  # telemetry (QoS 0) sent earlier would be lost
    weak = StandIn(broker.port, topics, "weak", streams=[CAM], cpu=1,
                   link={"up_mbps": 100, "down_mbps": 100, "rtt_ms": 1}).connect()
    strong = _device_process(broker.port, prefix, "strong", keepalive, 8, 2.0)
    db = tmp_path / "coordinator.db"
    try:
        weak.telemetry(models={"digits": 90.0})

        def routed_to(dev):
            d = weak.last_desired()
            return d is not None and [r.device for r in d.routes.get("cam", [])] == [dev]

        wait_for(lambda: routed_to("strong"), 20, what="cam offloaded to the strong device")
        killed = time.monotonic()
        strong.kill()
        wait_for(lambda: routed_to("weak"), 1.5 * keepalive + 10, what="cam back on the weak device")
        elapsed = time.monotonic() - killed
        solve_s = db_rows(db, "SELECT solve_s FROM plans ORDER BY id DESC LIMIT 1")[0][0]
        print(f"\nfailover: {elapsed:.2f} s after SIGKILL (solve {solve_s:.3f} s, bound {1.5 * keepalive + solve_s:.2f} s)")
        assert elapsed <= 1.5 * keepalive + solve_s + 0.5
        kinds = [k for (k,) in db_rows(db, "SELECT kind FROM events WHERE device = 'strong' ORDER BY id")]
        assert kinds[-1] == "device-offline"
        status = json.loads(subprocess.run([sys.executable, "-m", "lepton.cli", "status", "--db", str(db), "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        live = {d["id"]: d["liveness"] for d in status["devices"]}
        assert live == {"strong": "offline", "weak": "online"}
        assert {d["agent_version"] for d in status["devices"]} == {"standin"}  # what runs where, for upgrades
        assert status["last_plan"]["trigger"].startswith("offline strong")
        text = subprocess.run([sys.executable, "-m", "lepton.cli", "status", "--db", str(db)],
                              check=True, capture_output=True, text=True).stdout
        assert "cam->weak:0.89" in text and "(offline strong)" in text
        assert " AGENT " in text.splitlines()[0] and " standin " in text
        weak_status = next(d for d in status["devices"] if d["id"] == "weak")
        assert weak_status["desired_versions"] == {m: "1.0.0" for m in weak_status["desired_models"]} != {}
        assert " digits@1.0.0" in text  # the version each device was told to hold
        assert "unserved: cam 11%" in text  # 10 Hz x 90 ms is more than 80% of one core
        events = json.loads(subprocess.run([sys.executable, "-m", "lepton.cli", "events", "--db", str(db), "--device",
                                            "weak", "--kind", "placement", "--json"],
                                           check=True, capture_output=True, text=True).stdout)
        assert events[-1]["detail"].endswith("cam->weak:0.89")
    finally:
        strong.kill()
        weak.close()
        watch.close()
        coord.stop()


def test_check_config_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('prefix = "site-a/v1"\n[broker]\nport = 8883\n[planner]\ninterval_s = 10\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[planner]\nintervall_s = 10\n')
    ok = subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", "--check-config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    res = subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", "--check-config", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "planner.intervall_s" in res.stderr


def test_metrics_then_clean_stop_says_offline(broker, prefix, tmp_path):
    topics = Topics(prefix)
    port = free_port()
    coord = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix, metrics={"port": port})).start()
    watch = CoordinatorWatch(broker.port, topics)
    dev = None
    try:
        wait_for(watch.online, 20, what="coordinator online")
        dev = StandIn(broker.port, topics, "dev-1", streams=[CAM]).connect()
        for seq in (1, 2, 2):
            dev.result(seq)
        dev.client.publish(topics.telemetry("dev-1"), b"not json", qos=0)
        wait_for(lambda: dev.last_ack() == 2, 10, what="ack")

        def metrics() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

        wait_for(lambda: 'lepton_invalid_payloads_total{kind="telemetry"} 1.0' in metrics(), 5, what="invalid counted")
        text = metrics()
        assert "lepton_results_stored_total 2.0" in text and "lepton_results_duplicate_total 1.0" in text
        wait_for(lambda: 'lepton_devices{liveness="online"} 1.0' in metrics(), 10, what="the device counted online")
        bye = m.Status(device="dev-1", state="offline", ts=time.time(), reason="stopped")
        dev.client.publish(topics.status("dev-1"), encode(bye), qos=1, retain=True)
        # the last device gone: no plan is made, and the gauges still follow
        wait_for(lambda: 'lepton_devices{liveness="online"} 0.0' in metrics()
                 and 'lepton_devices{liveness="offline"} 1.0' in metrics(), 10, what="the device counted offline")
        assert coord.stop() == 0
        wait_for(lambda: watch.states[-1] == "offline", 5, what="retained offline")
    finally:
        if dev:
            dev.close()
        watch.close()
        coord.stop()


def test_silent_device_is_planned_around_once_its_will_fires(broker, prefix, tmp_path):
    """A partitioned device (socket open, nothing sent) is declared dead by the broker's keepalive;
    the coordinator replans as soon as the will arrives."""
    keepalive = 1
    topics = Topics(prefix)
    coord = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix)).start()
    watch = CoordinatorWatch(broker.port, topics)
    wills: list[float] = []
    watch.client.message_callback_add(topics.status("strong"), lambda c, u, msg: wills.append(time.monotonic())
                                      if decode("status", msg.payload).state == "offline" else None)
    watch.client.subscribe(topics.status("strong"), 1)
    wait_for(watch.online, 20, what="coordinator online")
    link = {"up_mbps": 100, "down_mbps": 100, "rtt_ms": 1}
    weak = StandIn(broker.port, topics, "weak", streams=[CAM], cpu=1, link=link).connect()
    strong = StandIn(broker.port, topics, "strong", cpu=8, keepalive=keepalive, link=link).connect()
    db = tmp_path / "coordinator.db"
    try:
        weak.telemetry(models={"digits": 90.0})
        strong.telemetry(models={"digits": 2.0})

        def routed_to(dev):
            d = weak.last_desired()
            return d is not None and [r.device for r in d.routes.get("cam", [])] == [dev]

        wait_for(lambda: routed_to("strong"), 20, what="cam offloaded to the strong device")
        silent = time.monotonic()
        strong.freeze()
        wait_for(lambda: routed_to("weak"), 30, what="cam back on the weak device")
        replanned = time.monotonic()
        solve_s = db_rows(db, "SELECT solve_s FROM plans ORDER BY id DESC LIMIT 1")[0][0]
        assert wills, "the broker never sent the last will"
        print(f"\nbroker declared the silent device dead after {wills[0] - silent:.2f} s (keepalive {keepalive} s); "
              f"placement followed {replanned - wills[0]:.2f} s later (solve {solve_s:.3f} s)")
        assert replanned - wills[0] <= solve_s + 1.0
    finally:
        strong.client.socket() and strong.client.socket().close()
        weak.close()
        watch.close()
        coord.stop()


def test_systemd_ready_and_watchdog(broker, prefix, tmp_path):
    """Under systemd: READY=1 once running, then WATCHDOG=1 pings at half of WATCHDOG_USEC."""
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    coord = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix),
                               env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"}).start()
    try:
        got = []
        while not any("WATCHDOG=1" in g for g in got):
            got.append(sock.recv(4096).decode())
        assert "READY=1" in got[0] and "models at http://127.0.0.1:" in got[0]
        assert coord.stop() == 0
        sock.settimeout(5)
        while "STOPPING=1" not in got[-1]:  # pings queued before the stop come first
            got.append(sock.recv(4096).decode())
    finally:
        coord.stop()
        sock.close()


def test_unusable_database_is_one_clear_line(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[db]\npath = "{junk}"\n[http]\nport = 0\n')
    res = subprocess.run([sys.executable, "-m", "lepton.cli", "coordinator", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"lepton: error: cannot open coordinator database {junk}: file is not a database"
    assert "Traceback" not in res.stderr


def test_sighup_reloads_the_model_registry_without_a_restart(broker, prefix, tmp_path):
    """`systemctl reload lepton-coordinator` (SIGHUP): a version added to the registry is offered over HTTP
    and recorded for planning at once; a registry that cannot be read keeps what was offered."""
    import shutil
    import signal
    import sqlite3

    from test_placement_kit import DIGITS_SPEC as spec
    from test_placement_kit import INT8_FILE, make_keys

    from lepton.models.registry import Registry

    private, public = make_keys(tmp_path / "keys")
    models = tmp_path / "models"
    Registry(models, trusted_keys=[public]).add(INT8_FILE, "digits-fleet", "1.0.0", spec, private)
    coord = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix,
                                                  models={"dir": str(models), "trusted_keys": [str(public)]})).start()
    db = tmp_path / "coordinator.db"

    def versions():
        try:
            return sorted(v for (v,) in db_rows(db, "SELECT version FROM models WHERE name = 'digits-fleet'"))
        except sqlite3.OperationalError:  # the database exists, its tables not yet
            return []

    def served(version):
        try:
            base = json.loads(db_rows(db, "SELECT value FROM meta WHERE key = 'http'")[0][0])
        except (sqlite3.OperationalError, IndexError):
            return False
        try:
            with urllib.request.urlopen(f"{base}/models/digits-fleet/{version}/manifest.json", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: db.exists() and versions() == ["1.0.0"] and served("1.0.0"), 20, "the coordinator up")
        Registry(models, trusted_keys=[public]).add(INT8_FILE, "digits-fleet", "1.1.0", spec, private)
        assert not served("1.1.0")
        coord.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: versions() == ["1.0.0", "1.1.0"] and served("1.1.0"), 10, "1.1.0 offered after SIGHUP")
        assert db_rows(db, "SELECT count(*) FROM events WHERE kind = 'models-reloaded'")[0][0] == 1
        shutil.move(str(models), str(tmp_path / "models-gone"))  # unreadable now: keep offering what there was
        coord.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "model registry not reloaded, still offering 2 model versions" in coord.log_text(), 10,
                 "the failed reload in the log")
        assert coord.alive() and versions() == ["1.0.0", "1.1.0"]
    finally:
        assert coord.stop() == 0
