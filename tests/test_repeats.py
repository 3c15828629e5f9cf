"""A retried step's failures in the log: in full once, then a line every every_s, and when it works again."""

from __future__ import annotations

import logging

from lepton.repeats import Repeats


def test_a_flapping_step_is_logged_in_full_once_and_its_recovery_once(caplog):
    caplog.set_level(logging.INFO, logger="t")
    repeats = Repeats(logging.getLogger("t"), "delivery on outbox o.db", every_s=30.0)
    for _ in range(50):  # fails and works in turn, as a nearly full disk does
        repeats.failed(OSError(28, "No space left on device"), "3 result(s) wait")
        assert repeats.failing
        repeats.worked()
        assert not repeats.failing
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["delivery on outbox o.db failed (3 result(s) wait); retrying",
                        "delivery on outbox o.db works again"]
    assert caplog.records[0].exc_info is not None  # the first time, with its traceback
    repeats.failed(ValueError("another cause"))  # a new failure is logged at once
    assert caplog.records[-1].getMessage() == "delivery on outbox o.db failed; retrying"
