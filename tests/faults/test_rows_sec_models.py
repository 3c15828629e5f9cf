"""Fault-plan rows 11 and 12: bad models are refused while the good one keeps serving; a SIGKILL in the
middle of a model swap restarts into the old or the new version, never a part of one.

A real agent process (digits camera at 10 fps) under the harness, the
coordinator's own HTTP model server over hand-picked files, and a placement
publisher standing in for the coordinator's rebalancer, so it can place what
a coordinator would never offer (tests/test_placement_kit.py; the part-level
versions of these checks are in tests/test_placement_swap.py). Results are
received and acknowledged by the stand-in consumer, which keeps each
result's model version and sha256.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("lepton.agent.reconcile", reason="the agent has no placement reconciliation in this install")

from test_agent_standins import Consumer, wait_for  # noqa: E402
from test_placement_kit import Placer, Store, build_version, flip_byte, make_keys, unloadable_version  # noqa: E402
from test_placement_swap import DIGITS, STREAM, longest_gap, versions  # noqa: E402

from lepton.models.registry import Registry, zoo_dir  # noqa: E402
from lepton.protocol import Topics  # noqa: E402

DEVICE = "dev1"  # the id the placement helpers read results for


class Rig:
    """Broker (harness), consumer, placer, model store and fleet key around one row test."""

    def __init__(self, fleet) -> None:
        self.fleet = fleet
        fleet.start_broker()
        self.topics = Topics(fleet.prefix)
        port = fleet.broker.port
        self.consumer = Consumer(port, self.topics, fleet.root / "results.db").start()
        self.placer = Placer(port, self.topics)
        self.store = Store()
        self.private, self.public = make_keys(fleet.root / "keys")
        self.cache = fleet.root / DEVICE / "models"

    def start_agent(self, runtime: dict | None = None) -> object:
        """The camera agent (restarted with the same config, data and cache)."""
        if DEVICE in self.fleet.procs:
            self.fleet.start(DEVICE)
            proc = self.fleet.procs[DEVICE]
        else:
            proc = self.fleet.start_agent(DEVICE, wait=0, overrides={
                "sources": DIGITS, "streams": STREAM, "runtime": {"warmup": 3, **(runtime or {})},
                "models": {"cache_dir": str(self.cache), "trusted_keys": [str(self.public)]}})
        return proc

    def results_after(self, proc, n: int, timeout: float = 40) -> None:
        before = len(self.consumer.seqs(DEVICE))
        wait_for(lambda: self.alive(proc) and len(self.consumer.seqs(DEVICE)) >= before + n, timeout,
                 f"{n} more results")

    def report(self, proc, gen: int, timeout: float = 40):
        return wait_for(lambda: self.alive(proc) and self.placer.report(DEVICE, gen), timeout,
                        f"report of generation {gen}")

    @staticmethod
    def alive(proc) -> bool:
        if not proc.running:
            raise AssertionError(f"the agent exited with {proc.returncode}:\n{proc.log_tail()}")
        return True

    def version(self, version: str, signer: tuple[Path, Path] | None = None, tflite: Path | None = None):
        private, public = signer or (self.private, self.public)
        extra = {"tflite": tflite} if tflite else {}
        return build_version(self.fleet.root / "store", "digits", version, private, public, **extra)

    def cache_check(self) -> tuple[list[str], int]:
        """(versions installed in the agent's cache, how many of them do not verify)."""
        if not self.cache.is_dir():
            return [], 0
        checked = Registry(self.cache, trusted_keys=[self.public]).verify_all()
        return sorted(e.version for e, _ in checked), sum(reason is not None for _, reason in checked)

    def close(self) -> None:
        for part in (self.store, self.placer, self.consumer):
            try:
                part.close()
            except Exception:  # teardown goes on
                pass


@pytest.fixture
def rig(fleet_factory):
    r = Rig(fleet_factory(devices=[DEVICE], netns=False))
    yield r
    r.close()


# --- row 11 --------------------------------------------------------------------------------------------


def bad_signature(entry) -> object:
    """*entry* with one byte of its manifest's signature changed (right key, signature no longer matches)."""
    data = json.loads(Path(entry.manifest_path).read_text())
    sig = bytearray(base64.b64decode(data["signature"]))
    sig[len(sig) // 2] ^= 0x01
    data["signature"] = base64.b64encode(bytes(sig)).decode()
    Path(entry.manifest_path).write_text(json.dumps(data, indent=2))
    return entry


def truncated(entry) -> object:
    """*entry* whose file on the store lost its second half (the manifest still names the whole file)."""
    path = Path(entry.path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return entry


def bad_cases(rig: Rig) -> list[tuple[str, object, str]]:
    """(case, reference to place, the check its reason must name)."""
    store = rig.store
    tampered = rig.version("2.1.0")
    tampered_ref = store.serve(tampered)
    flip_byte(Path(tampered.path))  # changed on the store after signing
    lying = store.serve(rig.version("2.2.0"), sha256="0" * 64)  # placement names a hash the file does not have
    stranger = make_keys(rig.fleet.root / "stranger", "stranger")
    return [
        ("bad sha256", tampered_ref, "sha256 check failed"),
        ("sha256 other than placed", lying, "manifest check failed"),
        ("bad signature", store.serve(bad_signature(rig.version("2.3.0"))), "signature check failed"),
        ("wrong key", store.serve(rig.version("2.4.0", signer=stranger)), "signature check failed"),
        ("truncated", store.serve(truncated(rig.version("2.5.0"))), "size check failed"),
        ("older version", store.serve(rig.version("1.5.0")), "version check failed"),
        ("valid, fails to load",
         store.serve(unloadable_version(rig.fleet.root / "store", "digits", "2.6.0", rig.private)), "load check failed"),
    ]


@pytest.mark.row(11, "bad models refused, previous one serves")
def test_bad_models_are_refused_and_the_previous_one_keeps_serving(rig, figures):
    proc = rig.start_agent()
    rig.results_after(proc, 5)
    good = rig.store.serve(rig.version("2.0.0"))
    gen = rig.placer.place(DEVICE, [good])
    assert rig.report(proc, gen).models["digits"].state == "loaded"
    rig.results_after(proc, 5)
    since = time.time()
    refused, reasons, took = 0, {}, []
    for case, ref, why in bad_cases(rig):
        t0 = time.monotonic()
        state = rig.report(proc, rig.placer.place(DEVICE, [ref])).models["digits"]
        took.append(time.monotonic() - t0)
        reasons[case] = state.reason
        if (state.state == "failed" and why in state.reason and "still serving version 2.0.0" in state.reason
                and state.version == ref.version):
            refused += 1
        rig.results_after(proc, 3, timeout=10)
    served = sorted({v for t, v, _ in versions(rig.consumer) if t >= since})
    gap = longest_gap(rig.consumer, since)
    installed, unverified = rig.cache_check()
    figures.update(cases=len(reasons), refused=refused, served_meanwhile=served, longest_gap_ms=round(gap * 1000),
                   installed=installed, unverified_in_cache=unverified, refusal_s_max=round(max(took), 2),
                   reasons={k: v.split(": ", 1)[1][:60] if ": " in v else v[:60] for k, v in reasons.items()})
    assert refused == len(reasons), json.dumps(reasons, indent=1)
    assert served == ["2.0.0"], "only the good version serves while the bad ones are refused"
    assert gap < 1.5, f"results stopped for {gap:.2f} s during the refusals"
    assert installed == ["2.0.0"] and unverified == 0, "a refused version was left installed"


# --- row 12 --------------------------------------------------------------------------------------------

# The swap's steps as the reconciler logs them, in order; the phase a kill landed in is the step after
# the last one logged for that generation.
STEPS = [("fetch", r"placement generation {gen}: hold"), ("install+load", r"downloaded digits {version}"),
         ("switch", r"model digits {version} ready"), ("done", r"placement generation {gen} applied")]


def _newest(rig: Rig, gen: int):
    """The newest report of generation *gen* for the model (a restarted agent reports it again)."""
    with rig.placer.lock:
        reports = [r for r in rig.placer.reported.get(DEVICE, []) if r.generation == gen]
    return reports[-1].models.get("digits") if reports else None


def phase_at_kill(log: str, gen: int, version: str) -> str:
    """Which step of the swap to *version* (generation *gen*) the agent was in when its log stopped."""
    phase = "before"
    for name, pattern in STEPS:
        if re.search(pattern.format(gen=gen, version=re.escape(version)), log):
            phase = name
    return phase


@pytest.mark.row(12, "agent SIGKILLed during a model swap")
def test_sigkill_during_a_swap_restarts_into_a_whole_version(rig, figures, long_run):
    kills = 50 if long_run else 5
    zoo = Registry(zoo_dir()).get("digits").manifest
    refs = [rig.store.serve(rig.version(f"3.{i}.0", tflite=zoo_dir() / ("digits" if i % 2 else "digits-int8")
                                        / "model.tflite")) for i in range(kills + 1)]
    allowed = {("1.0.0", zoo.sha256)} | {(r.version, r.sha256) for r in refs}
    # A slow CPU (emulated) and a longer warm-up stretch the load step, so kills spread over every step.
    proc = rig.start_agent({"slowdown": 1000.0, "warmup": 10})
    rig.results_after(proc, 5)
    t0 = time.monotonic()
    rig.report(proc, rig.placer.place(DEVICE, [refs[0]]))
    swap_s = time.monotonic() - t0
    whole, partial, phases, first_after, restart_s = 0, 0, {}, [], []
    for i, ref in enumerate(refs[1:]):
        offset = 0.003 * (1.2 * swap_s / 0.003) ** (i / max(1, kills - 1))  # 3 ms .. 1.2 x a swap, geometric
        proc, phase, cut, first, took = kill_during_swap(rig, proc, ref, offset)
        phases[phase] = phases.get(phase, 0) + 1
        partial += cut
        whole += (first.version, first.sha256) in allowed
        first_after.append(first.version)
        restart_s.append(took)
    wait_for(lambda: rig.consumer.outputs(DEVICE)[-1].model.version == refs[-1].version, 30, "the last version placed")
    installed, unverified = rig.cache_check()
    mismatched = len(rig.consumer.mismatched)
    figures.update(kills=kills, phases=phases, whole_after_restart=whole, first_after_restart=first_after,
                   partial_versions=partial + unverified, swap_s=round(swap_s, 3),
                   restart_to_result_s_max=round(max(restart_s), 2),
                   final=rig.consumer.outputs(DEVICE)[-1].model.version, results=len(rig.consumer.seqs(DEVICE)),
                   seq_content_mismatch=mismatched)
    assert whole == kills, f"after a restart a result came from a version never placed: {first_after}"
    assert partial == 0 and unverified == 0, "a partial version in the cache"
    assert mismatched == 0
    assert kills - phases.get("before", 0) - phases.get("done", 0) >= kills // 2, \
        f"most kills must land inside a swap, else this row proves little: {phases}"


def kill_during_swap(rig: Rig, proc, ref, offset: float):
    """Place *ref*, SIGKILL the agent *offset* s later, restart it. Returns (the new process, the swap's phase
    at the kill, versions in the cache that do not verify as the crash left them, the model of the first
    result the new process made, seconds from restart to results)."""
    start_at = proc.log_size()
    gen = rig.placer.place(DEVICE, [ref])
    time.sleep(offset)
    rig.fleet.kill(DEVICE)
    phase = phase_at_kill(proc.log_text()[start_at:], gen, ref.version)
    unverified = rig.cache_check()[1]
    numbered = rig.fleet.outbox_counters(DEVICE)["next_seq"] - 1  # by the killed process
    t0 = time.monotonic()
    proc = rig.start_agent()
    rig.results_after(proc, 3)
    took = time.monotonic() - t0
    first = next(r.model for r in rig.consumer.outputs(DEVICE) if r.seq > numbered)
    # The retained placement is applied by the new process before the next kill.
    wait_for(lambda: rig.alive(proc) and getattr(_newest(rig, gen), "state", "") == "loaded", 30,
             f"generation {gen} applied after the restart")
    return proc, phase, unverified, first, took
