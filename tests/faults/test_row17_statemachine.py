"""Row 17 of the fault plan: a rule-based state machine over the outbox, the wire and the coordinator's store.

Real parts, no broker: two devices, each with the agent's own ``Outbox`` (a
SQLite file, bounded so the drop-oldest policy plays), and the coordinator's
own ``Ingest`` thread writing a real coordinator database (``INSERT ... ON
CONFLICT (device, seq) DO NOTHING``, acks from its ``AckTracker``). Between
them a model of the broker: one FIFO of QoS 1 messages that Hypothesis may
deliver, drop (a broker over its queue limit) or duplicate (at-least-once),
and per-device acks it may deliver or lose.

Hypothesis interleaves: produce, deliver, drop, duplicate, deliver or lose
acks, disconnect, reconnect (re-send every unacknowledged result, with the
floor refreshed as the agent's delivery does), re-send on a timer, crash a
device (reopen its outbox file) and crash the coordinator (a new Ingest on
the same database). After every step, per device:

- nothing is lost without being counted: produced = stored + held + dropped,
  with dropped never above the outbox's own counter;
- what was dropped is older than everything held (drop-oldest);
- no (device, seq) is stored twice, and the stored result is the one the
  device numbered (a reused seq would hide a loss);
- results are stored in seq order (one above a gap waits for it to fill);
- acks only go forward and never pass what the device numbered.

``drain`` (a rule, and the end of every run) reconnects everything and
delivers until quiet: then stored = produced minus counted drops, and every
outbox is empty (the coordinator acknowledged past every gap).
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lepton.agent.delivery import _with_floor
from lepton.agent.outbox import Outbox, Pending
from lepton.coordinator.ingest import Inbound, Ingest
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m

pytestmark = pytest.mark.timeout(1800)  # the --long variants run for minutes
DEVICES = ("d1", "d2")
SENTINEL = "sentinel"  # its results mark the end of a delivery batch (see Coordinator.deliver)
MAX_ROWS = 6
TOPICS = Topics("sm/v1")
MODEL = m.ModelId(name="digits", version="1", sha256="0" * 64)
RETIRED: list[Ingest] = []  # stopped Ingest threads, joined at the end of the test
# The subject here is the logic, not durability (row 6 kills real processes): tmpfs when there is one.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


class Coordinator:
    """The coordinator's Ingest thread behind a synchronous face: deliver a batch, get its acks."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.acks: list[tuple[str, int]] = []
        self.pubacks: set[int] = set()
        self._lock = threading.Lock()
        self._mid = 0
        self._sentinel_seq = 0
        self._start()

    def _start(self) -> None:
        self.stop = threading.Event()
        self.ingest = Ingest(str(self.db_path), TOPICS, self, synchronous="NORMAL")
        self.ingest.start(self.stop)

    # the Sink the Ingest thread talks to
    def puback(self, mid: int, qos: int, conn: int) -> None:
        with self._lock:
            self.pubacks.add(mid)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        ack = decode("acks", payload)
        with self._lock:
            self.acks.append((ack.device, ack.seq))

    def deliver(self, messages: list[tuple[str, bytes]], timeout: float = 30.0) -> list[tuple[str, int]]:
        """Hand *messages* to ingest; return once each is committed and its acks are out (the acks)."""
        self._sentinel_seq += 1
        sentinel = result_payload(SENTINEL, self._sentinel_seq, 1, "end")
        before = len(self.acks)
        mids = []
        for topic, payload in [*messages, (TOPICS.result(SENTINEL, "s"), sentinel)]:
            self._mid += 1
            mids.append(self._mid)
            self.ingest.submit(Inbound(topic, payload, 1, self._mid))
        deadline = time.monotonic() + timeout
        # The sentinel's ack is published after every earlier batch published its own.
        while not (set(mids) <= self.pubacks and (SENTINEL, self._sentinel_seq) in self.acks[before:]):
            if time.monotonic() > deadline:
                raise TimeoutError("ingest did not commit a delivery")
            time.sleep(0.001)
        return [a for a in self.acks[before:] if a[0] != SENTINEL]

    def crash(self) -> None:
        """The coordinator dies and comes back: a new Ingest rebuilds its acks from the database.

        The old thread is idle (every delivery was committed) and is told to stop, not
        waited for: it looks at its stop flag every 0.2 s, and nothing reaches it any more.
        """
        self.stop.set()
        RETIRED.append(self.ingest)
        self._start()

    def close(self) -> None:
        self.stop.set()
        RETIRED.append(self.ingest)


