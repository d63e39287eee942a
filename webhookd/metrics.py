"""Prometheus metrics: counters fed by the receiver's and the pool's hooks, gauges read at scrape.

The one module that imports ``prometheus_client``. Each daemon gets its own
``CollectorRegistry`` (never the process-global one), so several daemons can run in one
process, as they do in the tests. Counters and histograms are updated synchronously from the
``IntakeState.observers`` and ``WorkerPool.on_finish`` hooks (a dict lookup and an add: cheap
enough for the ack path). Gauges that describe the journal, the pool and the lanes are read when
``/metrics`` is scraped, so nothing polls in the background.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from webhookd import __version__
from webhookd.actions.base import Outcome
from webhookd.config.sections import CATCH_ALL, Config
from webhookd.errors import JournalError
from webhookd.journal.base import BaseJournal
from webhookd.journal.polled import ADMIN_READ_S, PolledCounts, answer_within
from webhookd.journal.records import Claimed, Counts, Finished, NodeInfo, Poisoned
from webhookd.state import UNAVAILABLE, IntakeState
from webhookd.workers import WorkerPool

ACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Up to the longest default timeout_s (command and python: 300 s; openai: 120 s).
ATTEMPT_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_NO_SOURCE = "(none)"  # the label of requests that matched no source (404s)


class Metrics:
    """The metrics of one daemon. ``attach`` subscribes it; ``render`` answers a scrape."""

    def __init__(
        self,
        journal: BaseJournal,
        pool: WorkerPool,
        lanes: Callable[[], Mapping[str, Any]] = dict,
        counts: PolledCounts | None = None,
    ) -> None:
        self.journal = journal
        self.pool = pool
        # Counted one by one: every source configured since the start (the labels).
        self.counts = counts or PolledCounts(journal, lambda: self._sources)
        # Series are labelled by configured source only: everything the catch-all took counts
        # as "*" (the receiver reports it so), or each junk path would be a series forever.
        self._sources: frozenset[str] = frozenset()
        self._catch_all = False
        self._intake_children: dict[tuple[str, int], Any] = {}
        self._finish_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # Counted on the ack path since the last scrape (see ``observe_intake``); the ack
        # histogram's per bucket, with one more for +Inf.
        self._intake_pending: dict[tuple[str, int], int] = {}
        self._ack_pending = [0] * (len(ACK_BUCKETS_S) + 1)
        self._ack_pending_sum_s = 0.0
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.intake = Counter(
            "webhookd_intake_requests",
            "Webhook requests answered by the receiver, by source and HTTP status.",
            ["source", "status"],
            registry=r,
        )
        self.ack = Histogram(
            "webhookd_ack_seconds",
            "Time from a webhook's arrival to its 2xx answer (after the durable commit).",
            buckets=ACK_BUCKETS_S,
            registry=r,
        )
        # Observed once per group commit (not per webhook), after its webhooks have their answers.
        self.commit = Histogram(
            "webhookd_journal_commit_seconds",
            "Time each durable group commit took, from its transaction's start to its synced"
            " COMMIT: the disk's (or the database's) share of an ack.",
            buckets=ACK_BUCKETS_S,
            registry=r,
        )
        self.attempts = Counter(
            "webhookd_job_attempts",
            "Finished job attempts by source, action and outcome (done, retry, dead, wait, and"
            " cancelled: an attempt that would have been retried, of a job cancelled meanwhile).",
            ["source", "action", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "webhookd_attempt_duration_seconds",
            "How long one attempt of an action took.",
            ["source", "action"],
            buckets=ATTEMPT_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter(
            "webhookd_job_retries",
            "Attempts that failed and were scheduled to run again.",
            ["source", "action"],
            registry=r,
        )
        self.dead = Counter(
            "webhookd_dead_letters",
            "Jobs that went to the dead-letter queue.",
            ["source", "action"],
            registry=r,
        )
        # Reloads (SIGHUP): alert on a 0, as a config on disk that the daemon refused.
        self.reload_ok = Gauge(
            "webhookd_config_last_reload_successful",
            "1 if the last config reload (SIGHUP) was applied, 0 if it was refused.",
            registry=r,
        )
        self.reload_ok.set(1)
        self.reload_at = Gauge(
            "webhookd_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully (at start, or by a reload).",
            registry=r,
        )
        self.reload_at.set(pool.clock.time())
        self.restart_pending = Gauge(
            "webhookd_config_restart_pending_keys",
            "Keys of the config file a reload could not apply in place (server.listen, ...):"
            " they take effect at the next restart. 0 when the file and the daemon agree.",
            registry=r,
        )
        # What an alert on a backlog nearing its limit, or on restarts, needs: the limit (a
        # restart-only key), the version, and the process's start time, memory and open
        # descriptors (process_*, from /proc; none where there is no /proc).
        Gauge(
            "webhookd_backlog_max_jobs",
            "server.max_backlog: past this many jobs queued or running, webhooks get 503.",
            registry=r,
        ).set(pool.config.server.max_backlog)
        Info("webhookd_build", "This webhookd's version.", registry=r).info(
            {"version": __version__}
        )
        ProcessCollector(registry=r)
        self.configure(pool.config)
        self._state = _StateCollector(journal, pool, lanes, lambda: self._sources)
        # A registry of its own: read on the loop, where the pool and the lanes change, while
        # the counters and histograms render in a thread (see ``render``).
        self._state_registry = CollectorRegistry(auto_describe=True)
        self._state_registry.register(self._state)

    def configure(self, config: Config) -> None:
        """Take (a reload's) configured sources and actions. Each action's retry and dead-letter
        series exist from the start, at 0: a series born at its first dead letter (already 1)
        shows no increase, so an `increase(...) > 0` alert would miss exactly that one. A
        removed source keeps its label, so the jobs it left are still counted under it; so does
        a removed catch-all (``*``), for those of the names it took."""
        self._sources = self._sources | {s.name for s in config.all_sources()}
        self._catch_all = self._catch_all or CATCH_ALL in config.sources
        for src in config.all_sources():
            for action in src.actions:
                self.expect(src.name, action.name)

    def expect(self, source: str, action: str) -> None:
        """Make ``source``'s ``action`` retry and dead-letter series, at 0 (a configured one's,
        or at start the jobs of a source the config no longer has: they go dead at their
        turn)."""
        self.retries.labels(self._label(source), action)
        self.dead.labels(self._label(source), action)

    def observe_reload(self, applied: bool, restart_pending: int) -> None:
        self.reload_ok.set(1 if applied else 0)
        self.restart_pending.set(restart_pending)
        if applied:
            self.reload_at.set(self.pool.clock.time())

    def attach(self, intake: IntakeState, on_finish: list[Any]) -> None:
        """Subscribe to the receiver's observers and the pool's ``on_finish`` hooks, and export
        its 503s by reason."""
        intake.observers.append(self.observe_intake)
        on_finish.append(self.observe_finish)
        self._state.unavailable = intake.unavailable
        self._state.duplicates = intake.duplicates

    def observe_intake(self, source: str, status: int, seconds: float) -> None:
        # On the ack path, so counted in plain ints and handed to prometheus_client at scrape
        # time (``_flush``): its inc() and observe() take a lock each, and observe() walks the
        # buckets in Python. Only the event loop calls this, so the ints need no lock.
        key = (source, status)
        pending = self._intake_pending
        n = pending.get(key)
        if n is None:
            # labels() once per series, as before, so its _created time is its first request.
            self._intake_children[key] = self.intake.labels(source or _NO_SOURCE, str(status))
            n = 0
        pending[key] = n + 1
        if 200 <= status < 300:
            # The first bucket whose bound is >= seconds, as Histogram.observe picks it.
            self._ack_pending[bisect_left(ACK_BUCKETS_S, seconds)] += 1
            self._ack_pending_sum_s += seconds

    def _flush(self) -> None:
        """Hand what ``observe_intake`` counted since the last scrape to prometheus_client."""
        for key, n in self._intake_pending.items():
            if n:
                self._intake_children[key].inc(n)
                self._intake_pending[key] = 0
        if any(self._ack_pending):
            # Histogram has no public way to add counts per bucket; these are its own values.
            buckets = self.ack._buckets
            for i, n in enumerate(self._ack_pending):
                if n:
                    buckets[i].inc(n)
            self.ack._sum.inc(self._ack_pending_sum_s)
            self._ack_pending = [0] * len(self._ack_pending)
            self._ack_pending_sum_s = 0.0

    def _label(self, source: str) -> str:
        """A source's metrics label: its name if configured (now or earlier in this run), else
        the catch-all's ``*`` when there is or was one in this run (its series, there from 0,
        are what an ``increase()`` alert sees move), or ``(removed)``: a source an earlier
        config had, whose jobs this one lets go dead."""
        if source in self._sources:
            return source
        return CATCH_ALL if self._catch_all else _REMOVED

    def observe_poisoned(self, pills: Sequence[Poisoned]) -> None:
        """Jobs a recovery sent to dead: dead letters, though no worker saw them end."""
        for pill in pills:
            self.dead.labels(self._label(pill.source), pill.action).inc()

    def observe_finish(self, claimed: Claimed, outcome: Outcome, finished: Finished) -> None:
        source = claimed.event.source
        labels = (self._label(source), claimed.job.action)
        # As on the ack path, the children are kept: labels() costs more than the counting.
        key = (*labels, finished.outcome)
        children = self._finish_children.get(key)
        if children is None:
            children = self._finish_children[key] = (
                self.attempts.labels(*key),
                self.duration.labels(*labels),
            )
        children[0].inc()
        if finished.outcome != "wait":  # a wait never started the action
            children[1].observe(max(finished.finished_at - finished.started_at, 0.0))
        if finished.outcome == "retry":
            self.retries.labels(*labels).inc()
        elif finished.outcome == "dead":
            self.dead.labels(*labels).inc()

    async def _read_journal(self) -> None:
        self._state.counts, _ = await self.counts.get()
        self._state.paused = await self.journal.paused_sources()
        self._state.nodes = await self.journal.nodes()

    async def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; reads the journal's counts first.

        A journal that cannot be read (PostgreSQL restarting, a failing disk) does not fail the
        scrape: this process's own metrics are what an outage is watched by. The journal's
        figures stay those of the last read, and ``webhookd_journal_up`` is 0.
        """
        try:
            # Bounded: a database that hangs would hold the scrape past Prometheus' timeout,
            # and an outage would show as a node down rather than as webhookd_journal_up 0.
            await answer_within(self._read_journal(), ADMIN_READ_S)
        except JournalError:  # the outage itself is logged once, by the journal or the pool
            self._state.journal_up = False
        else:
            self._state.journal_up = True
        self._flush()
        state = generate_latest(self._state_registry)
        # The counters and histograms (a series per source and action: 850 KB at 300 sources,
        # 90 ms to render) in a thread, which the ack path outruns between its turns; in the
        # loop each scrape held every ack that long. prometheus_client locks its own values.
        counted = await asyncio.to_thread(generate_latest, self.registry)
        return counted + state, CONTENT_TYPE_LATEST


