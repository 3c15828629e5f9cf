"""What a person sees from ``lepton coordinator`` and ``lepton events`` when something is wrong: one clear line
naming the key or the reason, exit 2 for a bad config, and systemd told READY only once the broker accepted
the coordinator."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton.broker import MosquittoBroker, free_port, mosquitto_binary
from test_coordinator_standins import CoordinatorProcess, coordinator_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


def lepton(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lepton.cli", *args], capture_output=True, text=True, timeout=timeout)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed; fails on a traceback or on more than one line."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if "lepton: error:" in line]
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- --check-config and start-up: the files a config names ---------------------------------------

def _tls_ca(tmp: Path) -> Path:
    """A fleet CA certificate, and a client certificate of it (``client.crt``) whose key is not written."""
    from lepton.provisioning.pki import CA, cert_pem, new_key

    ca = CA.create("test fleet", 30)
    (tmp / "ca.crt").write_bytes(cert_pem(ca.cert))
    (tmp / "c.crt").write_bytes(cert_pem(ca.issue(new_key().public_key(), "lepton-coordinator", 30)))
    return tmp / "ca.crt"


def _case(tmp: Path, name: str) -> tuple[dict, str]:
    """Config sections with one broken file, and the start of the line that must name it."""
    if name == "models.dir":
        return {"models": {"dir": str(tmp / "no-models")}}, f"models.dir {tmp / 'no-models'}: no such directory"
    if name == "broker.tls_ca":
        return {"broker": {"tls_ca": str(tmp / "ca.crt")}}, f"broker.tls_ca {tmp / 'ca.crt'}: No such file or directory"
    if name == "broker.tls_cert":
        return ({"broker": {"tls_ca": str(_tls_ca(tmp)), "tls_cert": str(tmp / "no.crt"), "tls_key": str(tmp / "c.key")}},
                f"broker.tls_cert {tmp / 'no.crt'}: No such file or directory")
    if name == "broker.tls_key":
        return ({"broker": {"tls_ca": str(_tls_ca(tmp)), "tls_cert": str(tmp / "c.crt"), "tls_key": str(tmp / "c.key")}},
                f"broker.tls_key {tmp / 'c.key'}: No such file or directory")
    if name == "broker.tls_key-not-the-certificate's":
        from lepton.provisioning.pki import key_pem, new_key

        (tmp / "c.key").write_bytes(key_pem(new_key()))
        return ({"broker": {"tls_ca": str(_tls_ca(tmp)), "tls_cert": str(tmp / "c.crt"), "tls_key": str(tmp / "c.key")}},
                f"broker.tls_cert/tls_key {tmp / 'c.crt'}: ")
    if name == "broker.tls_ca-not-a-certificate":
        (tmp / "ca.crt").write_text("not a certificate\n")
        return {"broker": {"tls_ca": str(tmp / "ca.crt")}}, f"broker.tls_ca {tmp / 'ca.crt'}: not a usable CA certificate"
    if name == "broker.password_file":
        return ({"broker": {"username": "coord", "password_file": str(tmp / "pw")}},
                f"broker.password_file {tmp / 'pw'}: No such file or directory")
    if name == "models.trusted_keys":
        return {"models": {"trusted_keys": [str(tmp / "k.pub")]}}, f"models.trusted_keys[0] {tmp / 'k.pub'}: No such file or directory"
    if name == "models.trusted_keys-not-a-key":
        (tmp / "k.pub").write_text("not a key\n")
        return {"models": {"trusted_keys": [str(tmp / "k.pub")]}}, "models.trusted_keys[0]: public key"
    if name == "db.path":
        (tmp / "plain-file").write_text("")
        db = tmp / "plain-file" / "state" / "coordinator.db"
        return {"db": {"path": str(db)}}, f"db.path {db}: directory {db.parent} does not exist and cannot be created"
    raise AssertionError(name)


CASES = ["models.dir", "broker.tls_ca", "broker.tls_cert", "broker.tls_key", "broker.tls_key-not-the-certificate's",
         "broker.tls_ca-not-a-certificate", "broker.password_file",
         "models.trusted_keys", "models.trusted_keys-not-a-key", "db.path"]


@pytest.mark.parametrize("case", CASES)
def test_check_config_and_start_up_name_the_key_of_a_missing_file(tmp_path, prefix, case):
    """--check-config refuses what start-up would fail on, with the same one line; start-up fails before it
    creates the database (nothing listens on the broker port: nothing gets that far)."""
    sections, expected = _case(tmp_path, case)
    cfg = coordinator_config(tmp_path, free_port(), prefix, **sections)
    checked = lepton("coordinator", "--check-config", str(cfg))
    assert checked.returncode == 2
    line = error_line(checked)
    assert line.startswith(f"lepton: error: config {cfg}: {expected}"), line  # the file, then its key
    started = lepton("coordinator", "--config", str(cfg))
    assert started.returncode == 2
    assert error_line(started) == line
    assert not (tmp_path / "coordinator.db").exists(), "start-up created the database before refusing the config"


def test_check_config_passes_a_good_config_and_creates_nothing(tmp_path, prefix):
    (tmp_path / "pw").write_text("s3cret\n")
    db = tmp_path / "state" / "coordinator.db"  # start-up creates the directory; the check must not
    cfg = coordinator_config(tmp_path, free_port(), prefix, db={"path": str(db)},
                             broker={"username": "coord", "password_file": str(tmp_path / "pw")})
    res = lepton("coordinator", "--check-config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout
    assert not db.parent.exists()


def test_config_errors_use_the_agents_words(tmp_path, prefix):
    cfg = coordinator_config(tmp_path, free_port(), prefix, broker={"prot": 1884})
    res = lepton("coordinator", "--check-config", str(cfg))
    assert res.returncode == 2
    assert error_line(res) == f"lepton: error: config {cfg}: unknown key 'broker.prot'"
    cfg = coordinator_config(tmp_path, free_port(), prefix, db={"batch_max": 0})
    res = lepton("coordinator", "--check-config", str(cfg))
    assert res.returncode == 2
    assert error_line(res) == f"lepton: error: config {cfg}: db.batch_max: Input should be greater than or equal to 1 (got 0)"
    cfg.write_bytes(b'[broker]\nhost = "\xff"\n')  # not UTF-8
    res = lepton("coordinator", "--check-config", str(cfg))
    assert res.returncode == 2
    assert error_line(res).startswith(f"lepton: error: config {cfg} is not valid TOML: ")


# --- lepton events --kind ------------------------------------------------------------------------

def one_event_db(tmp_path):
    """A coordinator database with one event: a placement on cam-1."""
    from lepton.coordinator.db import open_db
    from lepton.coordinator.registry import FleetRegistry

    path = tmp_path / "c.db"
    db = open_db(path)
    FleetRegistry(db).event("placement", "cam-1", "models: digits")
    db.conn.commit()
    db.close()
    return path


def test_events_refuses_a_kind_that_does_not_exist(tmp_path):
    path = one_event_db(tmp_path)
    res = lepton("events", "--db", str(path), "--kind", "placment")
    assert res.returncode == 2
    line = error_line(res)
    assert "--kind 'placment': no such event kind" in line
    assert all(kind in line for kind in ("placement", "device-offline", "device-stale", "model-failed", "plan-failed"))
    res = lepton("events", "--db", str(path), "--kind", "placement")
    assert res.returncode == 0 and "cam-1" in res.stdout and "models: digits" in res.stdout
    res = lepton("events", "--db", str(path), "--limit", "-1")  # SQLite reads a negative LIMIT as none
    assert res.returncode == 2 and "--limit: -1: give 1 or more" in res.stderr


def test_events_refuses_a_device_it_has_never_heard_of(tmp_path):
    path = one_event_db(tmp_path)
    res = lepton("events", "--db", str(path), "--device", "cam-2")
    assert res.returncode == 2 and error_line(res).endswith("--device 'cam-2': no such device in this database "
                                                            "(devices: cam-1)"), res.stderr
    res = lepton("events", "--db", str(path), "--device", "cam-1")
    assert res.returncode == 0 and "models: digits" in res.stdout


def test_a_database_migrated_by_a_newer_lepton_is_refused_by_every_reader_and_the_coordinator(tmp_path):
    """An older lepton read it without a word and wrote rows its schema did not expect."""
    from lepton.coordinator.db import migrations, open_db
    from lepton.errors import ConfigError

    path = tmp_path / "c.db"
    open_db(path).close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
                 (migrations.name, "m099_future", "2027-01-01 00:00:00"))
    conn.commit()
    conn.close()
    for command in ("status", "events", "results"):
        res = lepton(command, "--db", str(path))
        assert res.returncode == 2 and "migrated by a newer lepton (m099_future)" in error_line(res), res.stderr
    with pytest.raises(ConfigError, match="migrated by a newer lepton"):
        open_db(path)


def test_the_coordinator_does_not_start_without_a_config():
    """On its defaults it would connect to a broker on this host with the usual client id, and take over a
    running coordinator's session."""
    res = lepton("coordinator")
    assert res.returncode == 2 and error_line(res).startswith("lepton: error: the coordinator needs --config FILE")


