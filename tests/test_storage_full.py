"""A full disk under the agent's outbox and the coordinator's database: a tmpfs of its own, really filled.

Start-up on a full disk fails with one line naming the file and the room left, exit 1 (what can come back;
the units restart for ever), not a config error or a traceback. A running agent keeps its results in
memory, says so (systemd STATUS=, the outbox_uncommitted metric) and goes on when room comes back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from test_agent_standins import agent_config, wait_for
from test_coordinator_standins import CoordinatorProcess, coordinator_config

from lepton.agent.app import Agent
from lepton.agent.config import load_config
from lepton.agent.outbox import Outbox
from lepton.coordinator.db import open_db

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs: needs root")


class SmallDisk:
    def __init__(self, root, size: str = "4m") -> None:
        self.root = root
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], check=True)
        self.filler = root / "filler"

    def fill(self) -> None:
        """Take every free block (the file system then has none)."""
        with open(self.filler, "ab") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path):
    small = SmallDisk(tmp_path / "small")
    yield small
    small.unmount()


def test_an_agent_started_on_a_full_disk_says_so_in_one_line_and_exits_1(disk, broker, prefix, tmp_path):
    data = agent_config(tmp_path, broker.port, prefix)
    data["outbox"]["path"] = str(disk.root / "outbox.db")
    Outbox(data["outbox"]["path"]).close()  # it ran before; a clean stop folds the WAL back in and deletes it
    disk.fill()
    import tomli_w

    config = tmp_path / "agent.toml"
    config.write_text(tomli_w.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "lepton.cli", "agent", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr
    assert last.startswith(f"lepton: error: outbox {disk.root / 'outbox.db'}: cannot be opened: "), last
    assert last.endswith("KiB free on its file system (is the disk full?)"), last
    assert "Traceback" not in proc.stderr


def test_a_coordinator_started_on_a_full_disk_says_so_in_one_line_and_exits_1(disk, broker, prefix, tmp_path):
    db_path = disk.root / "coordinator.db"
    open_db(db_path).close()
    disk.fill()
    coordinator = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix, db={"path": str(db_path)}))
    coordinator.start()
    assert coordinator.proc.wait(60) == 1
    log = coordinator.log.read_text()
    last = log.strip().splitlines()[-1]
    assert last.startswith("lepton: error: ") and str(db_path) in last, last
    assert last.endswith("KiB free on its file system (is the disk full?)"), last
    assert "Traceback" not in log


def test_a_running_agent_holds_results_in_memory_on_a_full_disk_says_so_and_goes_on(disk, broker, prefix, tmp_path):
    """No coordinator acks here, so the outbox grows until the disk is full; then results wait in memory,
    counted in outbox_uncommitted and the systemd status line, and are committed, none lost, once there is
    room again."""
    data = agent_config(tmp_path, broker.port, prefix)
    data["outbox"]["path"] = str(disk.root / "outbox.db")
    data["sources"][0]["fps"] = 50.0
    agent = Agent(load_config(data=data))
    agent.start()
    try:
        wait_for(lambda: agent.outbox.depth >= 20, 20, "results in the outbox")
        disk.fill()
        wait_for(lambda: agent.delivery.uncommitted >= 20, 60, "results waiting in memory")
        assert "refuses writes" in agent.status_line() and "is the disk full?" in agent.status_line()
        assert agent.collector.collect() and agent.collector.extra["outbox_uncommitted"] >= 20
        disk.free()
        wait_for(lambda: agent.delivery.uncommitted == 0, 20, "the waiting results committed")
        made = sum(p.stats()["results"] for p in agent.pipelines.values())
    finally:
        agent.stop()
    box = Outbox(data["outbox"]["path"])
    try:
        assert box.next_seq - box.first_seq >= made and box.dropped == 0 and agent.delivery.lost_uncommitted == 0
        assert box.integrity_check() == "ok"
    finally:
        box.close()