class _StateCollector(Collector):
    """Gauges read at scrape time: backlog, oldest age, jobs by state, workers, lanes, journal."""

    def __init__(
        self,
        journal: BaseJournal,
        pool: WorkerPool,
        lanes: Callable[[], Mapping[str, Any]],
        sources: Callable[[], frozenset[str]],
    ) -> None:
        self.journal = journal
        self.sources = sources  # the source labels (see ``Metrics._label``)
        self.pool = pool
        self.lanes = lanes
        self.counts: Counts | None = None
        self.paused: frozenset[str] = frozenset()
        self.nodes: list[NodeInfo] = []
        self.journal_up = True
        self.unavailable: Mapping[str, int] = {}  # the receiver's 503s by reason, once attached
        self.duplicates: Mapping[str, int] = {}  # its duplicates by source, once attached

    def describe(self) -> list[Metric]:
        return []  # gauges appear only at scrape time: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "webhookd_journal_up",
            "1 when this scrape could read the journal; 0 in an outage, when the journal's"
            " figures are those of the last read.",
            1 if self.journal_up else 0,
        )
        yield _gauge("webhookd_backlog_jobs", "Jobs queued or running.", self.journal.backlog_jobs)
        counts = self.counts
        if counts is not None:
            oldest = counts.oldest_due_at
            age = max(self.pool.clock.time() - oldest, 0.0) if oldest is not None else 0.0
            yield _gauge(
                "webhookd_oldest_queued_age_seconds",
                "How long the queued job due longest has been due (0 when none is): a job waiting"
                " out a retry's backoff is not due yet.",
                age,
            )
            jobs = GaugeMetricFamily(
                "webhookd_jobs", "Jobs in the journal by state.", labels=["state"]
            )
            for state, n in sorted(counts.jobs_by_state.items()):
                jobs.add_metric([state], n)
            yield jobs
            yield self._jobs_by_source(counts)
            yield _gauge("webhookd_events", "Events in the journal.", counts.events)
            yield _gauge(
                "webhookd_cluster_backlog_jobs",
                "Jobs queued or running in the journal, whichever node took or runs them.",
                counts.jobs_by_state.get("queued", 0) + counts.jobs_by_state.get("running", 0),
            )
        yield from _node_metrics(self.nodes)
        paused = GaugeMetricFamily(
            "webhookd_source_paused",
            "1 for a source whose processing is paused, 0 for one that runs.",
            labels=["source"],
        )
        # Each configured source from the start (a series that appears only with a pause reads
        # as "no data" before it and after the resume), and any other name paused (one a
        # catch-all took, one a reload removed). The catch-all's own "*" is never paused.
        shown = {name: 0 for name in self.sources() if name != CATCH_ALL}
        shown.update(dict.fromkeys(self.paused, 1))
        for source, value in sorted(shown.items()):
            paused.add_metric([source], value)
        yield paused
        slow = GaugeMetricFamily(
            "webhookd_action_slow",
            "1 for an action running one job at a time on this node after attempts in a row"
            " timed out (workers.slow_after_timeouts).",
            labels=["source", "action"],
        )
        for source, action in sorted(self.pool.slow):
            slow.add_metric([source, action], 1)
        yield slow
        stats = self.pool.statistics()
        yield _gauge("webhookd_workers_busy", "Jobs running now.", stats.busy)
        yield _gauge("webhookd_workers_concurrency", "Configured worker slots.", stats.concurrency)
        yield _gauge(
            "webhookd_workers_holding",
            "1 while new jobs wait for the receiver to answer a burst.",
            1 if stats.holding else 0,
        )
        yield _gauge("webhookd_scheduler_window_jobs", "Ready jobs held in memory.", stats.window)
        yield _counter(
            "webhookd_journal_commits",
            "Journal write transactions committed.",
            self.journal.commits,
        )
        yield _counter(
            "webhookd_journal_writes_rerun",
            "Journal write transactions run again after the database ended them to break a"
            " deadlock (PostgreSQL; each rerun is also logged at INFO).",
            self.journal.rerun_writes,
        )
        yield _counter(
            "webhookd_journal_batched_ops",
            "Writes committed by group commit (ingests, claims, outcomes).",
            self.journal.batched_ops,
        )
        files = GaugeMetricFamily(
            "webhookd_journal_bytes",
            "Size of the journal's files (SQLite: the database and its WAL; a WAL that keeps"
            " growing means something holds a read open and checkpoints cannot finish).",
            labels=["file"],
        )
        for name, size in sorted(self.journal.file_bytes().items()):
            files.add_metric([name], size)
        yield files
        yield _gauge(
            "webhookd_journal_write_error",
            "1 while the journal's last write failed.",
            1 if self.journal.last_write_error else 0,
        )
        yield from _lane_metrics(self.lanes())
        refused = CounterMetricFamily(
            "webhookd_intake_unavailable",
            "The receiver's 503s by reason (each also counted in webhookd_intake_requests_total).",
            labels=["reason"],
        )
        for reason in UNAVAILABLE:
            refused.add_metric([reason], self.unavailable.get(reason, 0))
        yield refused
        again = CounterMetricFamily(
            "webhookd_intake_duplicates",
            "Deliveries answered as duplicates of an event already journaled, by source (each"
            " also counted in webhookd_intake_requests_total): a sender retrying in a loop.",
            labels=["source"],
        )
        for source in sorted({*self.sources(), *self.duplicates}):
            again.add_metric([source], self.duplicates.get(source, 0))
        yield again

    def _jobs_by_source(self, counts: Counts) -> GaugeMetricFamily:
        """Jobs by source and state: which source's queue grows, or holds the dead letters.
        Each configured source (and one since removed, for the jobs it left) has its queued,
        running and dead series from the start, at 0 (a series that appears only once it is
        above 0 reads as "no data" before that); the names a catch-all took are summed under
        ``*``, or each junk path would be a series forever; without a catch-all, the jobs of
        sources no longer configured (an old config deployed) under ``(removed)``."""
        configured = self.sources()
        totals: dict[tuple[str, str], int] = {
            (source, state): 0 for source in configured for state in _WATCHED_STATES
        }
        # Not configured: a name the catch-all took, or without one a source since removed
        # (its jobs go dead at their turn; the start's warning names it).
        other = CATCH_ALL if CATCH_ALL in configured else _REMOVED
        for source, states in counts.jobs_by_source.items():
            label = source if source in configured else other
            for state, n in states.items():
                totals[label, state] = totals.get((label, state), 0) + n
        family = GaugeMetricFamily(
            "webhookd_source_jobs",
            'Jobs in the journal by source and state; the names a catch-all took under "*",'
            ' sources no longer configured (without a catch-all) under "(removed)".',
            labels=["source", "state"],
        )
        for (source, state), n in sorted(totals.items()):
            family.add_metric([source, state], n)
        return family


