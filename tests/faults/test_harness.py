"""The harness itself: if these fail, no fault figure can be trusted.

Namespaces reach the broker and nothing else; tbf gives the rate it is set
to; drop and reject cut a link the way they should; the proxy adds the delay
it is told; processes die and come back on command; the accounting finds
planted losses, duplicates and inversions, on the wire and in SQLite.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from lepton.protocol import Topics, encode
from lepton.protocol.messages import ModelId, Result

from .harness import Arrival, DelayProxy, ProcessGroup, analyse, check_db, ranges
from .harness.linktest import EchoServer, connect_outcome, echo_rtts, throughput


def result_payload(device: str, seq: int) -> bytes:
    """A valid result message, as an agent would publish it."""
    now = time.time()
    model = ModelId(name="digits-int8", version="1", sha256="0" * 64)
    return encode(Result(device=device, stream="s0", seq=seq, model=model, captured_at=now, inferred_at=now,
                         infer_ms=1.0, computed_on=device, output={"top": []}))


@pytest.mark.netns
def test_namespaces_reach_the_broker_and_nothing_else(fleet):
    """Each device publishes from its namespace; the counter sees every message, dup and inversion included."""
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    topics = Topics(fleet.prefix)
    for dev in fleet.devices:
        host = fleet.host(dev)
        assert "default" not in subprocess.run(["ip", "-n", host.ns, "route"], capture_output=True, text=True).stdout
        lines = b"\n".join(result_payload(dev, s) for s in (1, 2, 2, 4, 3)) + b"\n"
        subprocess.run([*host.exec_prefix(), "mosquitto_pub", "-h", fleet.gateway, "-p", str(fleet.broker.port),
                        "-q", "1", "-i", f"pub-{dev}", "-t", topics.result(dev, "s0"), "-l"],
                       input=lines, check=True, timeout=20)
    counter.wait_count(4 * len(fleet.devices), timeout=10)
    time.sleep(0.2)  # let the duplicate land too
    report = counter.report()
    assert report.lost_total == 0
    assert report.wire_duplicates == len(fleet.devices)
    assert report.inversions == {dev: 1 for dev in fleet.devices}
    # The counter rides a broker crash on its persistent session.
    fleet.kill("broker")
    assert not fleet.running("broker")
    fleet.start("broker")
    deadline = time.monotonic() + 10
    while counter.connects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter.connects == 2


@pytest.mark.netns
@pytest.mark.row("link", "tbf shaping, measured both ways")
@pytest.mark.parametrize("mbps", [2, 8, 20])
def test_tbf_gives_the_configured_rate(fleet_factory, figures, mbps):
    fleet = fleet_factory(devices=1)
    fleet.shape("dev-1", up_mbps=mbps, down_mbps=mbps)
    measured = throughput(fleet.host("dev-1"), mbps, seconds=1.0)
    figures.update(set_mbps=mbps, up_mbps=round(measured["up_mbps"], 2), down_mbps=round(measured["down_mbps"], 2),
                   up_ratio=round(measured["up_mbps"] / mbps, 3), down_ratio=round(measured["down_mbps"] / mbps, 3))
    for direction, value in measured.items():
        assert abs(value - mbps) <= 0.15 * mbps, f"{direction} {value:.2f} Mbit/s with tbf at {mbps}"


@pytest.mark.netns
def test_cut_drop_times_out_and_reject_refuses(fleet_factory):
    fleet = fleet_factory(devices=1)
    fleet.start_broker()
    host, (ip, port) = fleet.host("dev-1"), fleet.broker_address
    assert connect_outcome(host, ip, port)["outcome"] == "ok"
    fleet.cut("dev-1", mode="drop")
    dropped = connect_outcome(host, ip, port, timeout=1.0)
    assert dropped["outcome"] == "timeout" and dropped["elapsed"] >= 0.9
    fleet.cut("dev-1", mode="reject")
    rejected = connect_outcome(host, ip, port, timeout=1.0)
    assert rejected["outcome"] in ("refused", "reset") and rejected["elapsed"] < 0.3
    fleet.restore("dev-1")
    assert connect_outcome(host, ip, port)["outcome"] == "ok"


def test_delay_proxy_adds_the_configured_delay_and_cuts():
    echo = EchoServer()
    proxy = DelayProxy(*echo.address, delay_ms=0).start()
    try:
        base = sorted(echo_rtts(None, *proxy.address, count=5))[2]
        proxy.set_delay(40)
        rtts = echo_rtts(None, *proxy.address, count=5)
        # The delay is a floor (nothing can arrive early); load can only add to it.
        assert min(rtts) >= 80, f"RTTs {rtts} ms below 2 x 40 ms"
        assert abs(sorted(rtts)[2] - base - 80) < 10, f"median of {rtts} ms, base {base:.1f} ms, expected +80"
        proxy.cut("reset")
        with pytest.raises(subprocess.CalledProcessError):
            echo_rtts(None, *proxy.address, count=1)
        proxy.restore()
        proxy.set_delay(0)
        assert len(echo_rtts(None, *proxy.address, count=2)) == 2
    finally:
        proxy.close()
        echo.close()


def test_proxy_stall_holds_data_until_resumed():
    echo = EchoServer()
    proxy = DelayProxy(*echo.address).start()
    probe = [sys.executable, "-c", "import socket, sys, time\n"
             "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
             "t = time.monotonic(); s.sendall(b'x'); s.recv(1); print(time.monotonic() - t)",
             *map(str, proxy.address)]
    try:
        proxy.pause()
        with subprocess.Popen(probe, stdout=subprocess.PIPE, text=True) as p:
            deadline = time.monotonic() + 10
            while proxy.connections < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
            assert p.poll() is None  # held by the stalled proxy, connection open
            proxy.resume()
            assert float(p.communicate(timeout=10)[0]) >= 0.4
    finally:
        proxy.close()
        echo.close()


@pytest.mark.netns
def test_processes_stop_pause_kill_restart(tmp_path, fleet_factory):
    group = ProcessGroup(tmp_path / "logs")
    beat = [sys.executable, "-c", "import time\nwhile True:\n    print('beat', flush=True); time.sleep(0.05)"]
    proc = group.add("beater", beat)
    proc.wait_log("beat", timeout=10)
    proc.pause()
    time.sleep(0.1)
    assert psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
    size = proc.log_size()
    time.sleep(0.2)
    assert proc.log_size() == size  # frozen
    proc.resume()
    proc.wait_log("beat", timeout=5, after=size)
    assert proc.kill() == -signal.SIGKILL
    first_pid = proc.pid
    proc.start()
    assert proc.running and proc.pid != first_pid and proc.exits == [-signal.SIGKILL]
    assert proc.restart().starts == 3
    group.close()
    assert not proc.running
    # Inside a namespace: the child sees only the device's own address.
    fleet = fleet_factory(devices=1)
    ip = fleet.host("dev-1").ip
    child = fleet.procs.add("in-ns", [sys.executable, "-c",
                                      f"import socket; s=socket.socket(); s.bind(('{ip}', 0)); print('bound')"],
                            ns=fleet.host("dev-1").ns)
    assert child.wait(10) == 0 and "bound" in child.log_text()


def test_accounting_finds_planted_loss_duplicate_and_inversion():
    arrivals = [Arrival("a", s, t) for t, s in enumerate([1, 2, 2, 5, 4, 7])] + [Arrival("b", 1, 0.5)]
    report = analyse(arrivals, expected={"a": 8, "b": [1, 2]})
    assert report.lost == {"a": [3, 6, 8], "b": [2]}
    assert report.gaps["a"] == [(3, 3), (6, 6), (8, 8)]
    assert report.wire_duplicates == 1
    assert report.inversions == {"a": 1, "b": 0}
    assert report.unique == 6 and report.received == 7
    assert report.max_silence_s["a"] == 1.0
    # Without an expected set only holes count.
    assert analyse(arrivals).lost == {"a": [3, 6]}
    assert ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]


def test_db_check_finds_planted_duplicate_and_loss(tmp_path):
    path = tmp_path / "coordinator.db"
    with sqlite3.connect(path) as conn:
        # No primary key here on purpose, so a duplicate can be planted.
        conn.execute("CREATE TABLE results (device TEXT, seq INTEGER)")
        conn.executemany("INSERT INTO results VALUES (?, ?)", [("a", 1), ("a", 2), ("a", 2), ("a", 4), ("b", 1)])
    conn.close()
    report = check_db(path, expected={"a": 4, "b": 1})
    assert report.duplicates == 1 and report.rows == 5
    assert report.lost == {"a": [3]} and report.extra == 0
    assert report.integrity == "ok"


def test_namespace_tests_skip_with_a_reason_when_not_root(monkeypatch):
    from .harness import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "root" in netns.unavailable_reason()


def test_generated_configs_pass_the_parts_own_validation(tmp_path):
    """The harness writes configs the agent and coordinator accept (catches format drift)."""
    from .harness import configs

    agent = pytest.importorskip("lepton.agent.config")
    coordinator = pytest.importorskip("lepton.coordinator.config")
    data = configs.agent_config("dev-1", ("10.231.200.1", 1883), "lxf-test/v1", tmp_path, rate_hz=10, streams=2,
                                overrides={"outbox": {"max_rows": 500}})
    cfg = agent.load_config(configs.write_toml(tmp_path / "agent.toml", data))
    assert cfg.outbox.max_rows == 500 and cfg.broker.keepalive == 5 and len(cfg.streams) == 2
    assert cfg.outbox.path == str(tmp_path / "outbox.db")
    data = configs.coordinator_config(("10.231.200.1", 1883), "lxf-test/v1", tmp_path, http=("10.231.200.1", 8123))
    cfg = coordinator.load_config(configs.write_toml(tmp_path / "coordinator.toml", data))
    assert cfg.http.port == 8123 and cfg.db.path == str(tmp_path / "coordinator.db")


@pytest.mark.netns
def test_stale_namespaces_of_a_dead_run_are_removed(netns):
    from .harness import Network, cleanup_stale
    from .harness.netns import sh

    net = Network()
    try:
        host = net.add_host("dev-1")
        orphan = subprocess.Popen([*host.exec_prefix(), "sleep", "60"])
        dead = subprocess.Popen(["true"])
        dead.wait()
        sh(["ip", "link", "set", net.bridge, "alias", f"lxf-owner={dead.pid}"])  # as if its run had crashed
        removed = cleanup_stale()
        assert net.bridge in removed and host.ns in removed
        assert host.ns not in sh(["ip", "netns", "list"])
        assert orphan.wait(5) == -signal.SIGKILL
    finally:
        net.close()


def test_mqtt_client_tells_refused_from_accepted(fleet_factory):
    from .harness.clients import ConnectRefused

    fleet = fleet_factory(devices=1, netns=False)
    fleet.start_broker(allow_anonymous=False)
    with pytest.raises(ConnectRefused, match="refused"):
        fleet.mqtt_client("nobody")
    fleet.stop("broker")
    fleet.broker.allow_anonymous = True
    fleet.start("broker")
    client = fleet.mqtt_client("anyone")
    assert client.is_connected()


@pytest.mark.netns
def test_generated_tls_broker_runs_under_the_harness(fleet_factory):
    """`lepton provision`'s mosquitto.conf (TLS, %u ACL) on the gateway: a device publishes
    from its namespace with its certificate, an observer counts it, across a broker SIGKILL."""
    provisioning = pytest.importorskip("lepton.provisioning.fleet")
    from lepton.provisioning.settings import new_settings

    fleet = fleet_factory(devices=1)
    root = fleet.root / "pki"
    pki, _ = provisioning.Fleet.create(root, new_settings(root, [fleet.gateway], prefix=fleet.prefix, autosave_s=1))
    pki.add_device("dev-1")
    pki.add_observer("ops")
    pki.write_broker_files()
    lay = pki.layout
    fleet.start_generated_broker(lay.broker_dir / "mosquitto.conf")
    tls = {"tls_ca": str(lay.ca_cert), "tls_cert": str(lay.cert("ops")), "tls_key": str(lay.key("ops"))}
    counter = fleet.start_counter(**tls)
    time.sleep(3.0)  # past one save of the broker's state ([broker] autosave_s=1; Mosquitto checks about once a second)
    fleet.kill("broker")
    fleet.start("broker")  # persistence on: the observer's session and subscription survive
    host = fleet.host("dev-1")
    subprocess.run([*host.exec_prefix(), "mosquitto_pub", "-h", fleet.gateway, "-p", str(fleet.broker.port),
                    "--cafile", str(lay.ca_cert), "--cert", str(lay.cert("dev-1")), "--key", str(lay.key("dev-1")),
                    "-i", "dev-1", "-q", "1", "-t", Topics(fleet.prefix).result("dev-1", "s0"),
                    "-m", result_payload("dev-1", 1)], check=True, timeout=20)
    counter.wait_count(1, timeout=10)
    from .harness.clients import ConnectRefused

    with pytest.raises(ConnectRefused):  # plain MQTT on the TLS port
        fleet.mqtt_client("anon", timeout=3)
    with pytest.raises(ConnectRefused):  # TLS, but no client certificate
        fleet.mqtt_client("dev-1", timeout=3, tls_ca=str(lay.ca_cert))


def test_children_of_a_hard_killed_run_are_reaped():
    from .harness import procs

    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    note = procs.TRACK_DIR / str(dead.pid)  # as if that test process had started the orphan
    note.mkdir(parents=True, exist_ok=True)
    (note / str(orphan.pid)).write_text(repr(psutil.Process(orphan.pid).create_time()))
    assert orphan.pid in procs.reap_orphans()
    assert orphan.wait(5) == -signal.SIGKILL and not note.exists()
