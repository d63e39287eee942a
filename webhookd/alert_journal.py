"""The ``journal`` alert, the one alert not journaled: a journal that cannot write (a full disk,
a commit that does not end, a database down, a file moved away) cannot take it, so it is posted
directly by the alerts' own forward action, each attempt under its ``timeout_s`` and retried in
memory by its ``retry``, from a task of the alerts' own: intake never waits for it. The
``recovered`` alert that ends such an outage is journaled as the others (``Alerter``), and
keeps its record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from webhookd.actions.base import Action
from webhookd.alert_texts import cut, duration
from webhookd.attempts import backoff_s, run_attempt
from webhookd.clock import Clock
from webhookd.config.sections import ALERT_ACTION, ALERT_SOURCE, AlertsConfig
from webhookd.journal.records import Claimed
from webhookd.models import Event, Job, JobState, Priority, new_event_id, new_job_id

log = logging.getLogger("webhookd.alerts")

# The journal is looked at this often for a reason to refuse webhooks (as /readyz names it).
JOURNAL_CHECK_S = 1.0
# A journal outage ends once no reason has been seen for this long: a nearly full disk that
# takes a small commit between failing ones is one outage, not an alert and a recovery each.
JOURNAL_BACK_AFTER_S = 5.0
_REASON_IN_TEXT = 600  # a journal moved away, its copy failing, takes a few hundred characters

# Outages ended and not yet told recovered: seconds refused, webhooks refused, how many.
Back = tuple[float, int, int]


@dataclass
class Outage:
    """The journal refusing webhooks: since when, why, and the alert posted directly of it."""

    since: float  # wall clock of the first look that saw it
    reason: str  # as /readyz names it, the latest seen
    refused_before: int  # webhooks refused for a journal reason before it
    cleared_at: float | None = None  # monotonic: no reason seen since
    cleared_wall: float = 0.0  # the same, on the wall clock
    tries: int = 0  # attempts to post the journal alert
    next_try: float = 0.0  # monotonic
    told: bool = False  # the journal alert got through
    given_up: bool = False  # its attempts are used up

    def posts(self) -> bool:
        """Whether its alert is still to be posted."""
        return not (self.told or self.given_up or self.cleared_at is not None)


def add_back(a: Back | None, b: Back | None) -> Back | None:
    """Two spells of journal outage told as one: their seconds, refusals and count summed."""
    if a is None or b is None:
        return a or b
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


class JournalWatch:
    """Looks at the journal for a reason to refuse webhooks, posts the alert of an outage, and
    keeps the outages ended (``back``) for the next ``recovered`` alert.

    ``problems``: why the journal refuses webhooks now (``/readyz``' words); ``refused``: how
    many webhooks have been refused for a journal reason so far; ``sender``: the alerts' forward
    action to post with (the worker pool's), None while there is none."""

    def __init__(
        self,
        clock: Clock,
        problems: Callable[[], Awaitable[list[str]]],
        refused: Callable[[], int],
        sender: Callable[[], Action | None],
    ) -> None:
        self.clock = clock
        self._problems, self._refused, self._sender = problems, refused, sender
        self.outage: Outage | None = None
        self._refused_seen = 0  # at the last look that saw no outage
        self._next_check = clock.monotonic()
        self.back: Back | None = None
        self._last_sent: float | None = None  # monotonic

    def forget(self) -> None:
        """No ``[alerts]`` any more: nothing to tell."""
        self.outage, self.back = None, None

    def _free_at(self, config: AlertsConfig) -> float:
        """When a journal alert may go out next (monotonic): its interval alone, not the hold
        after a failed ingest (an outage's, which it is posted around)."""
        last = self._last_sent
        return -float("inf") if last is None else last + config.min_interval_s

    def due_s(self, config: AlertsConfig | None) -> float:
        """Seconds until ``watch`` has something to do: its next look, or the journal alert's
        next attempt."""
        due = self._next_check
        outage = self.outage
        if outage is not None and config is not None and outage.posts():
            due = min(due, max(outage.next_try, self._free_at(config)))
        return max(due - self.clock.monotonic(), 0.0)

    async def watch(self, config: AlertsConfig | None) -> bool:
        """Look at the journal (every ``JOURNAL_CHECK_S``): an outage begins at the first look
        that finds a reason to refuse webhooks, and ends once none has been found for
        ``JOURNAL_BACK_AFTER_S`` (then kept in ``back``: True); while it lasts, post its alert
        directly, until it is sent or its attempts are used up."""
        now = self.clock.monotonic()
        if config is None:
            self._next_check = now + JOURNAL_CHECK_S
            return False
        ended = False
        if now >= self._next_check:
            self._next_check = now + JOURNAL_CHECK_S
            problems = await self._problems()
            refused, outage = self._refused(), self.outage
            if problems:
                if outage is None:
                    outage = self.outage = Outage(self.clock.time(), "", self._refused_seen)
                outage.reason, outage.cleared_at = "; ".join(problems), None
            elif outage is None:
                self._refused_seen = refused
            elif outage.cleared_at is None:
                outage.cleared_at, outage.cleared_wall = now, self.clock.time()
            elif now - outage.cleared_at >= JOURNAL_BACK_AFTER_S:
                self.outage, self._refused_seen = None, refused
                back = (outage.cleared_wall - outage.since, refused - outage.refused_before, 1)
                self.back = add_back(self.back, back)
                ended = True
                log.info(
                    "alerts: the journal takes webhooks again after %s refusing them (%d"
                    " answered 503): told by the next recovered alert",
                    duration(back[0]),
                    back[1],
                )
        outage = self.outage
        if (
            outage is not None
            and outage.posts()
            and now >= max(outage.next_try, self._free_at(config))
        ):
            await self._post(config, outage)
        return ended

    async def _post(self, config: AlertsConfig, outage: Outage) -> None:
        """One attempt to post the journal alert with the alerts' own forward action (its
        URL, proxy, TLS and ``timeout_s``), not journaled: the journal cannot take it. A
        failure is tried again after the action's backoff, until its ``max_attempts``."""
        action = self._sender()
        if action is None:  # no alerts action (none built yet, or a reload took it away)
            outage.next_try = self.clock.monotonic() + JOURNAL_CHECK_S
            return
        (action_config,) = config.source.actions
        refused = self._refused() - outage.refused_before
        text = (
            f"webhookd: the journal refuses webhooks, each answered 503 ({refused} so far):"
            f" {cut(outage.reason, _REASON_IN_TEXT)}; this alert is not journaled, the"
            " recovered alert tells when it ends"
        )
        body = {"text": text, "kind": "journal", "count": refused, "events": []}
        wall = self.clock.time()
        event = Event(
            id=new_event_id(),
            source=ALERT_SOURCE,
            received_at=wall,
            dedup_key="",
            tenant="",
            priority=Priority.HIGH,
            headers=(("Content-Type", "application/json"),),
            body=json.dumps(body).encode(),
        )
        outage.tries += 1
        retry = action_config.retry
        job = Job(
            id=new_job_id(),
            event_id=event.id,
            action=ALERT_ACTION,
            type="forward",
            state=JobState.RUNNING,
            attempts=outage.tries,
            max_attempts=retry.max_attempts,
            run_at=wall,
        )
        outcome, _ = await run_attempt(action, action_config, Claimed(job, event, 0), {})
        now = self.clock.monotonic()
        if outcome.kind == "done":
            outage.told = True
            self._last_sent = now
            log.warning("alert kind=journal count=%d sent directly text=%r", refused, text)
            return
        if outcome.kind == "dead" or outage.tries >= retry.max_attempts:
            outage.given_up = True
            log.error(
                "alert kind=journal not sent after %d attempt(s), given up: %s",
                outage.tries,
                outcome.error,
            )
            return
        delay_s = backoff_s(retry, outage.tries)
        if outcome.after_s is not None:
            delay_s = max(delay_s, min(outcome.after_s, retry.cap_s))
        outage.next_try = now + delay_s
        level = logging.WARNING if outage.tries == 1 else logging.DEBUG
        log.log(
            level,
            "alert kind=journal not sent, will try again in %.0fs: %s",
            delay_s,
            outcome.error,
        )
