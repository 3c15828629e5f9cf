"""Offload between two real agent processes over a real Mosquitto: shares, replies, timeouts, fallback."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from test_agent_standins import AgentProcess, Consumer, agent_config, wait_for
from test_placement_kit import Placer

from lepton.models.registry import Registry, zoo_dir
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

DIGITS = [{"id": "cam0", "type": "synthetic", "pattern": "digits", "fps": 10.0, "width": 32, "height": 32}]
TIMEOUT_S = 1.0


def zoo_ref(name: str = "digits-int8") -> m.ModelRef:
    man = Registry(zoo_dir()).get(name).manifest
    return m.ModelRef(name=man.name, version=man.version, sha256=man.sha256, size=man.size,
                      url=f"http://127.0.0.1:9/models/{man.name}/{man.version}/model.tflite")  # held locally


@pytest.fixture
def pair(broker, prefix, tmp_path):
    """A camera and a pure inference worker (no sources), a stand-in coordinator and a placement publisher."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    cam = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="cam", sources=DIGITS,
                                    streams=[{"id": "door", "source": "cam0", "model": "digits-int8"}],
                                    link={"up_mbps": 3.0, "down_mbps": 3.0, "rtt_ms": 50.0, "probe_interval_s": 2.0},
                                    offload={"timeout_s": TIMEOUT_S}), tmp_path).start()
    worker = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="w", sources=[], streams=[]),
                          tmp_path).start()
    yield topics, consumer, placer, cam, worker
    worker.signal(signal.SIGCONT)
    for agent in (cam, worker):
        agent.stop()
    placer.close()
    consumer.close()


def alive(*agents: AgentProcess) -> bool:
    for agent in agents:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_tail()}")
    return True


def place(placer: Placer, agents, device: str, **kw) -> m.Reported:
    gen = placer.place(device, **kw)
    return wait_for(lambda: alive(*agents) and placer.report(device, gen), 20, f"{device} generation {gen}")


def results_since(consumer: Consumer, t: float) -> list[m.Result]:
    return [r for r in consumer.outputs("cam") if r.captured_at >= t]


def longest_gap(results: list[m.Result]) -> float:
    times = sorted(r.captured_at for r in results)
    return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def test_shares_replies_and_local_fallback_when_the_target_goes_silent(pair):
    topics, consumer, placer, cam, worker = pair
    wait_for(lambda: alive(cam, worker) and consumer.seqs("cam"), 30, "first local results")
    assert place(placer, (cam, worker), "w", models=[zoo_ref()], serve={"cam": ["door"]}).models["digits-int8"].state == "loaded"
    place(placer, (cam, worker), "cam", models=[zoo_ref()], routes={"door": [("cam", 0.5), ("w", 0.5)]})
    split_from = time.time()
    wait_for(lambda: len(results_since(consumer, split_from)) >= 40, 20, "40 results split between cam and w")
    split = results_since(consumer, split_from)[:40]
    by = {d: sum(r.computed_on == d for r in split) for d in ("cam", "w")}
    assert abs(by["w"] - by["cam"]) <= 4, f"a 50/50 route gave {by}"
    remote = [r for r in split if r.computed_on == "w"]
    assert all(r.rtt_ms is not None and r.rtt_ms > 0 and r.device == "cam" for r in remote)
    assert all(r.rtt_ms is None for r in split if r.computed_on == "cam")
    right = sum(r.output["top"][0]["label"] == str(r.output["source"]["truth"]) for r in remote)
    assert right >= 0.9 * len(remote), "the offloaded tensor is the frame's"

    place(placer, (cam, worker), "cam", models=[zoo_ref()], routes={"door": [("w", 1.0)]})
    wait_for(lambda: any(r.computed_on == "w" for r in results_since(consumer, time.time() - 0.5)), 10, "all on w")
    worker.signal(signal.SIGSTOP)  # the target goes silent: no reply, no error
    stopped = time.time()
    time.sleep(3 * TIMEOUT_S + 1)
    during = results_since(consumer, stopped)
    worker.signal(signal.SIGCONT)
    resumed = time.time()
    wait_for(lambda: sum(r.computed_on == "w" for r in results_since(consumer, resumed)) >= 5, 20, "w answering again")
    assert during and {r.computed_on for r in during} == {"cam"}, "timed-out inputs were computed here"
    gap = longest_gap(results_since(consumer, stopped - 1))
    print(f"\n50/50 route: {by}; target silent {3 * TIMEOUT_S + 1:.0f} s: {len(during)} results by local fallback, "
          f"longest gap {gap:.2f} s (timeout {TIMEOUT_S} s)")
    assert gap <= TIMEOUT_S + 1.0
    telemetry = [t for t in consumer.telemetry if t.device == "cam"][-1]
    assert telemetry.offload_failed == 0, "a fallback is not a failure"
    assert telemetry.link.up_mbps != 3.0 and telemetry.link.down_mbps != 3.0, "measured, not the hints"
    assert telemetry.link.rtt_ms is not None and telemetry.link.rtt_ms < 50.0


