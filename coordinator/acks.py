"""Highest contiguous committed sequence number per device.

A device deletes a result from its outbox only when the coordinator says it
committed it. Sequence numbers are per device and never repeat;
every result also carries ``floor``, the lowest seq still in the device's
outbox (everything below it was acknowledged or dropped by the device). So the
ack is ``max(contiguous, floor - 1)``, extended by every seq already stored
above it: a dropped result never stalls acknowledgement, and acks never go
backwards.
"""

from __future__ import annotations

from collections.abc import Iterable


class AckTracker:
    """In-memory view of acked and stored-but-not-yet-contiguous seqs per device."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def load(self, device: str, acked: int, stored_above: Iterable[int]) -> None:
        """Restore one device's state from the database after a restart."""
        self.acked[device] = acked
        above = {s for s in stored_above if s > acked}
        if above:
            self._above[device] = above
        self._extend(device)

    def committed(self, device: str, seqs: Iterable[int], floor: int) -> int:
        """Note seqs now stored for *device* (duplicates included) and the newest floor; return the ack."""
        acked = max(self.acked.get(device, 0), floor - 1)
        above = self._above.setdefault(device, set())
        above.update(s for s in seqs if s > acked)
        self.acked[device] = acked
        self._extend(device)
        return self.acked[device]

    def frontier(self, device: str, floor: int, seqs: Iterable[int]) -> int:
        """The ack that storing *seqs* with *floor* would give *device*; changes nothing."""
        acked = max(self.acked.get(device, 0), floor - 1)
        present = {s for s in seqs if s > acked}
        above = self._above.get(device)
        if above:
            present |= above
        while acked + 1 in present:
            acked += 1
        return acked

    def _extend(self, device: str) -> None:
        above = self._above.get(device)
        acked = self.acked.get(device, 0)
        if above:
            above.difference_update([s for s in above if s <= acked])
            while acked + 1 in above:
                acked += 1
                above.discard(acked)
            if not above:
                del self._above[device]
        self.acked[device] = acked

    def forget(self, device: str) -> None:
        """Drop what is known about *device* (before reloading it from the database)."""
        self.acked.pop(device, None)
        self._above.pop(device, None)

    def pending(self, device: str) -> int:
        """How many stored seqs wait above a gap for *device*."""
        return len(self._above.get(device, ()))
