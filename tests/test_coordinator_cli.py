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
