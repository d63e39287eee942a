"""Each finished attempt's log line: ``job=… outcome=…``, at the level its outcome calls for.

A job done (or waiting for its lane's pace) is told at info with ``log.jobs = "all"``, else at
debug; a retry or a wait at warning, ten lines a minute per action (a target down fails every
attempt of every webhook, one line each, and journald would drop the dead letters' with them);
a dead letter always.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from webhookd.actions.base import Outcome
from webhookd.clock import Clock
from webhookd.config.sections import Config
from webhookd.journal.records import Claimed, Finished
from webhookd.models import JobState
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.workers")

# Actions whose retry and wait lines are throttled each on their own (``_failure_line``).
_MOST_FAILURE_LINES = 256


class JobLines:
    """The outcome lines of a worker pool's jobs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._failure_lines: dict[tuple[str, str], Throttle] = {}

    def tell(self, config: Config, claimed: Claimed, outcome: Outcome, finished: Finished) -> None:
        """Log one attempt's outcome (``finished``) under ``config``, the pool's now."""
        job, event = claimed.job, claimed.event
        # A job that waits for its lane's pace is the lane doing its work, not a problem.
        paced = finished.outcome == "wait" and outcome.detail.get("paced")
        level = logging.WARNING
        if finished.outcome == "done" or paced:
            level = logging.INFO if config.log.jobs == "all" else logging.DEBUG
        say: Callable[..., None] = functools.partial(log.log, level)
        if level == logging.WARNING and finished.state == JobState.QUEUED:
            say = self._failure_line(config, event.source, job.action)  # dead ones always go
        # A retry or a wait says when the job runs next (``show`` says it as a time).
        say(
            "job=%s event=%s source=%s action=%s attempt=%d outcome=%s%s%s",
            job.id,
            event.id,
            event.source,
            job.action,
            job.attempts,
            finished.outcome,
            f" next_in_s={max(finished.run_at - finished.finished_at, 0):.1f}"
            if finished.state == JobState.QUEUED and finished.run_at is not None
            else "",
            f" error={finished.error!r}" if finished.error else "",
        )

    def flush(self) -> None:
        """Say the counts held back (before the process ends)."""
        for throttle in self._failure_lines.values():
            throttle.flush()

    def _failure_line(self, config: Config, source: str, action: str) -> Throttle:
        """The throttle of one action's retry and wait lines: the names a catch-all took share
        its action's (a sender chooses them), and past ``_MOST_FAILURE_LINES`` (the names a
        removed catch-all left) all share one."""
        source = config.counted_as(source)
        key = (source, action)
        throttle = self._failure_lines.get(key)
        if throttle is None:
            if len(self._failure_lines) >= _MOST_FAILURE_LINES:
                key = ("*", "*")
                throttle = self._failure_lines.get(key)
            if throttle is None:
                what = "job lines" if key == ("*", "*") else f"job lines of {source}/{action}"
                throttle = Throttle(log, logging.WARNING, what, clock=self.clock.monotonic)
                self._failure_lines[key] = throttle
        return throttle
