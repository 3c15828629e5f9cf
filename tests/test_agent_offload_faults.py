"""Offload faults on the origin side: inputs still out at shutdown, inputs that cannot be sent.

A real agent in this process (the real digits model) against a real Mosquitto; the target is either a
real paho client that receives the offloaded frames and never answers, or a real ``lepton agent``
process serving the model.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_standins import AgentProcess, Consumer, agent_config, wait_for
from test_placement_kit import Placer
from test_placement_offload import zoo_ref

from lepton.agent.app import Agent
from lepton.agent.config import load_config
from lepton.protocol import Topics
from lepton.protocol.offload import decode_frame

STREAM = "digits-cam"


class SilentTarget:
    """Device "w" as the broker sees it: it receives what is offloaded to it and never answers."""

    def __init__(self, port: int, topics: Topics, origin: str) -> None:
        self.captured: list[float] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="silent-w")
        topic = topics.offload(origin, "w", "digits-int8")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        header, _ = decode_frame(msg.payload)
        with self.lock:
            self.captured.append(header.captured_at)

    def frames(self) -> list[float]:
        with self.lock:
            return list(self.captured)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def placed(placer: Placer, device: str, **kw):
    gen = placer.place(device, **kw)
    return wait_for(lambda: placer.report(device, gen), 20, f"{device} generation {gen}")


@contextmanager
def offloading_to_silent_w(broker, prefix: str, tmp_path, max_inflight: int):
    """An agent (dev1) whose stream is routed to "w", which never answers; a consumer of its results.
    A long timeout: at the stop, what was offloaded is still waiting for its answer."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    target = SilentTarget(broker.port, topics, "dev1")
    agent = Agent(load_config(data=agent_config(tmp_path, broker.port, prefix,
                                                offload={"timeout_s": 60.0, "max_inflight": max_inflight})))
    try:
        agent.start()
        placed(placer, "dev1", models=[zoo_ref()], routes={STREAM: [("w", 1.0)]})
        yield agent, consumer, target
    finally:
        agent.stop()
        target.close()
        placer.close()
        consumer.close()


def test_inputs_unanswered_at_shutdown_are_computed_here(broker, prefix, tmp_path):
    """Placement.stop() says so; the fallback thread used to end before the last timeouts queued them,
    and those frames had no result and no offload_failed count."""
    with offloading_to_silent_w(broker, prefix, tmp_path, max_inflight=256) as (agent, consumer, target):
        wait_for(lambda: len(target.frames()) >= 5, 20, "frames offloaded to w")
        agent.stop()
        sent = target.frames()
        stats = agent.pipelines[STREAM].stats()
        wait_for(lambda: {r.captured_at for r in consumer.outputs("dev1")} >= set(sent), 10,
                 f"results for the {len(sent)} frames w never answered")
        fallback = [r for r in consumer.outputs("dev1") if r.captured_at in set(sent)]
        assert {r.computed_on for r in fallback} == {"dev1"} and stats["offloaded"] == 0
        assert stats["offload_failed"] == 0, "the model is held here: computed, not failed"
        assert agent.offload_client.stats()["w"]["inflight"] == 0


def test_a_worker_waiting_for_an_offload_slot_is_let_go_at_stop(broker, prefix, tmp_path):
    """One slot, taken by a frame w never answers: the worker waits for the slot with its next frame. A stop
    lets it go at once (it held the stop for the pipelines' whole share of the budget, and its frame got no
    result); that frame is computed here like the one still out."""
    with offloading_to_silent_w(broker, prefix, tmp_path, max_inflight=1) as (agent, consumer, target):
        wait_for(lambda: len(target.frames()) == 1, 20, "the one frame w holds")
        time.sleep(0.5)  # the worker is now waiting for the slot with its next frame
        started = time.monotonic()
        agent.stop()
        took = time.monotonic() - started
        assert took < 3.0, f"stop took {took:.1f} s"  # the drain of the answer still out takes 1-2 s; the wait took 3 s more
        wait_for(lambda: len([r for r in consumer.outputs("dev1") if r.computed_on == "dev1"]) >= 2, 10,
                 "both frames computed here")
        assert agent.pipelines[STREAM].stats()["offload_failed"] == 0