def test_without_the_model_here_failures_are_counted_and_nothing_blocks(pair, broker):
    topics, consumer, placer, cam, worker = pair
    wait_for(lambda: alive(cam, worker) and consumer.seqs("cam"), 30, "first local results")
    place(placer, (cam, worker), "w", models=[zoo_ref()], serve={"cam": ["door"]})
    report = place(placer, (cam, worker), "cam", models=[], routes={"door": [("w", 1.0)]})
    assert report.models == {}, "the model is unloaded here once it is placed elsewhere only"
    since = time.time()
    wait_for(lambda: len(results_since(consumer, since)) >= 10, 20, "offloaded results")
    assert {r.computed_on for r in results_since(consumer, since)} == {"w"}

    # A reply on another device's topic naming our pending request is not the target's: ignored.
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil")
    evil.connect("127.0.0.1", broker.port)
    evil.loop_start()
    for request in range(1, 400):
        forged = m.Reply(server="w", origin="cam", request=request, model="digits-int8", version="9", sha256="f" * 64,
                         output={"top": [{"label": "7", "index": 7, "score": 1.0}]})
        evil.publish(topics.reply("evil", "cam"), encode(forged), qos=1)
    evil.disconnect()
    evil.loop_stop()

    worker.signal(signal.SIGSTOP)
    stopped = time.time()
    wait_for(lambda: [t for t in consumer.telemetry if t.device == "cam" and t.ts > stopped + 1.5
                      and t.offload_failed > 0], 3 * TIMEOUT_S + 5, "offload failures counted in telemetry")
    worker.signal(signal.SIGCONT)
    resumed = time.time()
    wait_for(lambda: alive(cam, worker) and len(results_since(consumer, resumed)) >= 10, 20, "results again")
    assert all(r.model.version != "9" and r.computed_on == "w" for r in consumer.outputs("cam")
               if r.captured_at >= since), "a forged reply became a result"
    failed = [t for t in consumer.telemetry if t.device == "cam"][-1].offload_failed
    print(f"\nno model here, target silent: {failed} frames counted as offload_failed; results resumed after SIGCONT")


def test_jpeg_offload_carries_the_fitted_frame_and_the_planner_is_told_its_size(broker, prefix, tmp_path):
    """offload_jpeg_quality: the wire carries a JPEG of the frame at the model's input size, the worker's output
    is what the model gives on that JPEG, and the birth is re-published with the JPEG's size (sampled while the
    stream is still served locally, so the planner can price offloading it)."""
    import cv2

    from lepton.models.runner import ModelRunner
    from lepton.protocol.offload import decode_frame

    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    sources = [{"id": "cam0", "type": "synthetic", "pattern": "digits", "fps": 10.0, "width": 160, "height": 120}]
    cam = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="cam", sources=sources,
                                    streams=[{"id": "door", "source": "cam0", "model": "mobilenet96",
                                              "offload_jpeg_quality": 85}]), tmp_path).start()
    worker = AgentProcess(agent_config(tmp_path, broker.port, prefix, device="w", sources=[], streams=[]),
                          tmp_path).start()
    frames: list[tuple] = []
    spy = Placer(broker.port, topics)  # a second plain client, used only to watch the offload topic
    wire = topics.offload("cam", "w", "mobilenet96")
    spy.client.on_message = lambda c, u, msg: frames.append(decode_frame(msg.payload)) if msg.topic == wire else None
    spy.client.subscribe(wire, 1)
    try:
        raw = 96 * 96 * 3
        wait_for(lambda: alive(cam, worker) and consumer.seqs("cam"), 30, "first local results")
        born = [s for _, s in consumer.statuses if s.device == "cam" and s.state == "online"]
        assert born[0].streams[0].payload_bytes == raw, "before any frame: the exact tensor's size"
        # Served here, the stream still samples what a frame weighs as JPEG: the planner can price offloading.
        wait_for(lambda: [s for _, s in consumer.statuses if s.device == "cam" and s.state == "online"
                          and s.streams[0].payload_bytes < raw / 4], 10, "the birth re-published with the JPEG size")
        ref = zoo_ref("mobilenet96")
        place(placer, (cam, worker), "w", models=[ref], serve={"cam": ["door"]})
        place(placer, (cam, worker), "cam", models=[ref], routes={"door": [("w", 1.0)]})
        since = time.time()
        wait_for(lambda: sum(r.computed_on == "w" for r in results_since(consumer, since)) >= 10 and len(frames) >= 10,
                 20, "10 results computed on w from frames seen on the wire")
        assert {h.encoding for h, _ in frames} == {"jpeg"}
        sizes = [len(body) for _, body in frames]
        assert max(sizes) < raw / 4, f"JPEG bodies of {sizes} bytes against {raw} raw"

        local = ModelRunner.from_entry(Registry(zoo_dir()).get("mobilenet96"))
        by_capture = {r.captured_at: r for r in consumer.outputs("cam") if r.computed_on == "w"}
        checked = 0
        for header, body in frames:
            result = by_capture.get(header.captured_at)
            if result is None:
                continue
            image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (96, 96, 3), "the frame fitted to the model's input before encoding"
            mine = local.postprocess(local.invoke(local.preprocess(image)), None)
            assert [t["index"] for t in result.output["top"]] == [t["index"] for t in mine["top"]]
            checked += 1
        assert checked >= 5, "offloaded results matched to the frames seen on the wire"
    finally:
        spy.close()
        for agent in (cam, worker):
            agent.stop()
        placer.close()
        consumer.close()
