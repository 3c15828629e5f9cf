"""`lepton demo --duration 60 --json`: results from every stream and at least one failover."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lepton.broker import mosquitto_binary


@pytest.mark.timeout(240)
def test_demo_headless_summary_shows_failover_and_every_stream(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    out = subprocess.run([sys.executable, "-m", "lepton.cli", "demo", "--duration", "60", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=200)
    summary = json.loads(out.stdout)
    assert out.returncode == 0, summary["problems"]
    assert summary["ok"] and not summary["problems"]
    assert summary["failovers"], "no stream moved off the killed worker"
    for name, stream in summary["streams"].items():
        assert stream["results"] > 0, name
    digits = summary["streams"]["cam-1/door-digits"]
    assert digits["accuracy"] >= 0.9  # labels checked against the rendered digits
    assert summary["plans"] >= 2 and summary["placements_published"] >= 2
