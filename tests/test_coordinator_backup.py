"""`lepton coordinator backup`: a consistent copy of the fleet database while the coordinator writes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading

from test_coordinator_process import CAM, CoordinatorWatch
from test_coordinator_standins import CoordinatorProcess, StandIn, coordinator_config, wait_for

from lepton.protocol import Topics


def lepton(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lepton.cli", *args], capture_output=True, text=True, timeout=60)


def test_backup_while_results_flow_is_consistent_and_usable(broker, prefix, tmp_path):
    topics = Topics(prefix)
    cfg = coordinator_config(tmp_path, broker.port, prefix)
    coord = CoordinatorProcess(cfg).start()
    watch = CoordinatorWatch(broker.port, topics)
    dev = StandIn(broker.port, topics, "dev-1", streams=[CAM]).connect()
    done = threading.Event()

    def send():
        seq = 0
        while not done.is_set() and seq < 20000:
            seq += 1
            dev.result(seq)

    sender = threading.Thread(target=send)
    try:
        wait_for(watch.online, 20, what="coordinator online")
        dev.birth()
        sender.start()
        wait_for(lambda: dev.last_ack() >= 500, 20, what="results committed")
        out = tmp_path / "backup.db"
        proc = lepton("coordinator", "backup", "--config", str(cfg), str(out))
        assert proc.returncode == 0, proc.stderr
        assert "integrity ok" in proc.stderr
        done.set()
        sender.join()
        with sqlite3.connect(out) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
            acked = db.execute("SELECT seq FROM acks WHERE device = 'dev-1'").fetchone()[0]
            stored = [s for (s,) in db.execute("SELECT seq FROM results WHERE device = 'dev-1' ORDER BY seq")]
        # one moment of the database: everything the copy's ack covers is in the copy
        assert acked >= 500 and stored[:acked] == list(range(1, acked + 1))
        assert not list(tmp_path.glob(".backup.db.part")), "no part file left"
        status = json.loads(lepton("status", "--db", str(out), "--json").stdout)
        assert [d["id"] for d in status["devices"]] == ["dev-1"]
        assert coord.alive(), "the coordinator ran on through the backup"
        # refused, naming why, changing nothing
        again = lepton("coordinator", "backup", "--config", str(cfg), str(out))
        assert again.returncode == 2 and "exists (give --force" in again.stderr
        assert lepton("coordinator", "backup", "--config", str(cfg), "--force", str(out)).returncode == 0
        missing = lepton("coordinator", "backup", "--config", str(cfg), str(tmp_path / "no" / "b.db"))
        assert missing.returncode == 2 and "no such directory" in missing.stderr
    finally:
        done.set()
        if sender.is_alive():
            sender.join()
        dev.close()
        watch.close()
        coord.stop()