_WATCHED_STATES = ("queued", "running", "dead")
_REMOVED = "(removed)"


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _node_metrics(nodes: list[NodeInfo]) -> Iterator[Metric]:
    # One series per node the journal lists: nodes that stop are deleted (or forgotten after
    # ten leases) and ``nodes()`` caps the list, so the label set stays bounded.
    yield _gauge(
        "webhookd_nodes",
        "Nodes working on the journal whose heartbeat is within the lease.",
        sum(1 for node in nodes if not node.stale),
    )
    running = GaugeMetricFamily(
        "webhookd_node_running_jobs",
        "Jobs each node runs now, as the journal records its claims.",
        labels=["node"],
    )
    for node in nodes:
        running.add_metric([node.node_id], node.running)
    yield running


def _lane_metrics(lanes: Mapping[str, Any]) -> Iterator[Metric]:
    available = GaugeMetricFamily(
        "webhookd_lane_available",
        "Requests or tokens a lane could admit now (negative: in debt; on PostgreSQL, what"
        " this node holds of the shared lane).",
        labels=["lane", "kind"],
    )
    waiting = GaugeMetricFamily(
        "webhookd_lane_waiting", "Calls queued for a lane's admission.", labels=["lane"]
    )
    cooldown = GaugeMetricFamily(
        "webhookd_lane_cooldown_seconds",
        "Seconds of a lane's cooldown left (after a 429).",
        labels=["lane"],
    )
    circuit = GaugeMetricFamily(
        "webhookd_lane_circuit_open", "1 while a lane's circuit is open.", labels=["lane"]
    )
    admitted = CounterMetricFamily(
        "webhookd_lane_admitted", "Calls a lane admitted.", labels=["lane"]
    )
    # Two counters, each only ever growing (a refund is no counter reset): used = the
    # difference. A call reserves its estimate plus max_tokens and gives back what it did not
    # use when it settles.
    tokens = CounterMetricFamily(
        "webhookd_lane_tokens_debited",
        "Tokens a lane reserved for calls (and charged past a reservation).",
        labels=["lane"],
    )
    refunded = CounterMetricFamily(
        "webhookd_lane_tokens_refunded",
        "Tokens given back to a lane: reserved, not used by the call.",
        labels=["lane"],
    )
    waits = CounterMetricFamily(
        "webhookd_lane_waits", "Admissions that had to wait.", labels=["lane"]
    )
    busy = CounterMetricFamily(
        "webhookd_lane_busy", "Calls turned away (job rescheduled) by a lane.", labels=["lane"]
    )
    for name, lane in sorted(lanes.items()):
        s = lane.statistics()
        if s.requests_available is not None:
            available.add_metric([name, "requests"], s.requests_available)
        if s.tokens_available is not None:
            available.add_metric([name, "tokens"], s.tokens_available)
        waiting.add_metric([name], s.waiting)
        cooldown.add_metric([name], s.cooling_until_s)
        circuit.add_metric([name], 1 if s.circuit_open else 0)
        admitted.add_metric([name], s.admitted_total)
        tokens.add_metric([name], s.tokens_debited_total + s.tokens_refunded_total)
        refunded.add_metric([name], s.tokens_refunded_total)
        waits.add_metric([name], s.waits_total)
        busy.add_metric([name], s.busy_total)
    yield from (available, waiting, cooldown, circuit, admitted, tokens, refunded, waits, busy)
