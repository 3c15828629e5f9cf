"""A failure that repeats, logged so the journal stays readable.

A worker loop that retries a failing step (a full disk, a database that refuses writes) would log the same
traceback every round. ``Repeats`` logs a failure in full the first time it is seen, then one line every
``every_s`` while it repeats, and says once when the step works again.
"""

from __future__ import annotations

import logging
import time


class Repeats:
    """Logging for one retried step; call ``failed`` on each failure and ``worked`` on each success."""

    def __init__(self, log: logging.Logger, what: str, every_s: float = 30.0) -> None:
        self.log, self.what, self.every_s = log, what, every_s
        self.failing = False  # the last attempt failed
        self._last = ""  # the failure last logged: a new one is logged in full at once
        self._logged = 0.0
        self._worked_logged = float("-inf")

    def failed(self, exc: BaseException, context: str = "") -> None:
        now, text = time.monotonic(), f"{type(exc).__name__}: {exc}"
        self.failing = True
        suffix = f" ({context})" if context else ""
        if text != self._last:
            self.log.error("%s failed%s; retrying", self.what, suffix, exc_info=exc)
        elif now - self._logged >= self.every_s:
            self.log.error("%s still failing%s: %s", self.what, suffix, text)
        else:
            return
        self._last, self._logged = text, now

    def worked(self) -> None:
        """The step worked: said once (at most once every ``every_s``, for a step that keeps flapping). The
        failure's text is kept: the same failure coming back is not logged in full again."""
        if not self.failing:
            return
        self.failing = False
        now = time.monotonic()
        if now - self._worked_logged >= self.every_s:
            self.log.info("%s works again", self.what)
            self._worked_logged = now
