"""The ``/stats`` document (also what ``webhookd stats`` prints while the daemon runs) and what
it reads: ``AdminContext``, the running daemon as the admin API sees it, and ``Throughput``,
its rates over the last minute. The admin API serves it; the heartbeat line reads the same."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from webhookd.config.sections import CATCH_ALL, Config
from webhookd.errors import JournalError
from webhookd.journal.base import BaseJournal
from webhookd.journal.polled import PolledCounts
from webhookd.journal.records import Counts, EventSummary, LaneBacklog
from webhookd.models import Priority
from webhookd.redact import Masker
from webhookd.retention import kept_s
from webhookd.state import IntakeState
from webhookd.workers import WorkerPool


@dataclass
class AdminContext:
    config: Config
    journal: BaseJournal
    pool: WorkerPool
    intake: IntakeState
    boot_id: str
    started_at: float
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
    lanes: Mapping[str, Any] = field(default_factory=dict)
    throughput: Throughput | None = None
    dashboard: bool = True
    # Shared with /metrics by the daemon, so the dashboard and a scraper count once between them.
    counts: PolledCounts | None = None
    # Why the last reload (SIGHUP) was refused, while the previous config still runs; None
    # once one is applied. /readyz stays 200 meanwhile: the running config is whole.
    reload_refused: str | None = None
    # The keys a reload read but cannot change in place (server.listen, ...): what the file
    # says and the daemon runs differ until a restart.
    restart_pending: tuple[str, ...] = ()
    started_mono: float = field(init=False)  # the start on the monotonic clock: the uptime's

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = PolledCounts(self.journal, lambda: self.config.sources)
        clock = self.pool.clock
        self.started_mono = clock.monotonic() - (clock.time() - self.started_at)

    @property
    def masker(self) -> Masker:
        """The worker pool's: the running config's secrets, and those of the configs attempts
        still running began on (a secret a reload rotated out, until they end)."""
        return self.pool.masker

    def reconfigure(self, config: Config, secrets: Collection[str] | None = None) -> None:
        """A reload's config (``secrets``: its ``secret_values``, if read already: the pool
        has taken them, and ``masker`` is its)."""
        self.config = config


_FINISHED = frozenset({"done", "dead", "cancelled"})  # the outcomes that end a job


class Throughput:
    """Webhooks accepted (new events), duplicates answered and jobs finished (done, dead or
    cancelled) per second over about the last minute.

    Accepted webhooks are the receiver's count of new events journaled (``intake.accepted``),
    not its 2xx answers: a provider's handshake (Meta's ``hub.challenge``, Slack's
    ``url_verification``) is answered 200 and journals nothing, and a sender retrying one
    delivery in a loop is answered 200 each time, counted apart in ``intake.duplicates``.

    ``run()`` records a sample every second, as does a ``rates()`` call (one a second at most);
    ``rates()`` measures against the newest sample at least ``window_s`` old (the start, before
    there is one) and says the span in its ``window_s``. Taken only when asked, samples were
    as far apart as the asking: the heartbeat's 30 s stretched the window to 90 s, and a
    ``Throughput`` no one polled measured against the start however long ago that was.
    """

    def __init__(
        self, pool: WorkerPool, intake: IntakeState | None = None, window_s: float = 60.0
    ) -> None:
        self.pool = pool
        self.intake = intake if intake is not None else IntakeState()
        self.window_s = window_s
        now = pool.clock.monotonic()
        again = sum(self.intake.duplicates.values())
        self._samples: deque[tuple[float, int, int, int]] = deque(
            [(now, self.intake.accepted, again, 0)], maxlen=4096
        )

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Sample every sixtieth of the window (a second), until cancelled."""
        while True:
            await sleep(self.window_s / 60)
            self.rates()  # for its sample

    def rates(self) -> dict[str, float]:
        now = self.pool.clock.monotonic()
        # Jobs that left the queue: a retry (a target answering 500 over and over) and a wait
        # (a lane pacing its calls, a 429) put a job back, and counted as finished, they read
        # as progress where there was none.
        finished = sum(n for outcome, n in self.pool.outcomes.items() if outcome in _FINISHED)
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        accepted = self.intake.accepted
        again = sum(self.intake.duplicates.values())
        then, accepted0, again0, finished0 = self._samples[0]
        # One sample a second at most: a client polling faster would otherwise fill the
        # deque and shorten the window it measures over.
        if now - self._samples[-1][0] >= self.window_s / 60:
            self._samples.append((now, accepted, again, finished))
        span = max(now - then, 1e-9)
        return {
            "window_s": round(span, 1),
            "accepted_per_s": round((accepted - accepted0) / span, 2),
            "duplicates_per_s": round((again - again0) / span, 2),
            "finished_per_s": round((finished - finished0) / span, 2),
        }


