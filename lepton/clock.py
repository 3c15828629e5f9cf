"""Steps of the wall clock, told apart from time passing.

A Raspberry Pi has no real-time clock: it boots at its image's date (or its
last shutdown's, with fake-hwclock) and NTP steps the clock forward once the
network is up, by months for a card that sat on a shelf; a bad NTP server or
a manual fix steps it back. A time kept from the wall clock to be compared
with the wall clock later (a result's deadline, the moment a device was last
heard) is then off by the step: a forward step expired every held result and
called every device stale at once, a backward one kept a dead device online
for as long as the step.

:class:`StepWatch` compares the wall clock with the boot clock
(``CLOCK_BOOTTIME``: like the monotonic clock, but it counts a suspend, which
a step should not be mistaken for), so that such times can be moved with the
step. NTP's slewing (at most 0.5 ms a second) never adds up to a step, as
each check compares with the one before.
"""

from __future__ import annotations

import time

STEP_S = 2.0  # a move of the wall clock against the boot clock smaller than this is no step

_BOOT = getattr(time, "CLOCK_BOOTTIME", None)


def boot_clock() -> float:
    """Seconds on a clock that only moves forward, suspend included where the system has one."""
    return time.clock_gettime(_BOOT) if _BOOT is not None else time.monotonic()


def wall_offset() -> float:
    """The wall clock minus the boot clock: constant while nobody sets the clock."""
    return time.time() - boot_clock()


class StepWatch:
    """Tells how far the wall clock was set since the last check."""

    def __init__(self, threshold_s: float = STEP_S) -> None:
        self.threshold_s = threshold_s
        self.offset = wall_offset()  # as of the last check: the frame every time held by the caller is in

    def check(self) -> float:
        """The step (s, + forward) since the last check; 0.0 when the clock was not set."""
        now = wall_offset()
        step, self.offset = now - self.offset, now
        return step if abs(step) >= self.threshold_s else 0.0
