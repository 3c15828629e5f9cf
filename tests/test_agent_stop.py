"""Stopping the agent: one budget for every step, so SIGTERM ends the process within 10 s.

The agent runs in this process against a real Mosquitto with the real digits model; the fault is a
stuck invoke (a hung delegate: what ``runtime.stall_s`` exists for), injected into the loaded runner.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from test_agent_standins import Consumer, agent_config, wait_for

from lepton.agent.app import STOP_BUDGET_S, Agent
from lepton.agent.config import load_config
from lepton.agent.outbox import Outbox
from lepton.protocol import Topics

STREAMS = 4  # with a join of its own per stream, four stuck streams alone took 12 s


def hung_agent(tmp_path, port: int, prefix: str) -> tuple[Agent, threading.Event]:
    """A running agent with STREAMS streams whose invokes hang from now on (until the event is set)."""
    data = agent_config(tmp_path, port, prefix,
                        sources=[{"id": f"cam{i}", "type": "synthetic", "pattern": "digits", "fps": 10.0,
                                  "width": 32, "height": 32} for i in range(STREAMS)],
                        streams=[{"id": f"s{i}", "source": f"cam{i}", "model": "digits-int8"}
                                 for i in range(STREAMS)])
    agent = Agent(load_config(data=data))
    agent.start()
    try:
        wait_for(lambda: all(p.stats()["results"] >= 3 for p in agent.pipelines.values()), 20, "results on every stream")
        release = threading.Event()
        runner = agent.runners["digits-int8"]
        infer = runner.infer
        runner.infer = lambda tensor: (release.wait(60), infer(tensor))[1]  # stuck in the invoke
        # healthy() at a time past stall_s is False exactly when a worker has a frame in hand.
        wait_for(lambda: not any(p.healthy(time.monotonic() + p.stall_s + 1) for p in agent.pipelines.values()),
                 10, "every stream stuck on a frame")
    except BaseException:
        agent.stop()
        raise
    return agent, release


def emitted(agent: Agent) -> int:
    return sum(p.stats()["results"] for p in agent.pipelines.values())


def timed_stop(agent, release) -> tuple[float, int]:
    """Stop *agent*, then let its stuck invokes go: (seconds the stop took, results made before it)."""
    try:
        started = time.monotonic()
        agent.stop()
        took = time.monotonic() - started
        return took, emitted(agent)  # before the stuck frames are let go (their results come after the stop)
    finally:
        release.set()


def test_stuck_invokes_on_every_stream_still_stop_within_budget_and_say_offline(broker, prefix, tmp_path):
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    agent, release = hung_agent(tmp_path, broker.port, prefix)
    took, done = timed_stop(agent, release)
    try:
        # The time left after the stuck pipelines still went to flushing and to the offline status.
        stopped_in_budget_said_offline_and_delivered(agent, consumer, took, done)
    finally:
        consumer.close()


def stopped_in_budget_said_offline_and_delivered(agent: Agent, consumer: Consumer, took: float, done: int) -> None:
    """The stop took no more than the budget, the agent said offline itself, and each of the *done* results
    made before the stop reached the consumer."""
    assert took <= STOP_BUDGET_S + 1.0, f"stop took {took:.1f} s (budget {STOP_BUDGET_S} s)"
    status = wait_for(lambda: (s := consumer.last_status("dev1")) and s.state == "offline" and s, 5, "offline")
    assert status.reason == "stopped", "the agent said offline itself, not the broker's last will"
    wait_for(lambda: len(consumer.seqs("dev1")) >= done, 5, f"the {done} results made before the stop")
    first = agent.outbox.first_seq  # a new outbox numbers from the clock in microseconds
    assert sorted(consumer.seqs("dev1")) == list(range(first, first + done))


def test_stuck_invokes_and_a_silent_broker_stop_within_10_s_and_keep_every_result(broker, prefix, tmp_path):
    agent, release = hung_agent(tmp_path, broker.port, prefix)
    os.kill(broker.proc.pid, signal.SIGSTOP)  # the link goes silent: TCP up, no PUBACK ever
    try:
        took, done = timed_stop(agent, release)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert took < 10.0, f"stop took {took:.1f} s: SIGTERM must end the agent within 10 s"
    # Nothing made before the stop is lost: it waits in the outbox for the next start.
    cfg = agent.cfg.outbox
    box = Outbox(cfg.path, cfg.max_rows, cfg.max_bytes)
    try:
        stats = box.stats()
        assert stats["first_seq"] == agent.outbox.first_seq, stats  # the file the agent numbered in
        assert stats["depth"] == stats["next_seq"] - stats["first_seq"] == done > 0, stats
    finally:
        box.close()


@pytest.mark.parametrize("silent", [False, True])
def test_a_quiet_stop_is_quick(broker, prefix, tmp_path, silent):
    """Without stuck parts the budget is not waited for: only a silent broker's PUBACKs are."""
    agent = Agent(load_config(data=agent_config(tmp_path, broker.port, prefix)))
    agent.start()
    wait_for(lambda: emitted(agent) >= 3, 20, "results")
    if silent:
        os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        agent.stop()
        took = time.monotonic() - started
    finally:
        if silent:
            os.kill(broker.proc.pid, signal.SIGCONT)
    assert took < (STOP_BUDGET_S if silent else 2.0), f"stop took {took:.1f} s"


def test_cameras_blocked_in_a_read_stop_within_budget_and_lose_nothing(broker, prefix, tmp_path):
    """Network cameras whose server accepts and never answers hold their capture threads for timeout_s
    (10 s). Each source's join once had 5 s of its own, outside the budget: two such cameras took the
    whole of it, and the results in hand and the offline status got none."""
    import socket

    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)  # connections complete in the backlog; nothing is ever read or written
        url = f"rtsp://127.0.0.1:{blackhole.getsockname()[1]}/live"
        data = agent_config(tmp_path, broker.port, prefix)
        data["sources"] += [{"id": f"ip{i}", "type": "camera", "device": url, "timeout_s": 10.0} for i in range(2)]
        data["streams"] += [{"id": f"door{i}", "source": f"ip{i}", "model": "digits-int8"} for i in range(2)]
        agent = Agent(load_config(data=data))
        agent.start()
        try:
            wait_for(lambda: emitted(agent) >= 3, 20, "results from the synthetic camera")
            time.sleep(1.0)  # both network cameras are inside their open by now
            started = time.monotonic()
            agent.stop()
            took = time.monotonic() - started
            stopped_in_budget_said_offline_and_delivered(agent, consumer, took, emitted(agent))
        finally:
            agent.stop()
            consumer.close()
