"""Reads for what polls the journal (the admin API, the dashboard, ``/metrics``): each answers
within a deadline or is refused, and the counts are shared between pollers and kept while
reading them again would cost more than they are worth."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
)
from typing import Any, Generic, TypeVar

from webhookd.clock import Clock
from webhookd.errors import JournalUnavailable
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import (
    Counts,
    LaneBacklog,
    Series,
)

_T = TypeVar("_T")

# How long the admin API's reads (/stats, /events, /metrics' counts) may wait for the journal:
# under Prometheus' default 10 s scrape timeout, so that a hung database shows as
# webhookd_journal_up 0 instead of a failed scrape.
ADMIN_READ_S = 5.0


# Reads answer_within gave up on that still wait for the journal: past this many, it refuses
# new ones at once. A dashboard polling every 2 s would otherwise pile one up every 5 s on a
# slow database, each holding a connection of the pool (10) that the heartbeat and the
# writer need.
MAX_ABANDONED_READS = 4
# Per event loop: one daemon's (a test's loop ends with its daemon, and its reads with it).
_abandoned: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)


async def answer_within(aw: Awaitable[_T], seconds: float) -> _T:
    """``aw``'s answer, or ``JournalUnavailable`` once ``seconds`` have passed without one.

    For what polls the journal (the admin API, ``/metrics``): a database that keeps its
    connections open and stops answering would hold each read for the pool's minute. The read
    is not cancelled, as cancelling a query on a hung server waits just as long: it ends by
    itself within that minute, and its answer or its error is dropped. While
    ``MAX_ABANDONED_READS`` of those still wait, a new read is refused without being made."""
    abandoned = _abandoned.setdefault(asyncio.get_running_loop(), set())
    if len(abandoned) >= MAX_ABANDONED_READS:
        close = getattr(aw, "close", None)
        if close is not None:
            close()  # a coroutine never started: no "never awaited" warning
        raise JournalUnavailable(
            f"no answer from the journal in {seconds:g} s to {len(abandoned)} earlier reads"
        )
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        if not task.done():
            abandoned.add(task)
            task.add_done_callback(functools.partial(_dropped, abandoned))
    if task not in done:
        raise JournalUnavailable(f"no answer from the journal in {seconds:g} s")
    return task.result()


def _dropped(abandoned: set[asyncio.Future[Any]], task: asyncio.Future[Any]) -> None:
    abandoned.discard(task)
    let_go(task)


def let_go(task: asyncio.Future[Any]) -> None:
    """A done callback for a task no one waits for any more: its error is read, so that asyncio
    does not log it at exit as never retrieved, with its traceback."""
    if not task.cancelled():
        task.exception()


class PolledCounts:
    """The journal's counts for what polls them: ``/stats``, the dashboard (every 2 s) and
    ``/metrics``: ``counts()``, ``lane_backlog()`` and ``series()``.

    Each reads every row it counts: ``counts()`` ~0.75 s of CPU for a million finished jobs in
    SQLite, ``lane_backlog()`` ~0.1-0.2 s for 500,000 queued ones, ``series()`` ~60 ms for an
    hour of 50,000 events, which a dashboard left open would pay at every poll. Once a read
    has seen ``cache_from_rows`` rows or more, its answer is reused for ``1 / BUDGET`` times as
    long as it took, so counting takes at most about 2 % of the time however large the
    journal grows; a smaller journal is read afresh for every caller, so what it shows is
    always current. Callers arriving while a read runs wait for it and get its answer when it
    may be reused. Each says how old its answer is.

    ``keep``: the source names ``counts()`` reads one by one whatever their jobs (the configured
    ones, read at each count so that a reload's are in the next).
    """

    BUDGET = 0.02
    CACHE_FROM_ROWS = 10_000  # a count of this many costs ~2-5 ms here
    SERIES_KEPT = 16  # the series windows (minutes, source) remembered, the latest asked

    def __init__(
        self,
        journal: BaseJournal,
        keep: Callable[[], Collection[str]] = tuple,
        cache_from_rows: int = CACHE_FROM_ROWS,
    ) -> None:
        self._counts = _Reused(
            lambda: journal.counts(keep()),
            lambda c: c.events + sum(c.jobs_by_state.values()),
            journal.clock,
            cache_from_rows,
            self.BUDGET,
        )
        self._lanes = _Reused(
            journal.lane_backlog,
            lambda lanes: sum(b.queued for b in lanes),
            journal.clock,
            cache_from_rows,
            self.BUDGET,
        )
        self._journal, self._cache_from_rows = journal, cache_from_rows
        self._series: dict[tuple[int, str | None], _Reused[Series]] = {}

    async def get(self) -> tuple[Counts, float]:
        """``counts()`` and its age in seconds (0.0 when counted for this call)."""
        return await self._counts.get()

    async def lane_backlog(self) -> tuple[list[LaneBacklog], float]:
        """``lane_backlog()`` and its age in seconds (0.0 when read for this call)."""
        return await self._lanes.get()

    async def series(self, minutes: int, source: str | None = None) -> tuple[Series, float]:
        """``series()`` of the ``minutes`` ending now, and its age in seconds."""
        key = (minutes, source)
        reused = self._series.pop(key, None)
        if reused is None:
            journal = self._journal
            reused = _Reused(
                lambda: journal.series(now=journal.clock.time(), minutes=minutes, source=source),
                lambda s: sum(s.accepted) + sum(s.finished) + sum(s.dead) + s.backlog[-1],
                journal.clock,
                self._cache_from_rows,
                self.BUDGET,
            )
        self._series[key] = reused  # the latest asked last, so the oldest goes first
        while len(self._series) > self.SERIES_KEPT:
            del self._series[next(iter(self._series))]
        return await reused.get()


class _Reused(Generic[_T]):
    """One read for ``PolledCounts``: ``size`` tells how many rows an answer counted."""

    def __init__(
        self,
        read: Callable[[], Awaitable[_T]],
        size: Callable[[_T], int],
        clock: Clock,
        cache_from_rows: int,
        budget: float,
    ) -> None:
        self.read, self.size, self.clock = read, size, clock
        self.cache_from_rows, self.budget = cache_from_rows, budget
        self._lock = asyncio.Lock()
        self._answer: tuple[_T] | None = None
        self._read_at = 0.0
        self._fresh_until = 0.0

    async def get(self) -> tuple[_T, float]:
        async with self._lock:
            now = self.clock.monotonic()
            if self._answer is not None and now < self._fresh_until:
                return self._answer[0], now - self._read_at
            answer = await self.read()
            self._answer = (answer,)
            self._read_at = self.clock.monotonic()
            if self.size(answer) >= self.cache_from_rows:
                self._fresh_until = self._read_at + (self._read_at - now) / self.budget
            return answer, 0.0
