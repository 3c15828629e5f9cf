"""What a person sees from ``lepton coordinator`` and ``lepton events`` when something is wrong: one clear line
naming the key or the reason, exit 2 for a bad config, and systemd told READY only once the broker accepted
the coordinator."""

from __future__ import annotations

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

def test_events_refuses_a_kind_that_does_not_exist(tmp_path):
    from lepton.coordinator.db import open_db
    from lepton.coordinator.registry import FleetRegistry

    path = tmp_path / "c.db"
    db = open_db(path)
    FleetRegistry(db).event("placement", "cam-1", "models: digits")
    db.conn.commit()
    db.close()
    res = lepton("events", "--db", str(path), "--kind", "placment")
    assert res.returncode == 2
    line = error_line(res)
    assert "--kind 'placment': no such event kind" in line
    assert all(kind in line for kind in ("placement", "device-offline", "device-stale", "model-failed", "plan-failed"))
    res = lepton("events", "--db", str(path), "--kind", "placement")
    assert res.returncode == 0 and "cam-1" in res.stdout and "models: digits" in res.stdout


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
