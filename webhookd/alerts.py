"""Alerts: tell someone when jobs go dead, an action keeps failing, the backlog grows old, or
the journal refuses webhooks, and when a failing action, an old backlog or the journal is well
again; at most once per kind per ``[alerts] min_interval_s``, each alert summarising everything
since the last of its kind.

An alert is an event of the reserved source ``webhookd`` with one forward job to ``[alerts]
url``, ingested through the journal like a webhook: durable, retried with the forward
defaults, dead-lettered like any job, and listed by ``webhookd events --source webhookd``.
Hazard: the alerts' own dead jobs and backlog are never alerted on, or an unreachable alert URL
would feed itself.

The one exception is the ``journal`` alert, posted directly (``alert_journal``): a journal that
cannot write cannot take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from webhookd.actions.base import Action, Outcome
from webhookd.alert_journal import JOURNAL_CHECK_S, Back, JournalWatch, add_back
from webhookd.alert_texts import SOURCES_IN_TEXT, cut, duration, sources
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config.sections import ALERT_ACTION, ALERT_SOURCE, AlertsConfig
from webhookd.errors import JournalError
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import Claimed, Finished, NewEvent, NewJob, Poisoned
from webhookd.models import Event, JobState, Priority, new_event_id, new_job_id

log = logging.getLogger("webhookd.alerts")

Kind = Literal["dead", "backlog", "failing", "recovered", "journal"]
EVENTS_CAP = 20  # event ids in one alert; the text says how many more there were
# A backlog is looked at this often at most, so an alert comes within half the threshold of it
# being crossed, and a big journal is not scanned more than twice a minute.
BACKLOG_CHECK_MAX_S = 30.0
# After an alert could not be journaled (a full disk), wait this long before trying again.
INGEST_RETRY_S = 5.0
# Actions followed for failing alerts at once (a catch-all's names count as one: its own).
MOST_FAILING = 256
# An action with no attempt for this long is no longer followed: nothing says it still fails.
FAILING_STALE_S = 86_400.0


@dataclass
class _Failing:
    """One action's attempts since its last success, all failed (``retry``, ``dead``, or a
    ``wait`` a lane did not plan: a 429, an exhausted quota)."""

    since: float  # wall clock of the first of them
    last_at: float  # and of the latest
    attempts: int = 0
    new: int = 0  # since it was last told
    last_error: str = ""
    told: bool = False  # a failing alert has named it

    def due(self, failing_s: float) -> bool:
        """Still failing ``failing_s`` after its first failure (an attempt then says so), and
        not told since its latest: an action nothing tries any more (no traffic, its source
        paused) is told once, not every interval as if it still failed."""
        return self.last_at - self.since >= failing_s and (not self.told or self.new > 0)


@dataclass
class _DeadSince:
    """Dead jobs since the last dead alert."""

    count: int = 0
    events: list[str] = field(default_factory=list)  # distinct, the first EVENTS_CAP of them
    more: int = 0  # dead jobs whose events did not fit in ``events``
    by_source: Counter[str] = field(default_factory=Counter)
    last_error: str = ""  # of the last of them, "source/action: error"


class Alerter:
    """Watches finished jobs, the backlog and the journal; journals an alert event when one is
    due (posts the journal alert itself).

    ``observe`` is a worker pool ``on_finish`` hook; ``run`` is the long-lived task. ``tick``
    does whatever is due now, and ``watch_journal`` what is due of the journal, so tests drive
    them with a manual clock instead of waiting. With
    ``config`` ``None`` (no ``[alerts]``) it watches nothing until ``reconfigure`` gives it one.
    """

    def __init__(
        self,
        config: AlertsConfig | None,
        journal: BaseJournal,
        *,
        clock: Clock = SYSTEM_CLOCK,
        counted_as: Callable[[str], str] | None = None,
        journal_problems: Callable[[], Awaitable[list[str]]] | None = None,
        refused: Callable[[], int] | None = None,
        sender: Callable[[], Action | None] | None = None,
    ):
        self.config = config
        # The journal, watched with ``journal_problems`` (``/readyz``' words), ``refused``
        # (webhooks refused for a journal reason so far) and ``sender`` (the alerts' forward
        # action, the worker pool's): without ``journal_problems`` it is not watched.
        self._journal_watch = (
            None
            if journal_problems is None
            else JournalWatch(
                clock, journal_problems, refused or (lambda: 0), sender or (lambda: None)
            )
        )
        # The daemon config's ``counted_as``: the names a catch-all took are followed as its
        # own ("*"). None: each name as it is.
        self._counted_as = counted_as
        self._full_said = False
        self.journal = journal
        self.clock = clock
        self._dead = _DeadSince()
        self._last_sent: dict[Kind, float] = {}  # monotonic time of each kind's last alert
        self._hold_until = 0.0  # after a failed ingest
        self._next_backlog_check = clock.monotonic()
        self._wake = asyncio.Event()
        self._failing: dict[tuple[str, str], _Failing] = {}
        # Told failing, then answering again: how long each failed. And a backlog told old.
        self._recovered: dict[tuple[str, str], float] = {}
        self._backlog_told = False
        self._backlog_cleared = False
        self._not_journaled = False  # the last alert could not be journaled

    async def restore(self, started_at: float) -> None:
        """Take up where the alerts of an earlier run on this journal left off: each kind's
        last alert, which ``min_interval_s`` counts from (a restart sent the same backlog
        alert twice in two seconds), and, on a journal one process holds, the dead jobs since
        the last dead alert that no alert told (a ``kill -9`` lost them with the process: a
        trial's 163 dead letters went untold). ``started_at``: this start's wall clock, before
        its recovery sent any poison pill to dead (those are told as they are counted). A
        cluster's nodes each tell the dead jobs they saw: there, only the intervals."""
        config = self.config
        if config is None:
            return
        wall, now = self.clock.time(), self.clock.monotonic()
        told_at: float | None = None  # the last dead alert's
        for kind in ("dead", "backlog", "failing", "recovered"):
            # Alerts are journaled as json.dumps makes them: '"kind": "dead"' is in the body.
            found = await self.journal.list_events(
                source=ALERT_SOURCE, limit=1, contains=f'"kind": "{kind}"'.encode()
            )
            if found:
                sent_at = found[0].received_at
                self._last_sent[kind] = now - max(wall - sent_at, 0.0)
                told_at = sent_at if kind == "dead" else told_at
        if not config.on_dead or self.journal.shares_lanes or told_at is None:
            return
        dead = await self.journal.dead_between(told_at, started_at, EVENTS_CAP, ALERT_SOURCE)
        untold = sum(dead.by_source.values())
        if not untold:
            return
        restored = _DeadSince(untold, by_source=Counter(dead.by_source))
        for event_id, source, action, error in dead.latest:
            if event_id not in restored.events:
                restored.events.append(event_id)
            restored.last_error = f"{source}/{action}: {error or ''}"
        restored.more = untold - len(dead.latest)
        self._dead = _merge(restored, self._dead)
        log.info(
            "alerts: %d job(s) went dead after the last dead alert, and the process that saw"
            " them stopped before telling: told by the next dead alert",
            untold,
        )
        self._wake.set()

    def reconfigure(
        self, config: AlertsConfig | None, counted_as: Callable[[str], str] | None = None
    ) -> None:
        """Alert by ``config`` from now on (a reload's ``[alerts]``, and its config's
        ``counted_as``). Dead jobs not yet told are told by it, at its interval counted from
        the last alert; without ``[alerts]`` they are dropped, and dead jobs from then on are
        not counted."""
        if counted_as is not None:
            self._counted_as = counted_as
        if config == self.config:
            return
        if config is None or not config.failing_s:
            self._failing.clear()
            self._recovered.clear()
        if config is None and self._journal_watch is not None:
            self._journal_watch.forget()
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
        """A job finished an attempt: count it if it went dead, and follow its action's run of
        failures (an alert's own jobs are never counted)."""
        source, action = claimed.event.source, claimed.job.action
        if finished.state == JobState.DEAD:
            self._count_dead(source, claimed.event.id, f"{source}/{action}: {finished.error}")
        config = self.config
        if config is None or not config.failing_s or source == ALERT_SOURCE:
            return
        if self._counted_as is not None:
            source = self._counted_as(source)  # a sender's name: one entry, not one per name
        key, now = (source, action), self.clock.time()
        if outcome.kind == "done":
            ended = self._failing.pop(key, None)
            if ended is not None and ended.told:
                self._recovered[key] = now - ended.since
                self._wake.set()
        elif outcome.kind != "wait" or not outcome.detail.get("paced"):
            # A wait the lane planned (its pace, a pause) is neither a failure nor a success.
            failing = self._failing.get(key)
            if failing is None:
                if len(self._failing) >= MOST_FAILING:
                    if not self._full_said:
                        log.warning(
                            "alerts: %d failing actions followed already; %s/%s is not",
                            MOST_FAILING,
                            *key,
                        )
                        self._full_said = True
                    return
                failing = self._failing[key] = _Failing(now, now)
            failing.attempts += 1
            failing.new += 1
            failing.last_at = now
            failing.last_error = finished.error or outcome.error or outcome.kind
            if failing.due(config.failing_s):
                self._wake.set()

    def observe_poisoned(self, pills: Sequence[Poisoned]) -> None:
        """Jobs a recovery sent to dead (at start, or a silent node's): dead like any other."""
        for pill in pills:
            self._count_dead(pill.source, pill.event_id, "")

    def _count_dead(self, source: str, event_id: str, error: str) -> None:
        if self.config is None or not self.config.on_dead or source == ALERT_SOURCE:
            return
        dead = self._dead
        dead.count += 1
        dead.by_source[source] += 1
        dead.last_error = error or dead.last_error
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
        if config.failing_s and any(f.due(config.failing_s) for f in self._failing.values()):
            due.append(self._free_at("failing", config))
        if self._recovered or self._backlog_cleared or self._journal_back():
            due.append(self._free_at("recovered", config))
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
                    self._backlog_told = True
            elif self._backlog_told:
                self._backlog_told, self._backlog_cleared = False, True
        if config.failing_s and now >= self._free_at("failing", config):
            wall = self.clock.time()
            for key in [k for k, f in self._failing.items() if wall - f.last_at > FAILING_STALE_S]:
                del self._failing[key]
            due = {k: f for k, f in self._failing.items() if f.due(config.failing_s)}
            if due:
                text = _failing_text(due, wall)
                # Told before the ingest is awaited: an action done meanwhile is told recovered
                # (``observe`` tells only those told failing). Undone if it is not journaled.
                was = {k: (f.told, f.new, self._recovered.get(k)) for k, f in due.items()}
                for failing in due.values():
                    failing.told, failing.new = True, 0
                sent = await self._send(config, "failing", len(due), [], text)
                if sent is not None:
                    made.append(sent)
                else:
                    self._untell(due, was)
        if (
            self._recovered or self._backlog_cleared or self._journal_back()
        ) and now >= self._free_at("recovered", config):
            # Taken before the ingest is awaited, as the dead jobs are: a recovery observed
            # meanwhile is kept for the next alert, not cleared with these.
            recovered, cleared = self._recovered, self._backlog_cleared
            watch = self._journal_watch
            journal_back = self._journal_back()
            self._recovered, self._backlog_cleared = {}, False
            if watch is not None:
                watch.back = None
            text = _recovered_text(recovered, cleared, config.backlog_age_s, journal_back)
            sent = await self._send(config, "recovered", len(recovered), [], text)
            if sent is not None:
                made.append(sent)
            else:  # kept for the next try, with what came meanwhile
                if self.config is not None and self.config.failing_s:
                    self._recovered = {**recovered, **self._recovered}
                self._backlog_cleared = self._backlog_cleared or cleared
                if watch is not None:
                    watch.back = add_back(journal_back, watch.back)
        return made

    def _journal_back(self) -> Back | None:
        """The journal's outages ended and not yet told recovered."""
        return None if self._journal_watch is None else self._journal_watch.back

    def journal_due_s(self) -> float:
        """Seconds until ``watch_journal`` has something to do."""
        watch = self._journal_watch
        return JOURNAL_CHECK_S if watch is None else watch.due_s(self.config)

    async def watch_journal(self) -> None:
        """Look at the journal and post its alert when due (``JournalWatch.watch``). Its own
        task's (``run``), so an alert's ingest that a stalled commit holds does not hold it
        too."""
        if self._journal_watch is not None and await self._journal_watch.watch(self.config):
            self._wake.set()  # an outage ended: the next recovered alert tells it

    def _untell(
        self,
        due: dict[tuple[str, str], _Failing],
        was: dict[tuple[str, str], tuple[bool, int, float | None]],
    ) -> None:
        """A failing alert was not journaled: its actions are as they were before it, with
        the attempts made meanwhile counted; one done meanwhile that no alert had told failing
        is not told recovered."""
        for key, failing in due.items():
            told, new, recovered_before = was[key]
            failing.told, failing.new = told, failing.new + new
            if not told and self._failing.get(key) is not failing and key in self._recovered:
                if recovered_before is None:
                    del self._recovered[key]
                else:
                    self._recovered[key] = recovered_before

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
        async with asyncio.TaskGroup() as tg:
            if self._journal_watch is not None:
                tg.create_task(self._watch_journal_loop(), name="alerts-journal")
            await self._alert_loop()

    async def _watch_journal_loop(self) -> None:
        said = False
        while True:
            try:
                await self.watch_journal()
            except (JournalError, sqlite3.Error, OSError) as exc:  # as the alert loop's
                level = logging.DEBUG if said else logging.WARNING
                log.log(level, "alerts: the journal's state could not be read: %s", exc)
                said = True
            else:
                said = False
            await asyncio.sleep(self.journal_due_s())

    async def _alert_loop(self) -> None:
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
            f"webhookd: {queued} job(s) queued, one due for {duration(waited_s)}"
            f" ({sources(by_source, paused)}); oldest events: {', '.join(events)}"
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
            # Said once per outage (tried again every INGEST_RETRY_S): the journal's own lines
            # and /readyz tell the outage itself.
            level = logging.DEBUG if self._not_journaled else logging.ERROR
            log.log(level, "alert kind=%s not journaled, will try again: %s", kind, exc)
            self._not_journaled = True
            return None
        if self._not_journaled:
            log.info("alerts are journaled again")
            self._not_journaled = False
        self._last_sent[kind] = self.clock.monotonic()
        # A recovery is good news: at info, so a reader of warnings and worse (journalctl -p
        # warning) sees what went wrong, not also each time it mended.
        level = logging.INFO if kind == "recovered" else logging.WARNING
        log.log(level, "alert kind=%s count=%d event=%s text=%r", kind, count, event.id, text)
        return event.id


def _merge(old: _DeadSince, new: _DeadSince) -> _DeadSince:
    """``old`` (an alert that could not be journaled) followed by what came in meanwhile."""
    merged = _DeadSince(old.count + new.count, list(old.events), old.more + new.more)
    merged.by_source = old.by_source + new.by_source
    merged.last_error = new.last_error or old.last_error
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
    last = f"; last error: {cut(dead.last_error)}" if dead.last_error else ""
    return (
        f"webhookd: {dead.count} job(s) went dead ({sources(dead.by_source)}):"
        f" {', '.join(dead.events)}{more}{last}; `webhookd replay --dead` runs them again"
    )


def _failing_text(due: dict[tuple[str, str], _Failing], wall: float) -> str:
    """``shop/deliver failing for 12m (31 attempts, none done; last: ...)``, longest first."""
    longest = sorted(due.items(), key=lambda item: item[1].since)
    parts = [
        f"{source}/{action} failing for {duration(wall - f.since)} ({f.attempts} attempt(s),"
        f" none done; last: {cut(f.last_error)})"
        for (source, action), f in longest[:SOURCES_IN_TEXT]
    ]
    more = f"; and {len(due) - SOURCES_IN_TEXT} more" if len(due) > SOURCES_IN_TEXT else ""
    return f"webhookd: {'; '.join(parts)}{more}"


def _recovered_text(
    recovered: dict[tuple[str, str], float],
    cleared: bool,
    age_s: float | None,
    journal_back: Back | None = None,
) -> str:
    """What is well again: the journal, with how long it refused webhooks and how many; each
    action told failing, with how long it failed; the backlog."""
    parts = []
    if journal_back is not None:
        refused_s, refused, spells = journal_back
        over = f" over {spells} spells" if spells > 1 else ""
        parts.append(
            f"the journal takes webhooks again after {duration(refused_s)} refusing them{over}"
            f" ({refused} answered 503)"
        )
    parts += [
        f"{source}/{action} done again after {duration(failed_s)} failing"
        for (source, action), failed_s in list(recovered.items())[:SOURCES_IN_TEXT]
    ]
    if len(recovered) > SOURCES_IN_TEXT:
        parts.append("…")
    if cleared and age_s is not None:
        parts.append(f"no queued job due longer than {duration(age_s)} any more")
    return f"webhookd: recovered: {'; '.join(parts)}"
