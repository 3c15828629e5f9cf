"""Reconciliation in a real agent process: fetch over HTTP, switch atomically, refuse bad models and keep serving.

A real Mosquitto, the agent as a process, the coordinator's HTTP model
server over hand-picked files, and a placement publisher standing in for the
coordinator's rebalancer (so it can place what a coordinator would never
offer: a tampered file, a stranger's signature, an older version, a file that
verifies but does not load).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from test_agent_standins import AgentProcess, Consumer, agent_config, wait_for
from test_placement_kit import Placer, Store, build_version, flip_byte, make_keys, unloadable_version

from lepton.models.registry import Registry, zoo_dir
from lepton.protocol import Topics

DIGITS = [{"id": "cam0", "type": "synthetic", "pattern": "digits", "fps": 10.0, "width": 32, "height": 32}]
STREAM = [{"id": "door", "source": "cam0", "model": "digits"}]


@pytest.fixture
def rig(broker, prefix, tmp_path):
    """(topics, consumer, placer, store, keys) around one test."""
    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "results.db").start()
    placer = Placer(broker.port, topics)
    store = Store()
    keys = make_keys(tmp_path / "keys")
    agents: list[AgentProcess] = []
    yield topics, consumer, placer, store, keys, agents
    for agent in agents:
        agent.stop()
    store.close()
    placer.close()
    consumer.close()


def start_agent(rig, tmp_path, workers: int = 1) -> AgentProcess:
    topics, consumer, _, _, (_, public), agents = rig
    cfg = agent_config(tmp_path, consumer.port, topics.prefix, sources=DIGITS, streams=STREAM,
                       models={"cache_dir": str(tmp_path / "cache"), "trusted_keys": [str(public)]},
                       runtime={"workers": workers, "warmup": 3})
    agent = AgentProcess(cfg, tmp_path).start()
    agents.append(agent)
    wait_for(lambda: _alive(agent) and consumer.seqs("dev1"), 30, "first results")
    return agent


def _alive(agent: AgentProcess) -> bool:
    if agent.proc.poll() is not None:
        raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_tail()}")
    return True


def report_for(placer: Placer, agent: AgentProcess, gen: int, timeout: float = 30):
    return wait_for(lambda: _alive(agent) and placer.report("dev1", gen), timeout, f"report of generation {gen}")


def versions(consumer: Consumer) -> list[tuple[float, str, str]]:
    """(captured_at, version, sha256) of each result, in capture order."""
    return sorted((r.captured_at, r.model.version, r.model.sha256) for r in consumer.outputs("dev1"))


def longest_gap(consumer: Consumer, since: float) -> float:
    times = sorted(r.captured_at for r in consumer.outputs("dev1") if r.captured_at >= since)
    return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def test_swap_is_atomic_and_loses_no_frame(rig, tmp_path):
    """zoo digits 1.0.0 -> delivered 2.0.0 while frames flow: every result names one version, old ones all
    before new ones, no frame skipped across the switch, and the model came over HTTP."""
    topics, consumer, placer, store, (private, public), _ = rig
    agent = start_agent(rig, tmp_path, workers=2)
    zoo = Registry(zoo_dir()).get("digits").manifest
    new = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    wait_for(lambda: len(consumer.seqs("dev1")) >= 10, 20, "results from the zoo version")
    gen = placer.place("dev1", [new])
    report = report_for(placer, agent, gen)
    assert report.models["digits"].state == "loaded" and report.models["digits"].version == "2.0.0"
    assert report.models["digits"].invoke_ms > 0
    switched = time.time()
    wait_for(lambda: sum(v == "2.0.0" for _, v, _ in versions(consumer)) >= 10, 20, "results from 2.0.0")
    agent.signal(signal.SIGTERM)
    assert agent.wait(15) == 0
    seen = versions(consumer)
    kinds = [(v, s) for _, v, s in seen]
    assert set(kinds) == {("1.0.0", zoo.sha256), ("2.0.0", new.sha256)}, "each result names the model that made it"
    first_new = kinds.index(("2.0.0", new.sha256))
    assert all(v == "2.0.0" for v, _ in kinds[first_new:]), "no old-version result after the switch"
    frames = sorted(r.output["source"]["frame"] for r in consumer.outputs("dev1"))
    assert frames == list(range(frames[0], frames[0] + len(frames))), "a frame was lost"
    _, counters, _ = agent.outbox_state()  # a new outbox numbers from the clock in microseconds
    first = counters["first_seq"]
    assert sorted(consumer.seqs("dev1")) == list(range(first, first + len(frames)))
    assert (tmp_path / "cache" / "digits" / "2.0.0" / "model.tflite").exists(), "delivered into the cache"
    at = min(r.output["source"]["frame"] for r in consumer.outputs("dev1") if r.model.version == "2.0.0")
    print(f"\nswitch 1.0.0 -> 2.0.0 at frame {at}: {first_new} old, {len(kinds) - first_new} new "
          f"results, frames contiguous; longest gap {longest_gap(consumer, switched - 5):.3f} s")


def test_bad_models_are_refused_with_the_reason_and_the_good_one_keeps_serving(rig, tmp_path):
    topics, consumer, placer, store, (private, public), _ = rig
    agent = start_agent(rig, tmp_path)
    good = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    gen = placer.place("dev1", [good])
    assert report_for(placer, agent, gen).models["digits"].state == "loaded"
    since = time.time()

    tampered = build_version(tmp_path / "store", "digits", "2.1.0", private, public)
    tampered_ref = store.serve(tampered)
    flip_byte(Path(tampered.path))
    stranger = make_keys(tmp_path / "stranger", "stranger")
    cases = [
        ("one flipped byte", tampered_ref, "sha256 check failed"),
        ("bad signature", store.serve(build_version(tmp_path / "store", "digits", "2.2.0", *stranger)),
         "signature check failed"),
        ("older version", store.serve(build_version(tmp_path / "store", "digits", "1.5.0", private, public)),
         "version check failed"),
        ("valid but unloadable", store.serve(unloadable_version(tmp_path / "store", "digits", "2.3.0", private)),
         "load check failed"),
    ]
    lines = []
    for what, ref, why in cases:
        before = len(consumer.seqs("dev1"))
        gen = placer.place("dev1", [ref])
        state = report_for(placer, agent, gen).models["digits"]
        assert state.state == "failed" and why in state.reason and "still serving version 2.0.0" in state.reason, state
        assert state.version == ref.version
        wait_for(lambda: len(consumer.seqs("dev1")) >= before + 5, 10, f"results after the {what} refusal")
        lines.append(f"  {what}: {state.reason[:110]}")
    gap = longest_gap(consumer, since)
    served = {v for t, v, _ in versions(consumer) if t >= since}
    assert served == {"2.0.0"}, f"only the good version served after it loaded, got {served}"
    assert gap < 1.0, f"results stopped for {gap:.2f} s during the refusals"
    assert not (tmp_path / "cache" / "digits" / "2.3.0").exists(), "the unloadable file is not kept for a restart"
    assert agent.proc.poll() is None
    print("\nrefused:\n" + "\n".join(lines) + f"\nlongest gap in results meanwhile: {gap * 1000:.0f} ms (10 fps)")


def test_sigkill_during_a_swap_restarts_into_the_old_or_the_new_model(rig, tmp_path, long_run):
    """Kill the agent at points across a swap; after each restart it serves a whole version that verifies."""
    topics, consumer, placer, store, (private, public), agents = rig
    refs = [store.serve(build_version(tmp_path / "store", "digits", f"3.{i}.0", private, public,
                                      tflite=zoo_dir() / ("digits" if i % 2 else "digits-int8") / "model.tflite"))
            for i in range(6 if long_run else 2)]
    agent = start_agent(rig, tmp_path)
    for i, ref in enumerate(refs):
        placer.place("dev1", [ref])
        time.sleep(0.05 + 0.3 * i)  # somewhere in fetch, install, load or switch
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        agent = AgentProcess(agent.config, tmp_path).start()
        agents.append(agent)
        before = len(consumer.seqs("dev1"))
        wait_for(lambda: _alive(agent) and len(consumer.seqs("dev1")) >= before + 5, 40, "results after restart")
        last = consumer.outputs("dev1")[-1].model
        allowed = {("1.0.0", Registry(zoo_dir()).get("digits").manifest.sha256)} | {(r.version, r.sha256) for r in refs}
        assert (last.version, last.sha256) in allowed
        cache = Registry(tmp_path / "cache", trusted_keys=[public])
        if cache.root.is_dir():
            assert all(reason is None for _, reason in cache.verify_all()), "a partial version in the cache"
    # The retained placement is applied after the last restart: the newest version ends up serving.
    wait_for(lambda: consumer.outputs("dev1")[-1].model.version == refs[-1].version, 30, "the last version placed")
    print(f"\n{len(refs)} SIGKILLs across swaps: each restart served a whole, verified version")


def test_updates_leave_two_versions_in_the_cache(rig, tmp_path):
    """Three updates in a row: after each is applied the cache holds the version serving and the one
    before it (a rollback needs no download); older ones are gone, so updates do not fill the card."""
    topics, consumer, placer, store, (private, public), _ = rig
    agent = start_agent(rig, tmp_path)
    refs = [store.serve(build_version(tmp_path / "store", "digits", v, private, public))
            for v in ("2.0.0", "2.1.0", "2.2.0")]
    for ref in refs:
        gen = placer.place("dev1", [ref])
        assert report_for(placer, agent, gen).models["digits"].version == ref.version
    cached = sorted(p.name for p in (tmp_path / "cache" / "digits").iterdir() if not p.name.startswith("."))
    assert cached == ["2.1.0", "2.2.0"], cached
    gen = placer.place("dev1", [refs[1]])  # roll back: from the cache, not the store
    assert report_for(placer, agent, gen).models["digits"].version == "2.1.0"
    assert "removed digits 2.0.0 from the model cache" in agent.log_tail(400)