@pytest.fixture
def served(broker, prefix, tmp_path):
    """This device's stream served by a real worker process "w"; the agent runs in this process."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    worker = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="w", sources=[], streams=[]),
                          tmp_path).start()
    agent = Agent(load_config(data=agent_config(tmp_path, broker.port, prefix,
                                                offload={"timeout_s": 3.0, "max_inflight": 4})))
    try:
        agent.start()
        placed(placer, "w", models=[zoo_ref()], serve={"dev1": [STREAM]})
        placed(placer, "dev1", models=[zoo_ref()], routes={STREAM: [("w", 1.0)]})
        since = time.time()
        wait_for(lambda: sum(r.computed_on == "w" and r.captured_at >= since for r in consumer.outputs("dev1")) >= 3,
                 20, "results computed on w")
        yield agent, consumer
    finally:
        agent.stop()
        worker.stop()
        placer.close()
        consumer.close()


def test_an_input_that_cannot_be_sent_frees_its_slot_and_says_why(served):
    """A slot was taken before the frame was built; a frame the offload format cannot carry (a dtype it
    does not know, a dimension over 65536) kept it for good, and after max_inflight of them every
    request to that target waited its whole timeout and fell back."""
    agent, consumer = served
    client = agent.offload_client
    bad = [np.zeros((1, 8), np.int64), np.zeros((1, 70000), np.uint8)]  # token ids; a long 1-D signal
    for i in range(2 * agent.cfg.offload.max_inflight):
        why = client.request("w", STREAM, "digits-int8", "1.0.0", bad[i % 2], time.time(),
                             lambda *a: pytest.fail("done() called for an input never sent"))
        assert why.startswith("the input cannot be offloaded: ")
        assert ("dtype" if i % 2 == 0 else "shape.1") in why, why
    assert client.stats()["w"]["inflight"] <= agent.cfg.offload.max_inflight
    # The stream goes on being served by w, not by the local fallback after each timeout.
    since = time.time()
    wait_for(lambda: len([r for r in consumer.outputs("dev1") if r.captured_at >= since]) >= 10, 20,
             "10 results after the refused inputs")
    after = sorted((r for r in consumer.outputs("dev1") if r.captured_at >= since), key=lambda r: r.captured_at)
    assert {r.computed_on for r in after[:10]} == {"w"}, [r.computed_on for r in after[:10]]


def test_a_target_that_answers_with_errors_cannot_pile_up_work_here(broker, prefix, tmp_path):
    """w is up but does not hold the model (it is still being delivered there): each input comes back at once
    with an error and is computed here, by a model slower than the camera. Its slot was freed at the error,
    before the local result was made, so frames queued here without limit (25 a second at 30 fps against
    200 ms) and every result came later than the one before. Now the slot is kept until the local result is
    made, and error replies make w suspect like timeouts: results stay as fresh as the local model allows."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    worker = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="w", sources=[], streams=[]),
                          tmp_path).start()  # no model placed on it: every input gets an error reply
    data = agent_config(tmp_path, broker.port, prefix, offload={"timeout_s": 5.0, "max_inflight": 4})
    data["sources"][0]["fps"] = 30.0
    agent = Agent(load_config(data=data))
    try:
        agent.start()
        wait_for(lambda: agent.runners.get("digits-int8") is not None, 20, "the model loaded here")
        runner = agent.runners["digits-int8"]
        infer = runner.infer
        runner.infer = lambda tensor: (time.sleep(0.2), infer(tensor))[1]  # a local model slower than the camera
        placed(placer, "w", models=[], serve={"dev1": [STREAM]})  # w is up, told to serve, holds no model
        placed(placer, "dev1", models=[zoo_ref()], routes={STREAM: [("w", 1.0)]})
        since = time.time()
        time.sleep(6.0)
        late = [r.inferred_at - r.captured_at for r in consumer.outputs("dev1") if r.captured_at >= since]
        assert len(late) >= 10, f"{len(late)} results in 6 s"
        assert max(late) < 2.0, f"a result came {max(late):.1f} s after its frame (newest {late[-1]:.1f} s)"
        assert agent.pipelines[STREAM].stats()["offload_failed"] == 0, "the model is held here: computed"
    finally:
        agent.stop()
        worker.stop()
        placer.close()
        consumer.close()


def test_a_failed_input_keeps_its_slot_until_it_is_computed_here(tmp_path):
    """The slot of a request that failed (here: timed out) is taken until its fallback has run: a target that
    fails fast cannot let inputs queue here faster than this device computes them."""
    from lepton.agent.config import OffloadConfig
    from lepton.agent.offload import OffloadClient

    client = OffloadClient("dev1", Topics("t/v1"), lambda msg: (0, 1), OffloadConfig(timeout_s=0.2, max_inflight=1))
    stop = threading.Event()
    client.start(stop)
    computing, release = threading.Event(), threading.Event()

    def fallback(reply, why, waited_ms):  # the local model, slow
        computing.set()
        release.wait(10)

    tensor = np.zeros((1, 8, 8, 1), np.uint8)
    try:
        assert client.request("w", STREAM, "m", "1", tensor, time.time(), fallback) == ""
        assert computing.wait(5), "the timed-out input is being computed here"
        why = client.request("w", STREAM, "m", "1", tensor, time.time(), lambda *a: None)
        assert why == "1 requests to w already waiting", why  # its slot is still taken
        release.set()
        wait_for(lambda: client.stats()["w"]["inflight"] == 0, 5, "the slot freed once computed")
    finally:
        release.set()
        stop.set()
        client.join(2)
