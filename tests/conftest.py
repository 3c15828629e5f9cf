"""Shared fixtures: a real Mosquitto per test on a free loopback port."""

from __future__ import annotations

import uuid

import pytest

from lepton.broker import MosquittoBroker, mosquitto_binary


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False, help="run long fault and soak variants")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        config.option.markexpr = config.option.markexpr or ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long") or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long run: pass --long (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under --long: tests scale their durations and counts up."""
    return bool(request.config.getoption("--long"))


@pytest.fixture
def broker(tmp_path):
    """A plain (no TLS, anonymous) Mosquitto of this test's own."""
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def persistent_broker(tmp_path):
    """A Mosquitto that persists sessions and queues to disk on every change."""
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(tmp_path / "broker", persistence=True) as b:
        yield b


@pytest.fixture
def prefix() -> str:
    """A topic prefix unique to the test, so nothing leaks between tests."""
    return f"lepton-test-{uuid.uuid4().hex[:8]}/v1"
