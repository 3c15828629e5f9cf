"""Delivery: the one thread that writes the outbox and publishes from it.

Pipelines hand results over with ``submit`` (a queue put, nothing more). This
thread commits whatever has queued in one transaction (group commit: one
fsync for many results), and only then publishes the committed rows at QoS 1,
in seq order, keeping at most ``inflight`` un-PUBACKed. It also applies the
coordinator's acks (the only thing that deletes), expires results whose
deadline passed, and re-sends every unacknowledged result, in order:

- after each reconnect (the session's connection generation changed),
- when the coordinator announces ``online`` live (it just connected and may
  have lost what it had not committed; the retained copy that greets our own
  subscription changes nothing, the reconnect re-send covers it),
- when the oldest unacknowledged result waited ``resend_after_s`` for an ack
  and no ack moved the floor meanwhile (a broker may drop queued QoS 1
  messages without a word; acks that come late but keep coming are not that).

Results flow while the coordinator is known to be online, or when this agent
has never seen a coordinator status and its outbox was never acknowledged (a
standalone device watched by ``mosquitto_sub``). While a coordinator it knows
of is offline, or after a connect until its status is known again, results
wait here, in the outbox, and then go out in seq order from the floor: the
broker's queue (bounded, and silent when it drops) never holds the backlog,
and the coordinator sees each device's results in order.

A re-sent result carries the current ``floor`` so the coordinator can
acknowledge past results this device dropped or expired meanwhile.

Deadlines are wall-clock times (a result's capture time plus the stream's
``deadline_s``). When the wall clock is set (NTP steps a Pi that booted at
its image's date forward by months), every deadline this process made moves
with it, in the outbox and in memory, so a result expires ``deadline_s``
after its capture however the clock was set meanwhile (lepton.clock). Rows
held from before the process started stay as they are: they were made on
the clock of their own run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import replace
from functools import partial

from lepton.agent.config import OutboxConfig
from lepton.agent.outbox import Outbox, Pending, Row
from lepton.agent.session import Outgoing, Session
from lepton.clock import STEP_S, StepWatch, wall_offset
from lepton.repeats import Repeats

log = logging.getLogger(__name__)

TICK_S = 0.5  # how often timers (expiry, re-send) are looked at when idle
STATUS_WAIT_LOG_S = 10.0  # results waiting this long after a connect for the coordinator's status are logged
FAILURE_LOG_S = 30.0  # a step that keeps failing the same way is logged this often


class Delivery:
    """Outbox writer and publisher; every method but ``run`` is safe from any thread."""

    def __init__(self, outbox: Outbox, session: Session, cfg: OutboxConfig) -> None:
        self.outbox, self.session, self.cfg = outbox, session, cfg
        self.queue: queue.SimpleQueue[tuple] = session.events  # the session's events arrive here too
        self.published = 0  # publishes handed to the broker (first sends and re-sends)
        self.resent = 0
        self.committed = 0  # results committed since start
        self.coordinator = "unknown"  # as last announced: unknown (since our connect), online, offline
        # A coordinator status seen by this process, or an ack in this outbox's past: a coordinator exists, so
        # results wait for its status after every connect, the first included (a device restarted with a backlog
        # would otherwise send up to ``inflight`` of it before the retained status says where the coordinator is).
        self.seen_coordinator = outbox.acked > 0
        self._cursor = 0  # highest seq published on the current connection
        self._high = 0  # highest seq ever published by this process
        self._generation = 0
        self._inflight: dict[int, int] = {}  # mid -> seq, current connection only
        self._sent_marks: deque[tuple[int, float]] = deque()  # (first seq, time) of sends, in seq order
        self._acked_at = 0.0  # monotonic time of the last ack that deleted something
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_tick = 0.0
        self._unknown_since: float | None = None  # monotonic connect time while no coordinator status came since
        self._uncommitted: deque[Pending] = deque()  # handed over, not yet committed (a commit failed: retried)
        self._ack_due = 0  # highest ack not yet applied to the outbox
        self._stop_request: tuple | None = None
        self.lost_uncommitted = 0  # dropped before they could be committed (the outbox refused writes that long)
        self._repeats = Repeats(log, f"delivery on outbox {outbox.path}", FAILURE_LOG_S)
        self._drop_logged = -FAILURE_LOG_S
        self._clock = StepWatch()  # deadlines held here and in the outbox are on the wall clock as of its last check
        self._deadline_shift = 0.0  # a clock step the outbox's deadlines have yet to be moved by (a write failed)

    # --- from other threads -----------------------------------------------------
    def submit(self, item: Pending) -> None:
        """Hand one result over; it is committed, then published, by the delivery thread."""
        self.queue.put(("result", item, wall_offset()))  # the clock it was made on: set before its commit, it moves

    @property
    def uncommitted(self) -> int:
        """Results that wait in memory because the outbox refuses writes (a full disk); 0 while it takes them."""
        return len(self._uncommitted) if self._repeats.failing else 0

    def ack(self, seq: int) -> None:
        """The coordinator committed everything up to *seq*."""
        self.queue.put(("ack", seq))

    def coordinator_state(self, state: str, live: bool = True) -> None:
        """The coordinator's status says *state* (online / offline); *live*: published now, not the retained copy."""
        self.queue.put(("coordinator", state, live))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Commit everything submitted, publish what the link allows, wait up to *timeout* for PUBACKs."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        self.queue.put(("stop", done, deadline))
        done.wait(timeout)  # at most *timeout* in all: the agent's stop budget counts on it
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    # --- the thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                items = [self.queue.get(timeout=TICK_S)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            failed = False
            for step in (self._follow_clock, partial(self._handle, items), self._timers, self._send):
                try:  # each on its own: rows already held still go out (and expire) while commits fail
                    step()
                except Exception as exc:  # the outbox thread must outlive any one bad moment (e.g. a full disk)
                    self._failed(exc)
                    failed = True
            if failed:
                self._bound_uncommitted()
                if self._stop_request is None:
                    time.sleep(TICK_S)
            else:
                self._repeats.worked()
            stop = self._stop_request
            if stop is not None:
                self._drain_pubacks()
                if not self._inflight or time.monotonic() >= stop[2] or not self.session.connected.is_set():
                    if self._uncommitted:
                        log.error("stopping with %d result(s) the outbox would not take: they are lost",
                                  len(self._uncommitted))
                    stop[1].set()
                    return
                self.session.wake_on_puback = True

    def _drain_pubacks(self) -> bool:
        """Forget what the broker PUBACKed since last time; True if anything was."""
        pubacks, any_ = self.session.pubacks, False
        while pubacks:
            generation, mid = pubacks.popleft()
            if generation == self._generation:
                self._inflight.pop(mid, None)
                any_ = True
        return any_

    def _handle(self, items: list[tuple]) -> None:
        """Take in *items*, then commit and apply acks. Nothing taken in is lost when a write fails: results
        and the latest ack wait here for the next round (control items are applied first, in any case)."""
        self._drain_pubacks()
        for item in items:
            kind = item[0]
            if kind == "result":
                self._uncommitted.append(self._on_clock(item[1], item[2]))
            elif kind == "ack":
                self._ack_due = max(self._ack_due, item[1])
            elif kind == "connected":
                self._new_connection(item[1])
            elif kind == "coordinator":
                self._coordinator(item[1], item[2])
            elif kind == "stop":
                self._stop_request = item
        # Acks first: on a full disk the rows they delete free the pages the commits need.
        refused = None
        if self._ack_due:
            try:
                self._ack(self._ack_due)
                self._ack_due = 0
            except Exception as exc:  # kept for the next round; the commits below may still fit
                refused = exc
        while self._uncommitted and not self._deadline_shift:  # not among deadlines yet to be moved by a step
            batch = [self._uncommitted[i] for i in range(min(self.cfg.batch_max, len(self._uncommitted)))]
            self._commit(batch)  # raises if the outbox refuses: the batch stays for the next round
        if refused is not None:
            raise refused

    def _follow_clock(self) -> None:
        """Move every held deadline with a step of the wall clock (before anything is committed or expired)."""
        step = self._clock.check()
        if step:
            self._uncommitted = deque(replace(p, deadline=p.deadline + step) if p.deadline is not None else p
                                      for p in self._uncommitted)
            self._deadline_shift += step
            log.warning("the wall clock was set %s by %.1f s: deadlines of held results move with it",
                        "forward" if step > 0 else "back", abs(step))
        if self._deadline_shift:
            self.outbox.shift_deadlines(self._deadline_shift, self.outbox.run_first_seq)  # raises on a full disk
            self._deadline_shift = 0.0

    def _on_clock(self, item: Pending, offset: float) -> Pending:
        """*item*, made when the wall clock was *offset* from the boot clock, on the clock of the last check."""
        step = self._clock.offset - offset
        if item.deadline is None or abs(step) < STEP_S:
            return item
        return replace(item, deadline=item.deadline + step)

    def _failed(self, exc: Exception) -> None:
        self._repeats.failed(exc, f"{len(self._uncommitted)} result(s) wait in memory to be committed")

    def _bound_uncommitted(self) -> None:
        """While the outbox refuses writes, results wait in memory, at most ``max_rows`` of them: past that the
        oldest are dropped (before they were numbered, so no seq is missing), counted and logged."""
        over = len(self._uncommitted) - self.cfg.max_rows
        if over > 0:
            for _ in range(over):
                self._uncommitted.popleft()
            self.lost_uncommitted += over
            now = time.monotonic()
            if now - self._drop_logged >= FAILURE_LOG_S:  # it happens every round while the disk stays full
                log.error("outbox %s refuses writes and %d result(s) wait in memory: dropping the oldest "
                          "(%d dropped in all)", self.outbox.path, self.cfg.max_rows, self.lost_uncommitted)
                self._drop_logged = now

    def _commit(self, batch: list[Pending]) -> None:
        """Commit *batch*, the oldest of ``_uncommitted``, and take it from there; then publish what is next."""
        rows = self.outbox.enqueue(batch)
        for _ in batch:  # committed: from here on it is the outbox's, whatever happens to the publish
            self._uncommitted.popleft()
        self.committed += len(batch)
        # Fast path: caught up on this connection, so the new rows are next.
        if rows and self._cursor == rows[0].seq - 1 and self.may_send():
            now, last = time.time(), self._last_sendable()
            for row in rows:
                if row.seq > last or len(self._inflight) >= self.cfg.inflight or not self._publish(row, row.payload, now):
                    break

    def _ack(self, seq: int) -> None:
        renumbered = self.outbox.renumbered
        removed = self.outbox.ack(seq)
        if self.outbox.renumbered != renumbered:  # every held result has a new seq: send them all again
            self._resend_all("numbered again above the coordinator's ack")
        if removed:
            self._acked_at = time.monotonic()
        self._trim_marks()
        log.debug("ack %d: %d result(s) deleted, %d held", seq, removed, self.outbox.depth)

    def _trim_marks(self) -> None:
        """Forget send marks of results no longer held (acked, dropped or expired): only the mark at or
        below the floor, the oldest unacknowledged send, is still timed."""
        floor = self.outbox.floor
        while len(self._sent_marks) > 1 and self._sent_marks[1][0] <= floor:
            self._sent_marks.popleft()
        if not self.outbox.depth:
            self._sent_marks.clear()

    def _new_connection(self, generation: int) -> None:
        self._generation = generation
        self._inflight.clear()
        self.coordinator = "unknown"
        self._unknown_since = time.monotonic()
        self._resend_all("reconnected")

    def _coordinator(self, state: str, live: bool) -> None:
        self.coordinator, self.seen_coordinator = state, True
        self._unknown_since = None
        if state == "online" and live:
            self._resend_all("the coordinator came online")

    def _resend_all(self, why: str) -> None:
        if self.outbox.depth and self._cursor >= self.outbox.floor:
            log.info("%s: re-sending %d unacknowledged result(s) from seq %d", why, self.outbox.depth, self.outbox.floor)
        self._cursor = 0
        self._sent_marks.clear()

    def _timers(self) -> None:
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        expired = self.outbox.expire() if not self._deadline_shift else 0  # not on deadlines yet to be moved
        if expired:
            log.info("expired %d result(s) whose deadline passed (%d in all)", expired, self.outbox.expired)
        self._trim_marks()
        if (self.coordinator == "unknown" and self.seen_coordinator and self._unknown_since is not None
                and now - self._unknown_since >= STATUS_WAIT_LOG_S and self.outbox.depth
                and self.session.connected.is_set()):
            self._unknown_since = None  # once per connection
            log.warning("%d result(s) wait for the coordinator's status: none came %.0f s after connecting (a "
                        "coordinator acknowledged this outbox before, so results go out once its retained status "
                        "says it is online; is the coordinator gone from this broker?)", self.outbox.depth,
                        STATUS_WAIT_LOG_S)
        # Only a coordinator known to be online is waited for: with none (or one
        # that said offline) a re-send would only feed the broker's queues.
        # Waited: since the oldest unacknowledged result went out, or since the last ack that deleted something
        # if later. Acks that keep coming, however far behind, mean the coordinator is working through them: a
        # re-send then would only double what the broker queues for it (and it drops past its limit).
        waited = now - max(self._sent_marks[0][1], self._acked_at) if self._sent_marks else 0.0
        if (self._sent_marks and self.coordinator == "online" and self.session.connected.is_set()
                and waited >= self.cfg.resend_after_s and self.outbox.depth):
            self._resend_all(f"no ack for {self.cfg.resend_after_s:.0f} s")

    def may_send(self) -> bool:
        """Connected, and the coordinator is online (or none was ever seen)."""
        if not self.session.connected.is_set():
            return False
        return self.coordinator == "online" or (self.coordinator == "unknown" and not self.seen_coordinator)

    def _last_sendable(self) -> int:
        """The highest seq that may be on the wire: ``ack_window`` past the floor once a coordinator
        is known, so a backlog goes out as fast as the coordinator acknowledges it instead of all
        at once into the broker's bounded queue for it; everything for a standalone device."""
        if not self.seen_coordinator:
            return self.outbox.next_seq - 1
        return self.outbox.floor + self.cfg.ack_window - 1

    def _send(self) -> None:
        """Publish held rows after the cursor, in order, while the in-flight window has room."""
        while self.may_send():
            room = self.cfg.inflight - len(self._inflight)
            if room <= 0:
                self.session.wake_on_puback = True  # wake this thread when the window opens
                if self._drain_pubacks():  # unless it opened while we looked
                    continue
                return
            last = min(self.outbox.next_seq - 1, self._last_sendable())
            start = max(self._cursor, self.outbox.floor - 1)  # after a re-send the cursor is 0: rows begin at the floor
            if start >= last:
                return  # caught up, or the ack window is full (an ack opens it): nothing to look up
            rows = self.outbox.pending(self._cursor, min(room, 500, last - start))
            if not rows:
                return
            now, floor, lost = time.time(), self.outbox.floor, self.outbox.lost_upto
            for row in rows:
                # A floor at or below a lost seq would stall the coordinator's ack at that gap.
                payload = _with_floor(row.payload, floor) if row.floor <= lost else row.payload
                if not self._publish(row, payload, now):
                    return

    def _publish(self, row: Row, payload: bytes, now: float) -> bool:
        if row.expired(now) and not self._deadline_shift:
            self._cursor = row.seq  # expire() deletes and counts it; it is never sent
            return True
        # Only on the connection whose "connected" event was handled here (its re-send starts at the floor);
        # on a newer one, nothing goes out until that event resets the cursor: results stay in seq order.
        sent = self.session.publish(Outgoing(row.topic, payload, 1), generation=self._generation)
        if sent is None:
            return False
        mid = sent[1]
        self._inflight[mid] = row.seq
        if row.seq <= self._high:
            self.resent += 1
        self._cursor, self._high = row.seq, max(self._high, row.seq)
        self.published += 1
        t = time.monotonic()
        # Marks time the wait for acks; a standalone device (no coordinator ever seen) waits for none.
        if self.seen_coordinator and (not self._sent_marks or t - self._sent_marks[-1][1] >= 0.1):
            self._sent_marks.append((row.seq, t))
        return True


def _with_floor(payload: bytes, floor: int) -> bytes:
    """The payload with its ``floor`` raised to *floor* (a result waiting in the outbox may predate drops)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(body, dict) or body.get("floor", 1) >= floor:
        return payload
    body["floor"] = floor
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()  # as the pipeline wrote it
