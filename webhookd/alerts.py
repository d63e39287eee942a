"""Alerts: tell someone when jobs go dead or the backlog grows old, at most once per kind per
``[alerts] min_interval_s``, each alert summarising everything since the last of its kind.

An alert is an event of the reserved source ``webhookd`` with one forward job to ``[alerts]
url``, ingested through the journal like a webhook: durable, retried with the forward
defaults, dead-lettered like any job, and listed by ``webhookd events --source webhookd``.
Hazard: the alerts' own dead jobs and backlog are never alerted on, or an unreachable alert URL
would feed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from webhookd.actions.base import Outcome
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config import ALERT_ACTION, ALERT_SOURCE, AlertsConfig
from webhookd.errors import JournalError
from webhookd.journal import BaseJournal, Claimed, Finished, NewEvent, NewJob, Poisoned
from webhookd.models import Event, JobState, Priority, new_event_id, new_job_id

log = logging.getLogger("webhookd.alerts")

Kind = Literal["dead", "backlog"]
EVENTS_CAP = 20  # event ids in one alert; the text says how many more there were
_SOURCES_IN_TEXT = 5
# A backlog is looked at this often at most, so an alert comes within half the threshold of it
# being crossed, and a big journal is not scanned more than twice a minute.
BACKLOG_CHECK_MAX_S = 30.0
# After an alert could not be journaled (a full disk), wait this long before trying again.
INGEST_RETRY_S = 5.0


@dataclass
class _DeadSince:
    """Dead jobs since the last dead alert."""

    count: int = 0
    events: list[str] = field(default_factory=list)  # distinct, the first EVENTS_CAP of them
    more: int = 0  # dead jobs whose events did not fit in ``events``
    by_source: Counter[str] = field(default_factory=Counter)


class Alerter:
    """Watches finished jobs and the backlog; journals an alert event when one is due.

    ``observe`` is a worker pool ``on_finish`` hook; ``run`` is the long-lived task. ``tick``
    does whatever is due now, so tests drive it with a manual clock instead of waiting. With
    ``config`` ``None`` (no ``[alerts]``) it watches nothing until ``reconfigure`` gives it one.
    """

    def __init__(
        self, config: AlertsConfig | None, journal: BaseJournal, *, clock: Clock = SYSTEM_CLOCK
    ):
        self.config = config
        self.journal = journal
        self.clock = clock
        self._dead = _DeadSince()
        self._last_sent: dict[Kind, float] = {}  # monotonic time of each kind's last alert
        self._hold_until = 0.0  # after a failed ingest
        self._next_backlog_check = clock.monotonic()
        self._wake = asyncio.Event()

    def reconfigure(self, config: AlertsConfig | None) -> None:
        """Alert by ``config`` from now on (a reload's ``[alerts]``). Dead jobs not yet told
        are told by it, at its interval counted from the last alert; without ``[alerts]`` they
        are dropped, and dead jobs from then on are not counted."""
        if config == self.config:
            return
        if config is None or not config.on_dead:
            if self._dead.count:
                log.info(
                    "alerts: %d dead job(s) since the last alert will not be told:"
                    " dead-job alerts are off after the reload",
                    self._dead.count,
                )
            self._dead = _DeadSince()
        self.config = config
        self._next_backlog_check = self.clock.monotonic()  # a new threshold is looked at now
        self._wake.set()

    def observe(self, claimed: Claimed, outcome: Outcome, finished: Finished) -> None:
        """A job finished an attempt: count it if it went dead (and is not an alert's)."""
        if finished.state == JobState.DEAD:
            self._count_dead(claimed.event.source, claimed.event.id)

    def observe_poisoned(self, pills: Sequence[Poisoned]) -> None:
        """Jobs a recovery sent to dead (at start, or a silent node's): dead like any other."""
        for pill in pills:
            self._count_dead(pill.source, pill.event_id)

    def _count_dead(self, source: str, event_id: str) -> None:
        if self.config is None or not self.config.on_dead or source == ALERT_SOURCE:
            return
        dead = self._dead
        dead.count += 1
        dead.by_source[source] += 1
        if event_id not in dead.events:
            if len(dead.events) < EVENTS_CAP:
                dead.events.append(event_id)
            else:
                dead.more += 1
        self._wake.set()

    def _free_at(self, kind: Kind, config: AlertsConfig) -> float:
        """When an alert of ``kind`` may go out next (monotonic)."""
        last = self._last_sent.get(kind)
        free = self._hold_until
        if last is not None:
            free = max(free, last + config.min_interval_s)
        return free

    def next_due_s(self) -> float | None:
        """Seconds until ``tick`` has something to do; ``None`` when only a new dead job (or
        a reload) would."""
        config = self.config
        if config is None:
            return None
        due: list[float] = []
        if self._dead.count:
            due.append(self._free_at("dead", config))
        if config.backlog_age_s is not None:
            due.append(max(self._next_backlog_check, self._free_at("backlog", config)))
        if not due:
            return None
        return max(min(due) - self.clock.monotonic(), 0.0)

    async def tick(self) -> list[str]:
        """Journal each alert that is due now; returns the ids of the alert events made."""
        made: list[str] = []
        now = self.clock.monotonic()
        config = self.config  # what this tick began under, should a reload change it meanwhile
        if config is None:
            return made
        if self._dead.count and now >= self._free_at("dead", config):
            dead, self._dead = self._dead, _DeadSince()
            sent = await self._send(config, "dead", dead.count, dead.events, _dead_text(dead))
            if sent is None and self.config is not None and self.config.on_dead:
                self._dead = _merge(dead, self._dead)  # kept for the next try
            elif sent is not None:
                made.append(sent)
        age_s = config.backlog_age_s
        if (
            age_s is not None
            and now >= self._next_backlog_check
            and now >= self._free_at("backlog", config)
        ):
            self._next_backlog_check = now + min(age_s / 2, BACKLOG_CHECK_MAX_S)
            # The backlog is the cluster's: one node tells it, the one that leads (every node
            # telling it made one alert per node per interval). Dead jobs are each node's own.
            alert = await self._backlog(age_s) if self.journal.leads() else None
            if alert is not None:
                sent = await self._send(config, "backlog", *alert)
                if sent is not None:
                    made.append(sent)
        return made

    async def flush(self) -> list[str]:
        """Journal the dead jobs not yet told, whatever the interval: at shutdown, so the
        summary is not lost with this process (its job is sent by the next start)."""
        config = self.config
        if config is None or not self._dead.count:
            return []
        dead, self._dead = self._dead, _DeadSince()
        sent = await self._send(config, "dead", dead.count, dead.events, _dead_text(dead))
        return [] if sent is None else [sent]

    async def run(self) -> None:
        """Alert until cancelled: the daemon's long-lived task."""
        failing = False
        while True:
            delay_s = self.next_due_s()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that arrives as the event is set, and the daemon's stop would wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except (JournalError, sqlite3.Error, OSError) as exc:
                # The journal cannot be read now (a PostgreSQL outage, a disk error): the
                # backlog is looked at again at its next check. Left to end this task, it would
                # end the daemon, which rides such outages out everywhere else.
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "alerts: journal read failed, will try again: %s", exc)
                failing = True
            else:
                failing = False

    async def _backlog(self, age_s: float) -> tuple[int, list[str], str] | None:
        """(queued jobs, oldest events, text) when a queued job has been due for longer than
        ``age_s``, counting every source but the alerts' own; else ``None``. A job waiting out
        a retry's backoff is not due: one failing target is the dead alert's to tell, not a
        backlog every interval for the twelve hours of its retries."""
        lanes = [b for b in await self.journal.lane_backlog() if b.lane[1] != ALERT_SOURCE]
        oldest = min((b.oldest_due_at for b in lanes if b.oldest_due_at), default=None)
        waited_s = self.clock.time() - oldest if oldest is not None else 0.0
        if oldest is None or waited_s <= age_s:
            return None
        queued = sum(b.queued for b in lanes)
        by_source: Counter[str] = Counter()
        for b in lanes:
            by_source[b.lane[1]] += b.queued
        events = await self.journal.oldest_queued_event_ids(EVENTS_CAP, ALERT_SOURCE)
        # A paused source is named as such: on call, a pause reads otherwise as a stuck target.
        paused = await self.journal.paused_sources()
        text = (
            f"webhookd: {queued} job(s) queued, one due for {_duration(waited_s)}"
            f" ({_sources(by_source, paused)}); oldest events: {', '.join(events)}"
        )
        return queued, events, text

    async def _send(
        self, config: AlertsConfig, kind: Kind, count: int, events: list[str], text: str
    ) -> str | None:
        """Journal one alert; its id, or ``None`` if the journal could not take it (yet)."""
        (action,) = config.source.actions
        body: dict[str, Any] = {"text": text, "kind": kind, "count": count, "events": events}
        event_id = new_event_id()
        event = Event(
            id=event_id,
            source=ALERT_SOURCE,
            received_at=self.clock.time(),
            dedup_key=f"{ALERT_SOURCE}:{event_id}",  # every alert is new
            tenant="",
            # Ahead of everything else: a backlog alert must not wait behind the backlog.
            priority=Priority.HIGH,
            headers=(("Content-Type", "application/json"),),
            body=json.dumps(body).encode(),
        )
        job = NewJob(
            id=new_job_id(),
            action=ALERT_ACTION,
            type="forward",
            max_attempts=action.retry.max_attempts,
        )
        try:
            await self.journal.ingest(NewEvent(event, (job,)))
        except JournalError as exc:
            self._hold_until = self.clock.monotonic() + INGEST_RETRY_S
            log.error("alert kind=%s not journaled, will try again: %s", kind, exc)
            return None
        self._last_sent[kind] = self.clock.monotonic()
        log.warning("alert kind=%s count=%d event=%s text=%r", kind, count, event.id, text)
        return event.id


def _merge(old: _DeadSince, new: _DeadSince) -> _DeadSince:
    """``old`` (an alert that could not be journaled) followed by what came in meanwhile."""
    merged = _DeadSince(old.count + new.count, list(old.events), old.more + new.more)
    merged.by_source = old.by_source + new.by_source
    for event_id in new.events:
        if event_id in merged.events:
            continue
        if len(merged.events) < EVENTS_CAP:
            merged.events.append(event_id)
        else:
            merged.more += 1
    return merged


def _dead_text(dead: _DeadSince) -> str:
    more = f" and {dead.more} more" if dead.more else ""
    return (
        f"webhookd: {dead.count} job(s) went dead ({_sources(dead.by_source)}):"
        f" {', '.join(dead.events)}{more}"
    )


def _sources(counts: Counter[str], paused: Collection[str] = ()) -> str:
    """``shop: 4 paused, github: 1`` for the biggest few sources, ``…`` for the rest."""
    top = counts.most_common(_SOURCES_IN_TEXT)
    text = ", ".join(f"{name}: {n}{' paused' if name in paused else ''}" for name, n in top)
    return text + (", …" if len(counts) > _SOURCES_IN_TEXT else "")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
