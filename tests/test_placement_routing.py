"""Weighted routing and link estimates (pure logic)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from lepton.agent.links import MIN_TRANSFER_S, Links, mbps
from lepton.agent.offload import Router


@pytest.mark.parametrize("routes", [
    [("a", 0.5), ("b", 0.5)],
    [("a", 0.25), ("b", 0.75)],
    [("a", 0.1), ("b", 0.3), ("c", 0.6)],
    [("a", 0.3333), ("b", 0.3333), ("c", 0.3334)],
])
def test_shares_are_honoured_to_within_one_frame_over_any_prefix(routes):
    router = Router(routes)
    total = sum(s for _, s in routes)
    seen: Counter = Counter()
    for n in range(1, 501):
        seen[router.pick()] += 1
        for device, share in routes:
            assert abs(seen[device] - n * share / total) <= 1.0, f"{device} after {n} frames: {seen[device]}"


def test_partial_shares_are_spread_over_the_routes_given_and_no_route_is_none():
    router = Router([("a", 0.2), ("b", 0.2)])  # the rest unserved by the plan: the routes there are take it
    picks = Counter(router.pick() for _ in range(100))
    assert picks == {"a": 50, "b": 50}
    assert Router([]).pick() is None and Router([("a", 0.0)]).pick() is None
    assert [Router([("x", 0.3), ("y", 0.7)]).pick() for _ in range(3)] == ["y"] * 3, "deterministic"


class Meter:
    def __init__(self, rtt=None, totals=(0, 0.0)):
        self.rtt, self._totals = rtt, totals

    def rtt_ms(self):
        return self.rtt

    def totals(self):
        return self._totals


HINTS = SimpleNamespace(rtt_ms=30.0, up_mbps=5.0, down_mbps=20.0)


def test_hints_until_measured_then_measurements():
    links = Links(HINTS, Meter())
    assert links.estimate().model_dump() == {"rtt_ms": 30.0, "up_mbps": 5.0, "down_mbps": 20.0}
    links.meter.rtt = 4.0
    links.add_download(1_000_000, 0.8)  # 10 Mbit/s
    links.add_offload(50_000, 0.05 + 0.004 + 0.010, 10.0)  # 400 kbit in 50 ms after compute and base RTT
    est = links.estimate()
    assert est.rtt_ms == 4.0 and est.down_mbps == pytest.approx(10.0) and est.up_mbps == pytest.approx(8.0, rel=0.01)


def test_small_transfers_say_nothing_and_tiny_times_count_at_the_timer_floor():
    links = Links(HINTS, Meter(rtt=1.0))
    links.add_download(1000, 0.001)
    links.add_offload(2000, 0.002, 0.0)
    assert links.estimate().down_mbps == 20.0 and links.estimate().up_mbps == 5.0
    links.add_probe(32768, 0.0, -0.001)  # loopback: below the timer floor, counted at the floor
    floor = 32768 * 8 / MIN_TRANSFER_S / 1e6
    assert links.estimate().up_mbps == floor == links.estimate().down_mbps == mbps(32768, 0.0)


def test_measure_off_reports_the_hints_only():
    links = Links(HINTS, Meter(rtt=1.0), measure=False)
    links.add_download(1_000_000, 0.1)
    assert links.estimate().model_dump() == {"rtt_ms": 30.0, "up_mbps": 5.0, "down_mbps": 20.0}


def test_pipelined_publishes_count_as_upload():
    meter = Meter(rtt=1.0)
    links = Links(HINTS, meter)
    meter._totals = (1_250_000, 0.5)  # 10 Mbit in 0.5 s of busy link
    assert links.estimate().up_mbps == pytest.approx(20.0)
