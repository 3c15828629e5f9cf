"""Polling until something is true, for the tests that drive real processes and brokers."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.02):
    """Poll *predicate* until it returns a truthy value and return that; fail naming *what* on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