def result_payload(device: str, seq: int, floor: int, tag: str) -> bytes:
    return encode(m.Result(device=device, stream="s", seq=seq, floor=floor, model=MODEL, captured_at=time.time(),
                           inferred_at=time.time(), infer_ms=1.0, computed_on=device, output={"tag": tag}))


class Device:
    """One agent's outbox and connection state, re-sending the way agent/delivery.py does."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.path = name, root / f"{name}.db"
        self.box = Outbox(self.path, max_rows=MAX_ROWS, first_seq=1)
        self.abandoned: list[Outbox] = []
        self.connected = True
        self.tags: dict[int, str] = {}  # seq -> the tag of the result numbered with it

    def produce(self, n: int) -> list[tuple[str, bytes]]:
        """Number *n* results; what a connected device publishes at once."""
        made: list[str] = []

        def build(tag: str):
            made.append(tag)
            return lambda seq, floor: (self.tags.__setitem__(seq, tag), result_payload(self.name, seq, floor, tag))[1]

        rows = self.box.enqueue([Pending("s", TOPICS.result(self.name, "s"), build(uuid.uuid4().hex[:8]))
                                 for _ in range(n)])
        return [(r.topic, r.payload) for r in rows] if self.connected else []

    def resend(self) -> list[tuple[str, bytes]]:
        """Every held result in seq order, its floor raised past what was lost (delivery._send)."""
        floor, lost = self.box.floor, self.box.lost_upto
        rows = self.box.pending(0, 10**6)
        assert [r.seq for r in rows] == sorted(r.seq for r in rows), "outbox hands out results out of order"
        return [(r.topic, _with_floor(r.payload, floor) if r.floor <= lost else r.payload) for r in rows]

    def crash(self) -> None:
        """SIGKILL: the file stays as the last commit left it; the process's memory is gone."""
        self.abandoned.append(self.box)
        self.box = Outbox(self.path, max_rows=MAX_ROWS, first_seq=1)
        self.connected = False

    def close(self) -> None:
        for box in [self.box, *self.abandoned]:
            try:
                box.close()
            except sqlite3.Error:
                pass


