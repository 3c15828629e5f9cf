"""Prometheus endpoints of the agent and the coordinator: their figures, and a port already taken."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from test_agent_standins import Consumer, agent_config, wait_for
from test_coordinator_standins import CoordinatorProcess, coordinator_config

from lepton.agent.app import Agent
from lepton.agent.config import load_config
from lepton.broker import free_port
from lepton.errors import ConfigError
from lepton.protocol import Topics


def scrape(port: int) -> dict[str, str]:
    """Metric name (with labels) -> value, and '# TYPE name' -> type."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[f"# TYPE {name}"] = kind
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = value
    return out


def test_agent_metrics_carry_telemetry_and_counters_are_counters(broker, prefix, tmp_path):
    port = free_port()
    agent = Agent(load_config(data=agent_config(tmp_path, broker.port, prefix, metrics={"port": port})))
    agent.start()
    try:
        wait_for(lambda: agent.collector.latest is not None and agent.collector.latest.results >= 3, 20, "results")
        got = scrape(port)
        for name in ("published", "resent", "reconnects", "errors", "offloaded", "unserved", "offload_served",
                     "link_probes", "offload_failed", "results", "frames_in"):
            assert got.get(f"# TYPE lepton_agent_{name}_total") == "counter", name
            assert f'lepton_agent_{name}_total{{device="dev1"}}' in got, name
        for name in ("outbox_uncommitted", "connected", "rss_bytes", "link_down_bits_per_second", "outbox_depth"):
            assert got.get(f"# TYPE lepton_agent_{name}") == "gauge", name
        assert got['lepton_agent_outbox_uncommitted{device="dev1"}'] == "0.0"
        exported = {key.split()[-1].removesuffix("_total") for key in got if key.startswith("# TYPE lepton_agent_")}
        assert exported == documented("lepton_agent_"), "docs/metrics.md and the endpoint differ"
        assert got['lepton_agent_connected{device="dev1"}'] == "1.0"
    finally:
        agent.stop()


def documented(prefix: str) -> set[str]:
    """Metric names docs/metrics.md lists (without _total)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    return {name.removesuffix("_total") for name in re.findall(r"`(" + prefix + r"[a-z0-9_]+)`", text)}


def test_the_coordinators_metrics_are_the_documented_ones():
    from lepton.coordinator.metrics import Metrics

    names = {metric.name for metric in Metrics().registry.collect()}
    assert names == documented("lepton_") - documented("lepton_agent_")


def test_an_agent_whose_metrics_port_is_taken_stops_before_it_joins_the_fleet(broker, prefix, tmp_path):
    """The port was bound after the broker session: the device said online, sent results, then exited, and
    the coordinator planned for a device that was gone."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        agent = Agent(load_config(data=agent_config(tmp_path, broker.port, prefix, metrics={"port": port})))
        try:
            with pytest.raises(ConfigError, match=f"metrics.port {port} on 127.0.0.1: Address already in use"):
                agent.start()
            time.sleep(1.0)
            assert consumer.last_status("dev1") is None and consumer.seqs("dev1") == []
        finally:
            agent.stop()
            consumer.close()


def test_a_coordinator_whose_metrics_port_is_taken_exits_2_with_one_line_before_it_connects(broker, prefix, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        coordinator = CoordinatorProcess(coordinator_config(tmp_path, broker.port, prefix, metrics={"port": port}))
        coordinator.start()
        assert coordinator.proc.wait(30) == 2
    log = coordinator.log.read_text().strip().splitlines()
    assert log[-1] == f"lepton: error: metrics.port {port} on 127.0.0.1: Address already in use", log
    assert not any("Traceback" in line or "connecting to broker" in line for line in log), log
