"""Results retention: results older than ``db.keep_results_days`` are deleted, a little at a time.

Results are the one table that grows with traffic (plans and events keep a
fixed number of rows). A fleet sending 100 results/s stores 8.6 million rows
a day (about 5 GB of digits results, ~590 bytes each), so without a bound the
coordinator's disk fills. Every
``db.prune_every_s`` a thread with its own connection deletes, device by
device, the results that arrived before the cutoff, in transactions of at
most ``CHUNK`` rows, so ingest never waits long for the write lock.

No index on arrival time is kept (it would cost every insert a second
b-tree): per device, sequence numbers grow with arrival, so the cutoff is
found by a binary search over ``seq`` on the (device, seq) primary key. A
result re-sent late (a device that was offline for days) has an old seq and
a new arrival time; it is pruned with its neighbours.

Arrival times are the coordinator's wall clock. A step of it must not delete
what it did not mean to: set forward by 90 days, every stored result looked
older than 30 days, though the devices had deleted them on ack. So the
cutoff for results that arrived during this run before a forward step is
moved back by the step (``RunFloor``; the steps are logged); results from
earlier runs are judged by their arrival time (or kept longer: the cutoff
is held no lower than the run's floor, which is not always below them).

Acks are kept (a device's ack never goes back). A device holds a result
until its ack arrives, so a result can come back after its row was pruned
only if the device never heard the ack for longer than the retention; it is
then stored again, once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lepton.clock import StepWatch
from lepton.coordinator.db import open_db, write_tx

log = logging.getLogger(__name__)

CHUNK = 2000  # rows deleted per transaction
FIRST_AFTER_S = 60.0  # the first pass, after a start (a coordinator restarted often still prunes)
CLOCK_CHECK_S = 30.0  # how often the wall clock is compared with the boot clock between passes
DAY_S = 86400.0


def _first_at_or_after(db, device: str, seq: int) -> tuple[int, float] | None:
    row = db.execute("SELECT seq, received_at FROM results WHERE device = ? AND seq >= ? ORDER BY seq LIMIT 1",
                     [device, seq]).fetchone()
    return None if row is None else (int(row[0]), float(row[1]))


def prune_below(db, device: str, cutoff: float) -> int:
    """The seq below which every result of *device* arrived before *cutoff* (0: none did).

    Assumes arrival grows with seq (see the module doc); a result that arrives
    after the search is above the bound, so it is never deleted with them."""
    first = _first_at_or_after(db, device, 0)
    if first is None or first[1] >= cutoff:
        return 0
    last = db.execute("SELECT seq, received_at FROM results WHERE device = ? ORDER BY seq DESC LIMIT 1",
                      [device]).fetchone()
    if float(last[1]) < cutoff:
        return int(last[0]) + 1
    lo, hi = first[0], int(last[0])  # the first result at or after lo is old; the first at or after hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = _first_at_or_after(db, device, mid)  # at most hi's: it exists
        if found[1] < cutoff:
            lo = found[0]  # below hi, or it would be hi's (not old)
        else:
            hi = mid
    return _first_at_or_after(db, device, hi)[0]


class RunFloor:
    """The pruning cutoff, corrected for forward steps of the wall clock during this run.

    A result stored before a forward step of S looks S older than it is; its cutoff is S earlier. Such results
    lie between the run's floor (no arrival time of this run is below it) and the time of the step, results
    stored after it above; so the cutoff is held at max(floor, cutoff - S), never above the plain one: results
    from before the run go at the plain cutoff, this run's pre-step results when they are really old enough,
    and its post-step ones at most S later than they would (kept longer, never lost). A backward step needs
    nothing (results before it look younger: kept longer), but lowers the floor.
    """

    def __init__(self) -> None:
        self.floor = self.last = time.time()
        self.forward = 0.0  # the forward steps of this run, summed
        self.watch = StepWatch()

    def observe(self) -> None:
        """Take in a step of the clock since the last look."""
        step, now = self.watch.check(), time.time()
        if step:
            log.warning("the wall clock was set %s by %.0f s: results stored before that are pruned by their age, "
                        "not by the times they were stored with", "forward" if step > 0 else "back", abs(step))
        if step < 0:  # set back somewhere since the last pass: arrivals since then may be as low as this
            self.floor = min(self.floor, self.last + step)
        elif step > 0:
            self.forward += step
        self.last = now

    def cutoff(self, keep_s: float) -> float:
        self.observe()
        cutoff = time.time() - keep_s
        if not self.forward or cutoff <= self.floor:
            return cutoff
        return min(cutoff, max(self.floor, cutoff - self.forward))


class Retention:
    """The pruning thread (see the module doc)."""

    def __init__(self, db_path: str, keep_days: float, every_s: float, synchronous: str = "FULL",
                 on_pruned: Callable[[int], None] | None = None) -> None:
        self.db_path, self.keep_days, self.every_s = db_path, keep_days, every_s
        self.synchronous = synchronous
        self.on_pruned = on_pruned
        self.pruned = 0  # rows deleted since start
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        if self.keep_days <= 0:
            log.info("results are kept forever (db.keep_results_days = 0)")
            return
        self._thread = threading.Thread(target=self._run, args=(stop,), name="retention", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        db = open_db(self.db_path, self.synchronous)
        try:
            run = RunFloor()
            due = time.monotonic() + min(self.every_s, FIRST_AFTER_S)  # soon after a start, then every every_s
            # The clock is looked at every CLOCK_CHECK_S between passes: a step back and one forward within a
            # pass would otherwise cancel out, and what was stored between them would look older than it is.
            while not stop.wait(min(CLOCK_CHECK_S, max(0.0, due - time.monotonic()))):
                run.observe()
                if time.monotonic() < due:
                    continue
                due = time.monotonic() + self.every_s
                try:
                    self.prune(db, run.cutoff(self.keep_days * DAY_S), stop)
                except Exception:  # a locked or full database now is not a reason to stop pruning later
                    log.exception("pruning results failed; trying again in %g s", self.every_s)
        finally:
            db.close()

    def prune(self, db, cutoff: float, stop: threading.Event | None = None) -> int:
        """Delete every result that arrived before *cutoff*; the number of rows deleted."""
        total = 0
        devices = [r[0] for r in db.execute("SELECT device FROM acks ORDER BY device").fetchall()]
        for device in devices:
            below = prune_below(db, device, cutoff)
            while below and (stop is None or not stop.is_set()):
                with write_tx(db):
                    cur = db.execute(
                        "DELETE FROM results WHERE device = ? AND seq IN (SELECT seq FROM results WHERE device = ? "
                        "AND seq < ? ORDER BY seq LIMIT ?)", [device, device, below, CHUNK])
                total += cur.rowcount
                if cur.rowcount < CHUNK:
                    break
        if total:
            log.info("pruned %d result(s) that arrived before %s (db.keep_results_days = %g)", total,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cutoff)), self.keep_days)
            self.pruned += total
            if self.on_pruned:
                self.on_pruned(total)
        return total
