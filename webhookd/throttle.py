"""Log lines that requests cause, kept to a few a minute."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable


class Throttle:
    """A log line that requests cause, written at most ``burst`` times per ``period_s``: the
    ones held back are counted and told in one line when the period ends.

    Anyone who can reach the receiver can send a bad signature or a malformed request a
    thousand times a second. One line each would fill the disk, and journald (by default at
    most 10,000 lines per 30 s from a service) would then drop the daemon's other lines with
    them. The counts stay exact where they are kept (``/stats``, ``/metrics``).
    """

    __slots__ = (
        "_ends",
        "_held",
        "_passed",
        "_timer",
        "burst",
        "clock",
        "level",
        "logger",
        "period_s",
        "what",
    )

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        what: str,
        *,
        burst: int = 10,
        period_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.what = what  # names the held lines in the summary: "rejected webhooks"
        self.burst = burst
        self.period_s = period_s
        self.clock = clock
        self._ends = float("-inf")
        self._passed = 0
        self._held = 0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, msg: str, *args: object, exc_info: bool = False) -> None:
        now = self.clock()
        if now >= self._ends:
            self.flush()
            self._ends = now + self.period_s
            self._passed = 0
        if self._passed < self.burst:
            self._passed += 1
            self.logger.log(self.level, msg, *args, exc_info=exc_info)
            return
        self._held += 1
        if self._timer is None:
            # Told when the period ends even if no request comes after it; without a running
            # loop, at the next line after it.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(max(0.0, self._ends - now), self.flush)

    def flush(self) -> None:
        """Write the summary of the lines held back, if any (also at a drain's end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self.logger.log(
                self.level,
                "suppressed=%d more %s in the last %g s, not logged one by one",
                self._held,
                self.what,
                self.period_s,
            )
            self._held = 0