def summary_dict(row: EventSummary) -> dict[str, Any]:
    return {**asdict(row), "tenant": row.tenant or None}


async def readiness_problems(ctx: AdminContext) -> list[str]:
    """Why the daemon is not ready for webhooks now (``/readyz``' 503, ``/stats``' ``problems``),
    ``[]`` when it is: a drain, and ``journal_problems``."""
    problems = ["draining"] if ctx.intake.draining else []
    return problems + await journal_problems(ctx.journal, ctx.config.server.ack_timeout_s)


def journal_problems_now(journal: BaseJournal, ack_timeout_s: float) -> list[str]:
    """Why the journal refuses webhooks, as last seen, in ``/readyz``' words (``[]`` when it
    takes them): a commit past ``ack_timeout_s``, a stopped writer (a journal moved or removed
    says so there), the last write's failure (a full disk, a database down)."""
    problems = []
    late_s = journal.writing_for_s()
    if late_s > ack_timeout_s:
        problems.append(
            f"journal: a commit has taken {late_s:.1f} s, past server.ack_timeout_s:"
            " webhooks are answered 503"
        )
    if journal.writer_problem:
        problems.append(journal.writer_problem)
    elif journal.last_write_error:
        problems.append(f"journal: {journal.last_write_error}")
    return problems


async def journal_problems(journal: BaseJournal, ack_timeout_s: float) -> list[str]:
    """``journal_problems_now``, once a journal that refused writes (a full disk) has been
    tried with a write that leaves nothing behind, so space that returned is seen without a
    webhook; not behind a stalled commit, which the probe would wait for (and the dashboard's
    poll with it) to say what is said already."""
    if (
        journal.last_write_error
        and not journal.writer_problem
        and journal.writing_for_s() <= ack_timeout_s
    ):
        with contextlib.suppress(JournalError):  # still failing: the error says why
            await journal.probe_write()
    return journal_problems_now(journal, ack_timeout_s)


async def collect_stats(ctx: AdminContext) -> dict[str, Any]:
    """The ``/stats`` document (also what ``webhookd stats`` prints when the daemon runs)."""
    assert ctx.counts is not None  # set by __post_init__
    counts, counts_age_s = await ctx.counts.get()
    backlog, backlog_age_s = await ctx.counts.lane_backlog()
    pool = ctx.pool.statistics()
    now = ctx.pool.clock.time()
    oldest = counts.oldest_due_at
    sources = counts.sources_shown(ctx.config.sources)
    paused = sorted(await ctx.journal.paused_sources())
    return {
        "boot_id": ctx.boot_id,
        "journal_id": await ctx.journal.identity(),
        # Not by the wall clock: a step of it made a negative uptime.
        "uptime_s": round(ctx.pool.clock.monotonic() - ctx.started_mono, 3),
        "draining": ctx.intake.draining,
        # What /readyz answers 503 for, [] when ready: a full disk or a stalled commit, while
        # every webhook is answered 503, is told where a human looks, not to a balancer alone.
        "problems": await readiness_problems(ctx),
        "jobs": dict(counts.jobs_by_state),
        "sources": sources,
        # Names above (or paused) that a reload took out of the config: the dashboard offers
        # no Pause or Replay for them (a removed source's jobs go dead at their turn).
        "removed": sorted(
            name
            for name in {*sources, *paused}
            if name != CATCH_ALL and ctx.config.source_for(name) is None
        ),
        "events": counts.events,
        "backlog": ctx.journal.backlog_jobs,
        "oldest_queued_age_s": round(now - oldest, 3) if oldest is not None else None,
        # How old "jobs", "sources", "events", the oldest queued job and the scheduler's
        # "queued" are: 0 on a small journal, up to 50 times a count's cost on a large one.
        "counts_age_s": round(max(counts_age_s, backlog_age_s), 3),
        "workers": {
            "concurrency": pool.concurrency,
            "busy": pool.busy,
            "claiming": pool.claiming,
            "window": pool.window,
            "started": pool.started,
            "outcomes": dict(pool.outcomes),
            "holding": pool.holding,
            # Actions running one job at a time on this node, their last attempts having ended
            # by their timeout_s (workers.slow_after_timeouts), as webhookd_action_slow shows.
            "slow": [{"source": s, "action": a} for s, a in sorted(ctx.pool.slow)],
        },
        "scheduler": _scheduler_stats(ctx, backlog, now),
        "intake": {
            "verify_failures": ctx.intake.verify_failures,
            "waiting": ctx.intake.waiting,
        },
        "throughput": ctx.throughput.rates() if ctx.throughput is not None else None,
        "paused": paused,
        # A SQLite journal's files ({"db", "wal"}, bytes); PostgreSQL's tables ({"tables"}).
        "journal_bytes": await ctx.journal.sizes(),
        # How far back the journal holds every event: its done counts, and any window read
        # from it that is longer (``webhookd stats``' last 5 minutes and hour), cover only that.
        "retention_keeps_s": kept_s(ctx.config.journal),
        "cluster": await cluster_stats(ctx.journal, counts, now),
        "lanes": {name: _lane_dict(lane) for name, lane in sorted(ctx.lanes.items())},
        "reload_refused": ctx.reload_refused,
        "restart_pending": list(ctx.restart_pending),
    }


