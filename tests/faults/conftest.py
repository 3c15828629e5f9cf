"""Fixtures for the fault suite, and the figures table printed at the end of the run.

- ``netns``: skips the test with the reason when namespaces are unavailable
  (not root, no ip/tc/nft); removes stale harness namespaces once per session.
- ``fleet_factory(devices=3, netns=True, **kw)``: a ``Fleet`` torn down after
  the test whatever happened; ``fleet``: the default 3-device namespaced one.
- ``figures``: the dict a ``@pytest.mark.row(n, "name")`` test fills; the
  table (one line per row test) is printed after the run and written as JSON
  to ``--figures-json PATH`` or ``$LEPTON_FIGURES_JSON``.
"""

from __future__ import annotations

import os

import pytest

from lepton.broker import mosquitto_binary

from .harness import Fleet, cleanup_stale, unavailable_reason
from .harness.procs import reap_orphans
from .harness import figures as figtable

_ENTRIES = pytest.StashKey[list]()
_FIGURES = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--figures-json", default=None, metavar="PATH",
                     help="write the fault suite's figures table as JSON here (default: $LEPTON_FIGURES_JSON)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "row(number, name): a row of the fault plan; its figures go in the table")
    config.stash[_ENTRIES] = []


@pytest.fixture(scope="session")
def _netns_reason() -> str | None:
    reap_orphans()  # children a hard-killed earlier run left behind
    reason = unavailable_reason()
    if reason is None:
        cleanup_stale()
    return reason


@pytest.fixture
def netns(_netns_reason: str | None) -> None:
    """Skip unless network namespaces, tc and nftables are usable here."""
    if _netns_reason:
        pytest.skip(_netns_reason)


@pytest.fixture
def need_mosquitto() -> None:
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture
def fleet_factory(tmp_path, request, _netns_reason, need_mosquitto):
    """Make fleets: ``fleet_factory(devices=3, netns=True, proxy=False, keepalive=5, prefix="")``."""
    fleets: list[Fleet] = []

    def make(devices: int | list[str] = 3, netns: bool = True, **kwargs) -> Fleet:
        if netns and _netns_reason:
            pytest.skip(_netns_reason)
        fleet = Fleet(tmp_path / f"fleet{len(fleets) or ''}", devices=devices, netns=netns, **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    failed = getattr(request.node, "_lxf_failed", False)
    for fleet in fleets:
        if failed:
            print(f"\n=== logs of the failed fleet under {fleet.root}\n{fleet.log_tails()}")
        fleet.close()


@pytest.fixture
def fleet(fleet_factory) -> Fleet:
    """Three devices, each in a network namespace of its own (no processes started yet)."""
    return fleet_factory()


@pytest.fixture
def figures(request) -> dict:
    """What this row test measured, for the table: ``figures.update(lost=0, ...)``."""
    data: dict = {}
    request.node.stash[_FIGURES] = data
    return data


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        item._lxf_failed = True  # the fleet fixture prints log tails at teardown
    marker = item.get_closest_marker("row")
    last_phase = report.when == "call" or (report.when == "setup" and not report.passed)
    if marker and last_phase:
        number, name = (list(marker.args) + ["", ""])[:2]
        name = name or item.name
        if getattr(item, "callspec", None) is not None:
            name = f"{name} [{item.callspec.id}]"
        figs = item.stash.get(_FIGURES, {})
        outcome = report.outcome if not hasattr(report, "wasxfail") else "xfail"
        if report.skipped and isinstance(report.longrepr, tuple):
            figs = {**figs, "reason": report.longrepr[2].removeprefix("Skipped: ")}
        item.config.stash[_ENTRIES].append(
            figtable.entry(number, name, item.nodeid, outcome, report.duration, figs))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    entries = config.stash.get(_ENTRIES, [])
    if not entries:
        return
    terminalreporter.section("fault plan figures")
    for line in figtable.format_table(entries):
        terminalreporter.write_line(line)
    path = config.getoption("figures_json", default=None) or os.environ.get("LEPTON_FIGURES_JSON")
    if path:
        long_run = bool(config.getoption("--long", default=False))
        written = figtable.write_json(path, entries, long_run)
        terminalreporter.write_line(f"figures written to {written}")