def test_db_and_config_together_are_refused(tmp_path):
    res = lepton("status", "--db", str(tmp_path / "c.db"), "--config", str(tmp_path / "c.toml"))
    assert res.returncode == 2 and error_line(res) == "lepton: error: --db and --config both name a database: give one"


def test_every_event_kind_the_coordinator_records_is_listed():
    """``--kind`` accepts what the coordinator writes: a kind added to the code without EVENT_KINDS fails here."""
    from lepton.coordinator.status import EVENT_KINDS

    recorded = set()
    for path in (ROOT / "coordinator").rglob("*.py"):
        text = path.read_text()
        recorded |= set(re.findall(r'\.event\(\s*"([a-z-]+)"', text))
        recorded |= set(re.findall(r'\.event\(\s*"[a-z-]+" if [^,]+ else "([a-z-]+)"', text))
    assert recorded, "found no events: the pattern no longer matches how events are recorded"
    assert recorded <= set(EVENT_KINDS), recorded - set(EVENT_KINDS)


# --- a reader that stops early ------------------------------------------------------------------

@pytest.mark.parametrize("args", [("status",), ("events",), ("status", "--json")])
def test_output_into_a_closed_pipe_is_no_traceback(tmp_path, args):
    """`lepton status | head -1`: the reader is gone before the table is written; that is not an error."""
    from lepton.coordinator.db import open_db
    from lepton.coordinator.registry import FleetRegistry

    path = tmp_path / "c.db"
    db = open_db(path)
    FleetRegistry(db).event("placement", "cam-1", "models: digits")
    db.conn.commit()
    db.close()
    proc = subprocess.Popen([sys.executable, "-m", "lepton.cli", *args, "--db", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the command has imported what it needs and written anything
    err = proc.stderr.read()
    assert proc.wait(60) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    """Only a closed stdout is the reader going away; a daemon's broken socket must not exit 0."""
    import lepton.cli as cli

    def broken_socket(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_main", broken_socket)
    with pytest.raises(BrokenPipeError):
        cli.main([])


# --- lepton coordinator snapshot --out -----------------------------------------------------------

def test_snapshot_out_that_cannot_be_written_is_one_line(tmp_path):
    from lepton.coordinator.db import open_db

    path = tmp_path / "c.db"
    db = open_db(path)
    db["plans"].insert({"ts": time.time(), "trigger": "test", "snapshot": '{"devices": [], "streams": []}'})
    db.conn.commit()
    db.close()
    for out, reason in ((tmp_path / "no-dir" / "s.json", "No such file or directory"), (tmp_path, "Is a directory")):
        res = lepton("coordinator", "snapshot", "--db", str(path), "--plan", "last", "--out", str(out))
        assert res.returncode == 2
        assert error_line(res) == f"lepton: error: --out {out}: cannot write: {reason}"
    res = lepton("coordinator", "snapshot", "--db", str(path), "--plan", "last", "--out", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "s.json").read_text()) == {"devices": [], "streams": []}


def test_snapshot_takes_the_database_from_the_coordinators_config_given_before_it(tmp_path, prefix):
    """`lepton coordinator --config FILE snapshot` reads FILE's database (the --config was dropped before, and
    the snapshot looked for /var/lib/lepton/coordinator.db)."""
    from lepton.coordinator.db import open_db

    cfg = coordinator_config(tmp_path, free_port(), prefix, db={"path": str(tmp_path / "fleet.db")})
    db = open_db(tmp_path / "fleet.db")
    db["plans"].insert({"ts": time.time(), "trigger": "test", "snapshot": '{"devices": [], "streams": [1]}'})
    db.conn.commit()
    db.close()
    for args in (("coordinator", "--config", str(cfg), "snapshot"), ("coordinator", "snapshot", "--config", str(cfg))):
        res = lepton(*args, "--plan", "last")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"devices": [], "streams": [1]}
    res = lepton("coordinator", "--config", str(cfg), "--check-config", str(cfg))
    assert res.returncode == 2 and "not allowed with argument" in res.stderr


# --- the broker: errors in the log, READY only once connected ------------------------------------

class NotifySocket:
    """A stand-in for systemd's notify socket: what the coordinator told it, datagram by datagram."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.got: list[str] = []

    def drain(self) -> list[str]:
        try:
            while True:
                self.got.append(self.sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            pass
        return self.got

    def saw(self, text: str) -> bool:
        return any(text in g for g in self.drain())

    def close(self) -> None:
        self.sock.close()


def error_lines(coord: CoordinatorProcess) -> list[str]:
    return [line for line in coord.log_text().splitlines() if " ERROR " in line]


@pytest.mark.skipif(not mosquitto_binary(), reason="mosquitto is not installed")
def test_unreachable_broker_is_logged_once_and_ready_waits_for_the_connection(tmp_path, prefix):
    port = free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    cfg = coordinator_config(tmp_path, port, prefix, broker={"reconnect_min_s": 0.2, "reconnect_max_s": 0.4})
    coord = CoordinatorProcess(cfg, env={"NOTIFY_SOCKET": notify.path}).start()
    try:
        errors = wait_for(lambda: error_lines(coord), 15, "the connection error in the log")
        assert f"cannot connect to broker 127.0.0.1:{port}: Connection refused; retrying every 0.2-0.4 s" in errors[0]
        wait_for(lambda: notify.saw(f"STATUS=waiting for broker 127.0.0.1:{port}: Connection refused"), 5, "the STATUS")
        time.sleep(1.2)  # several retries at 0.2-0.4 s
        assert len(error_lines(coord)) == 1, "one line per reason, not one per retry"
        assert not notify.saw("READY=1"), "READY before the broker accepted the connection"
        with MosquittoBroker(tmp_path / "broker", port=port):
            wait_for(lambda: notify.saw("READY=1"), 10, "READY=1 once the broker is up")
            ready = next(g for g in notify.got if "READY=1" in g)
            assert "STATUS=coordinator running, models at http://127.0.0.1:" in ready
            assert "connected to 127.0.0.1" in coord.log_text()
            assert coord.stop() == 0
            log = coord.log_text()  # a stop is said, as the agent says it
            assert "received SIGTERM: stopping" in log and re.search(r"stopped in \d+\.\d s", log), log[-500:]
    finally:
        coord.stop()
        notify.close()


@pytest.mark.skipif(not mosquitto_binary() or not shutil.which("mosquitto_passwd"), reason="mosquitto is not installed")
def test_refused_credentials_are_named_with_a_hint_and_retried(tmp_path, prefix):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "other", "x"], check=True)
    (tmp_path / "pw").write_text("s3cret\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    with MosquittoBroker(tmp_path / "broker", allow_anonymous=False, extra_conf=f"password_file {passwords}") as broker:
        cfg = coordinator_config(tmp_path, broker.port, prefix, broker={
            "username": "coord", "password_file": str(tmp_path / "pw"), "reconnect_min_s": 0.2, "reconnect_max_s": 0.4})
        coord = CoordinatorProcess(cfg, env={"NOTIFY_SOCKET": notify.path}).start()
        try:
            errors = wait_for(lambda: error_lines(coord), 15, "the refusal in the log")
            assert f"broker 127.0.0.1:{broker.port} refused the connection: Not authorized" in errors[0]
            assert "check broker.username / broker.password_file" in errors[0]
            wait_for(lambda: notify.saw("STATUS=waiting for broker") and notify.saw("refused the connection"), 5, "the STATUS")
            time.sleep(1.2)
            assert coord.alive() and len(error_lines(coord)) == 1
            assert not notify.saw("READY=1")
            # The operator adds the user: the coordinator gets in without a restart.
            subprocess.run(["mosquitto_passwd", "-b", str(passwords), "coord", "s3cret"], check=True)
            broker.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: notify.saw("READY=1"), 10, "READY=1 once the broker accepts the login")
        finally:
            coord.stop()
            notify.close()


def test_the_status_table_says_what_a_device_serves_for_others_and_claims_nothing_for_an_offline_one():
    from lepton.coordinator.status import render_status

    def device(name, liveness, desired, reported, routes=None, serve=None):
        return {"id": name, "agent_version": "0.1.0", "liveness": liveness, "degraded": False, "last_seen_s": 1.0,
                "load1": 0.1, "outbox_depth": 0, "acked_seq": 0, "streams": [], "desired_generation": 1,
                "reported_generation": 1, "desired_models": desired, "desired_versions": {},
                "routes": routes or {}, "serve": serve or {},
                "reported_models": {m: "loaded" for m in reported}, "reported_versions": {}}

    table = render_status({"last_plan": None, "devices": [
        device("cam-1", "online", ["digits"], ["digits"], routes={"door": ["worker:1.00"]}),
        device("worker", "online", ["digits"], ["digits"], serve={"cam-1": ["door", "yard"]}),
        device("gone", "offline", ["digits"], ["digits"]),
        device("fresh", "online", [], ["vibration"]),
    ]})
    rows = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
    assert "door->worker:1.00" in rows["cam-1"] and "digits (loaded)" in rows["cam-1"]
    assert rows["worker"].rstrip().endswith("serves cam-1/door,cam-1/yard")
    assert "(loaded)" not in rows["gone"] and "digits" in rows["gone"]
    assert "vibration (loaded, not placed)" in rows["fresh"]


@pytest.mark.parametrize("text, named", [('[broker]\nport = "1883"\n', "broker.port"),
                                         ("[planner]\ninterval_s = true\n", "planner.interval_s")])
def test_a_value_of_the_wrong_toml_type_is_named_not_coerced(tmp_path, text, named):
    """TOML is typed: a quoted port or a bool for a number is a mistake (it read as 1883 and 1 s before)."""
    from lepton.coordinator.config import load_config
    from lepton.errors import ConfigError

    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        load_config(path)
    assert err.value.exit_code == 2