async def cluster_stats(journal: BaseJournal, counts: Counts, now: float) -> dict[str, Any]:
    """The nodes working on the journal and its backlog as the database counts it (``backlog``
    above is this process's running tally, which other nodes' intake and work do not move)."""
    queued = counts.jobs_by_state.get("queued", 0)
    running = counts.jobs_by_state.get("running", 0)
    return {
        "backlog": queued + running,
        "queued": queued,
        "running": running,
        "nodes": [node.summary(now) for node in await journal.nodes()],
    }


def _lane_dict(lane: Any) -> dict[str, Any]:
    stats = lane.statistics()
    doc: dict[str, Any] = asdict(stats)
    doc.pop("name", None)
    return doc


_MAX_TENANTS_SHOWN = 50  # per class, the biggest lanes first


def _scheduler_stats(
    ctx: AdminContext, lane_backlog: Sequence[LaneBacklog], now: float
) -> list[dict[str, Any]]:
    """Per priority class, and per tenant within it: queued (the journal), running and in the
    window (this process), and the age of the oldest queued event."""
    backlog = {b.lane: b for b in lane_backlog}
    running = ctx.pool.running_by_lane()
    window = ctx.pool.scheduler.lanes()
    lanes = sorted(
        set(backlog) | set(running) | set(window),
        key=lambda lane: -(backlog[lane].queued if lane in backlog else 0),
    )

    def age(due_at: float | None) -> float | None:
        return round(now - due_at, 3) if due_at is not None else None

    classes = []
    for priority in Priority:
        mine = [lane for lane in lanes if lane[0] == priority]
        queued = [backlog[lane].queued if lane in backlog else 0 for lane in mine]
        oldest = [backlog[lane].oldest_due_at if lane in backlog else None for lane in mine]
        rows = [
            {
                "source": lane[1],
                "tenant": lane[2] or None,
                "queued": q,
                "running": running.get(lane, 0),
                "window": window.get(lane, 0),
                "oldest_age_s": age(o),
            }
            for lane, q, o in zip(mine, queued, oldest, strict=True)
        ]
        classes.append(
            {
                "priority": priority.label,
                "weight": ctx.pool.scheduler.weights[priority],
                "queued": sum(queued),
                "running": sum(running.get(lane, 0) for lane in mine),
                "window": sum(window.get(lane, 0) for lane in mine),
                "oldest_age_s": age(min((o for o in oldest if o is not None), default=None)),
                "tenants": rows[:_MAX_TENANTS_SHOWN],
                "tenants_total": len(rows),
            }
        )
    return classes