class DeliveryMachine(RuleBasedStateMachine):
    """Outbox + broker + coordinator under faults; invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="lxf-sm-", dir=SCRATCH))
        self.devices = {d: Device(d, self.root) for d in DEVICES}
        self.coordinator = Coordinator(self.root / "coordinator.db")
        self.wire: list[tuple[str, bytes]] = []  # device -> coordinator, in broker order
        self.acks: dict[str, list[int]] = {d: [] for d in DEVICES}  # coordinator -> device, not yet delivered
        self.ack_history: dict[str, list[int]] = {d: [] for d in DEVICES}

    # --- rules ---------------------------------------------------------------------------
    @rule(device=st.sampled_from(DEVICES), n=st.integers(1, 4))
    def produce(self, device, n):
        self.wire += self.devices[device].produce(n)

    @precondition(lambda self: self.wire)
    @rule(k=st.integers(1, 8))
    def deliver(self, k):
        batch, self.wire = self.wire[:k], self.wire[k:]
        for device, seq in self.coordinator.deliver(batch):
            self.ack_history[device].append(seq)
            if self.devices[device].connected:
                self.acks[device].append(seq)

    @precondition(lambda self: self.wire)
    @rule(i=st.integers(0, 50))
    def broker_drops(self, i):
        del self.wire[i % len(self.wire)]

    @precondition(lambda self: self.wire)
    @rule(i=st.integers(0, 50))
    def broker_duplicates(self, i):
        self.wire.append(self.wire[i % len(self.wire)])

    @rule(device=st.sampled_from(DEVICES))
    def deliver_acks(self, device):
        for seq in self.acks[device]:
            self.devices[device].box.ack(seq)
        self.acks[device] = []

    @rule(device=st.sampled_from(DEVICES))
    def lose_acks(self, device):
        self.acks[device] = []

    @rule(device=st.sampled_from(DEVICES))
    def disconnect(self, device):
        self.devices[device].connected = False
        self.acks[device] = []  # a clean session: what the broker held for it is gone

    @rule(device=st.sampled_from(DEVICES))
    def reconnect(self, device):
        dev = self.devices[device]
        dev.connected = True
        self.wire += dev.resend()

    @precondition(lambda self: any(d.connected for d in self.devices.values()))
    @rule(device=st.sampled_from(DEVICES))
    def resend_timer(self, device):
        if self.devices[device].connected:
            self.wire += self.devices[device].resend()

    @rule(device=st.sampled_from(DEVICES))
    def crash_device(self, device):
        self.devices[device].crash()
        self.acks[device] = []

    @rule()
    def crash_coordinator(self):
        self.coordinator.crash()

    @rule()
    def drain(self):
        """Links up, everything re-sent and delivered, acks applied, until nothing is left to do."""
        for _ in range(4):
            for name, dev in self.devices.items():
                dev.connected = True
                self.wire += dev.resend()
            while self.wire:
                self.deliver(50)
            for name in DEVICES:
                self.deliver_acks(name)
        for name, dev in self.devices.items():
            stored = self.stored(name)
            produced = set(range(1, dev.box.next_seq))
            assert dev.box.depth == 0, f"{name}: outbox not acknowledged empty after a drain: {dev.box.stats()}"
            assert len(produced - set(stored)) <= dev.box.dropped, f"{name}: lost without being counted"

    # --- invariants ------------------------------------------------------------------------
    def stored(self, device: str) -> dict[int, str]:
        conn = sqlite3.connect(f"file:{self.coordinator.db_path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT seq, payload FROM results WHERE device = ?", (device,)).fetchall()
            dups = conn.execute("SELECT COUNT(*) - COUNT(DISTINCT seq) FROM results WHERE device = ?",
                                (device,)).fetchone()[0]
        finally:
            conn.close()
        assert dups == 0, f"{device}: a (device, seq) stored twice"
        return {seq: decode("results", payload).output["tag"] for seq, payload in rows}

    @invariant()
    def nothing_lost_uncounted_and_nothing_stored_twice(self):
        for name, dev in self.devices.items():
            stored = self.stored(name)
            held = {r.seq for r in dev.box.pending(0, 10**6)}
            produced = set(range(1, dev.box.next_seq))
            gone = produced - set(stored) - held
            assert set(stored) <= produced, f"{name}: stored seqs never numbered: {set(stored) - produced}"
            assert len(gone) <= dev.box.dropped, f"{name}: {sorted(gone)} lost, {dev.box.dropped} drops counted"
            assert not held or not gone or max(gone) < min(held), f"{name}: dropped {sorted(gone)} not the oldest"
            wrong = {s for s, tag in stored.items() if dev.tags.get(s, tag) != tag}
            assert not wrong, f"{name}: seqs {sorted(wrong)} stored with another result's payload (seq reused)"

    @invariant()
    def each_device_stored_in_seq_order(self):
        conn = sqlite3.connect(f"file:{self.coordinator.db_path}?mode=ro", uri=True, timeout=30)
        try:
            for name in self.devices:
                times = [t for (t,) in conn.execute(
                    "SELECT received_at FROM results WHERE device = ? ORDER BY seq", (name,))]
                assert times == sorted(times), f"{name}: a result stored after a higher seq"
        finally:
            conn.close()

    @invariant()
    def acks_go_forward_and_stay_within_what_was_numbered(self):
        for name, history in self.ack_history.items():
            assert history == sorted(history), f"{name}: acks went backwards: {history}"
            assert not history or history[-1] < self.devices[name].box.next_seq

    def teardown(self):
        try:
            self.drain()
        finally:
            self.coordinator.close()
            for dev in self.devices.values():
                dev.close()
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.row(17, "state machine: outbox + wire + dedupe")
def test_delivery_state_machine(figures, long_run):
    examples, steps = (2000, 60) if long_run else (80, 40)
    started = time.monotonic()
    DeliveryMachine.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    try:
        DeliveryMachine.TestCase().runTest()
    finally:
        for ingest in RETIRED:
            ingest.join(5)
        RETIRED.clear()
    figures.update(lost=0, dups=0, examples=examples, steps_max=steps, run_s=round(time.monotonic() - started, 1))
