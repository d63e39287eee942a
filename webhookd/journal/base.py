"""The journal interface: everything the rest of the daemon may ask of a journal, whichever it is.

Receiver, workers, admin, metrics, the CLI and retention see only ``BaseJournal``; the SQLite
file (``Journal``, the embedded default) and the PostgreSQL database (``PostgresJournal``, shared
by several nodes) implement it, and one contract suite (tests/test_journal_contract.py) runs
against both. Backend chores (SQLite's WAL checkpoints and incremental vacuum) sit behind
``maintain`` and ``storage_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TypeVar

from webhookd.clock import Clock
from webhookd.errors import JournalError, NotFound
from webhookd.journal.records import (
    CATCH_ALL_SHOWN,
    Activity,
    Cancelled,
    Cap,
    CapClaim,
    Claimed,
    Counts,
    DeadCause,
    DeadJobs,
    EventDetail,
    EventSummary,
    Finished,
    Ingested,
    JobsIn,
    Lane,
    LaneAction,
    LaneBacklog,
    LaneCall,
    NewEvent,
    NodeInfo,
    Peer,
    Poisoned,
    Pruned,
    Purged,
    Ready,
    Recorded,
    Recovery,
    Replayed,
    Series,
    Starter,
)
from webhookd.models import LaneGrant, LaneSpec, key_forms

_T = TypeVar("_T")

log = logging.getLogger("webhookd.journal")
# Its own logger, so that a CLI verb, which logs nothing else, can still say it upgrades.
upgrade_log = logging.getLogger("webhookd.journal.upgrade")
# The same for a CLI verb whose database keeps it waiting (a PostgreSQL journal's, which says
# what for when the server tells): else it would sit silent until it gives up.
waiting_log = logging.getLogger("webhookd.journal.waiting")

# Events per transaction of a bulk replay or cancel (the CLI's, the admin API's): short enough
# not to hold up the daemon's ingest commits, few enough that a big one is not a commit per event.
BULK_BATCH = 200

# What a replayed job's result becomes (SQL, in the UPDATE that re-queues it): a dead job keeps
# its own, which for an openai action whose then-forward failed is the answer, so a replay once
# the target is mended delivers it without asking the model again; any other starts over.
REPLAYED_RESULT = "CASE WHEN state = 'dead' THEN result END"


async def present_only(
    change: Callable[[list[str]], Awaitable[dict[str, _T]]], batch: list[str]
) -> dict[str, _T]:
    """``change(batch)``, a bulk replay's or cancel's; should one of its events have been pruned
    since it was listed (``NotFound``, which changes nothing), ``change`` of the rest one at a
    time, the gone ones left out of the answer."""
    try:
        return await change(batch)
    except NotFound:
        done: dict[str, _T] = {}
        for event_id in batch:
            with contextlib.suppress(NotFound):
                done |= await change([event_id])
        return done


@contextlib.contextmanager
def migrating(where: str, version: int, latest: int) -> Iterator[None]:
    """Say, at INFO, that an existing journal's schema is being brought from ``version`` up to
    ``latest``, and how long it took: a migration that rebuilds an index runs for seconds on a
    journal of a million jobs, at start, before the daemon answers anything. A new journal
    (version 0) and one already up to date say nothing."""
    if not 0 < version < latest:
        yield
        return
    upgrade_log.info(
        "journal %s: upgrading its schema from version %d to %d (on a large journal this takes"
        " a while; nothing else runs until it is done)",
        where,
        version,
        latest,
    )
    started = time.monotonic()
    yield
    upgrade_log.info(
        "journal %s: schema upgraded to version %d in %.1f s",
        where,
        latest,
        time.monotonic() - started,
    )


class BaseJournal(ABC):
    """The durable store of events and jobs. Use as ``async with journal:``.

    Attributes every backend keeps: ``clock``; ``on_commit`` (called on the loop with the jobs each
    committed ingest created, to wake the dispatcher); ``last_write_error`` (the last write's
    failure, cleared by the next success: ``/readyz`` reads it); ``writer_problem`` (why the writer
    stopped when nobody asked it to: ``/readyz`` reports it and ``watch`` raises it); ``commits``
    and ``batched_ops`` (write transactions and the operations they carried, for ``/metrics``);
    ``backlog_jobs`` (jobs queued or running, kept in step by this process's writes and re-counted
    by ``refresh_backlog``: the receiver's backpressure reads it); ``on_remote_jobs`` (called on
    the loop when another process or node may have made jobs ready, a hint to look now rather than
    at the next sweep; never called by a journal that cannot tell); ``on_pause_change`` (called on
    the loop when a source may have been paused or resumed anywhere: re-read ``paused_sources``
    now; likewise never called by a journal that cannot tell); ``on_poisoned`` (called on the
    loop with the jobs a recovery after start sent to dead, as PostgreSQL's leader does for
    silent nodes; what ``recover`` returns at start is the caller's to pass on); ``starter``
    (the worker pool, when set: new jobs it can start at once are written claimed, see
    ``Starter``); ``on_commit_seconds`` (called on the loop with how long each durable group
    commit took, from its transaction's start to its synced COMMIT: the disk's or the
    database's share of an ack, for ``/metrics``).
    """

    clock: Clock
    # Whether lanes' RPM/TPM buckets live in the journal, shared by every node using it (the
    # ``*_lane`` methods); a single-node journal leaves them in each lane's memory.
    shares_lanes: bool = False
    # Whether the journal takes one writer at a time (SQLite's file lock): another process's
    # bulk verb beside the daemon must then leave it room between its batches (``webhookd
    # prune``, ``replay``, ``cancel``), and events commit in the order of their ``position()``.
    one_writer: bool = False
    # What becomes of jobs a stopping process leaves claimed (running) in this journal: the end
    # of the line that says it left them (each backend says its own).
    left_claimed_fate: str
    # Set by the daemon (``config.cluster_digest``): nodes sharing the journal compare theirs.
    config_digest: str | None = None
    # Set by the daemon (``config.cluster_names``, ``publish_names``): what this node runs, so
    # that another node lacking a job's source or action leaves the job to it.
    config_names: str | None = None
    on_commit: Callable[[list[Ready]], None] | None
    starter: Starter | None = None  # set by the daemon: new jobs may start at their commit
    on_remote_jobs: Callable[[], None] | None = None
    on_pause_change: Callable[[], None] | None = None
    on_poisoned: Callable[[Sequence[Poisoned]], None] | None = None
    on_commit_seconds: Callable[[float], None] | None = None
    last_write_error: str | None
    writer_problem: str | None
    # Set by close() when the last checkpoint of a SQLite journal failed (a full disk) and left
    # its WAL: why (the daemon's last line is then not "stopped cleanly").
    wal_kept: str | None = None
    commits: int
    batched_ops: int
    # Write transactions run again after the database ended them to break a deadlock (only
    # PostgreSQL's, where nodes and operators write the same rows at once).
    rerun_writes: int = 0
    _backlog_jobs: int = 0
    # When (time.monotonic()) the writer began the group commit it is writing now; None
    # between groups.
    _writing_since: float | None = None

    def writing_for_s(self) -> float:
        """How long the group commit being written has taken so far (0.0 between groups): one
        far past ``server.ack_timeout_s`` (a disk that stalls, a database connection gone
        silent) means every webhook is being answered 503, which ``/readyz`` says."""
        since = self._writing_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def backlog_jobs(self) -> int:
        return self._backlog_jobs

    @backlog_jobs.setter
    def backlog_jobs(self, jobs: int) -> None:
        # Never below zero, which no count can be: between two counts a node of a cluster
        # subtracts the jobs it finishes that another node's ingest added, and a replay from
        # another process may not be counted yet when its jobs finish.
        self._backlog_jobs = max(jobs, 0)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> BaseJournal:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def file_bytes(self) -> dict[str, int]:
        """Bytes of each of the journal's own files, by name (``db``, ``wal``), read now; empty
        for a journal that is not files on this host (PostgreSQL's size is the server's)."""
        return {}

    @abstractmethod
    async def identity(self) -> str:
        """What tells this journal from any other, the same from every process that opens it
        (``webhookd stats`` holds a daemon's ``/stats`` to it): a SQLite file's device and
        inode, a PostgreSQL database's oid on its server's run."""

    async def sizes(self) -> dict[str, int]:
        """What ``/stats`` and ``webhookd stats`` report as ``journal_bytes``: a SQLite
        journal's files (``file_bytes``), PostgreSQL's tables with their indexes (``tables``)."""
        return self.file_bytes()

    @abstractmethod
    async def open(self) -> None:
        """Connect, bring the schema up to date, start the writer."""

    @abstractmethod
    async def close(self) -> None:
        """Flush what is queued and disconnect."""

    @abstractmethod
    async def watch(self) -> None:
        """Wait for as long as the writer runs; raise ``JournalError`` if it stops unasked (the
        daemon runs this beside its long-lived tasks, so a dead writer ends the process)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the journal is, for log lines (a file path, or a URL without its password)."""

    # -- intake, dispatch, outcomes -----------------------------------------------------------

    async def ingest(self, item: NewEvent) -> Ingested:
        """Journal an event and its jobs; returns once committed (or raises JournalUnavailable)."""
        return await self.submit_ingest(item)

    @abstractmethod
    def submit_ingest(self, item: NewEvent) -> asyncio.Future[Ingested]:
        """Queue an event for the next group commit; the future resolves once it is committed.

        The write happens whether or not anyone still waits. Raises ``JournalUnavailable`` at
        once when the journal cannot take writes.
        """

    @abstractmethod
    async def claim(self, job_ids: Sequence[str], boot_id: str) -> list[Claimed]:
        """Mark queued jobs running (one more attempt each); returns those actually claimed."""

    @abstractmethod
    async def claim_capped(
        self, job_ids: Sequence[str], boot_id: str, caps: Mapping[str, Sequence[Cap]]
    ) -> CapClaim:
        """``claim``, but a job is claimed only while each of its ``caps`` (by job id) has fewer
        than ``limit`` running jobs carrying its key, counted over every process on the store
        and the jobs this call claims, in the order given. A job kept back stays queued with its
        attempts unchanged; ``full`` names the caps that kept jobs back."""

    @abstractmethod
    async def finish(self, results: Sequence[Finished]) -> Recorded:
        """Record attempts' outcomes. An outcome for a claim this process no longer holds (a
        lease lost to another node) is ignored: the new owner's outcome stands. Says which jobs
        a cancel made while they ran kept from being queued again (they ended ``cancelled``
        instead), and which outcomes were ignored so, their lease lost (``Recorded.lost``); an
        outcome kept back to record later is in neither."""

    @abstractmethod
    async def unclaim(self, job_ids: Sequence[str], cut: Sequence[Finished] = ()) -> None:
        """Put claimed jobs back to ``queued`` without counting the attempt (a drain, a claim
        that came back as the drain began). ``cut``: the attempts a drain cut off mid-way
        (their action had started, so a target may have been called), each recorded as an
        attempt of its own, in the same transaction, for each of its jobs this gives back; one
        with a ``result`` (an openai answer) leaves it as the job's, as a failed attempt does."""

    @abstractmethod
    async def recover(self, boot_id: str, max_recoveries: int) -> Recovery:
        """Re-queue jobs whose runner is gone (an earlier boot, a node past its lease); a job
        recovered ``max_recoveries`` times goes to ``dead`` (the poison-pill rule)."""

    def leads(self) -> bool:
        """Whether this process should run the cluster's maintenance (retention) now: always
        for a journal one process owns; for a shared one, while this node holds the leader
        lease (renewed by the journal itself)."""
        return True

    async def refresh_backlog(self) -> int:
        self.backlog_jobs = await self.backlog()
        return self.backlog_jobs

    async def refresh_backlog_if_changed(self) -> None:
        """Re-count ``backlog_jobs`` if another process has written the journal since the last
        look (``webhookd replay`` or ``cancel`` from the CLI): this process's tally follows only
        its own writes. Called every sweep; a journal that re-counts on its own (PostgreSQL's
        heartbeat) does nothing here."""
        return None

    @property
    def queued_body_bytes(self) -> int:
        """The bodies of the webhooks waiting for the writer: the receiver stops queueing more
        past ``server.max_inflight_body_bytes``, so a writer that hangs holds that much memory
        at most (a webhook refused then gets a 503 and is sent again)."""
        return 0

    @property
    def queued_ingests(self) -> int:
        """The webhooks waiting for the writer, however small: the receiver stops queueing
        more past ``server.max_connections`` of them (each connection has one at a time in
        flight; more are webhooks answered 503 while a hung writer kept them)."""
        return 0

    async def probe_write(self) -> None:
        """While ``last_write_error`` is set: try a write that leaves nothing behind, so the
        error clears once the journal takes writes again even with no webhook coming to show
        it (``/readyz`` asks: a load balancer that took this node out sends it none). Raises
        ``JournalUnavailable`` while writes still fail. A journal whose own heartbeat keeps
        writing (PostgreSQL's) does nothing here."""
        return None

    def _count_replayed(self, out: dict[str, Replayed]) -> dict[str, Replayed]:
        self.backlog_jobs += sum(r.requeued for r in out.values())
        return out

    def _count_cancelled(self, out: dict[str, Cancelled]) -> dict[str, Cancelled]:
        self.backlog_jobs -= sum(c.cancelled for c in out.values())
        return out

    # -- operator actions --------------------------------------------------------------------

    @abstractmethod
    async def replay(
        self,
        event_ids: Sequence[str],
        *,
        dead_only: bool = False,
        dismissed_only: bool = False,
        done_only: bool = False,
        cancelled_only: bool = False,
        action: str | None = None,
    ) -> dict[str, Replayed]:
        """Run each event's jobs again, now, or with ``dead_only`` its dead jobs alone, with
        ``dismissed_only`` the dead jobs dismissed, with ``done_only`` the done ones, with
        ``cancelled_only`` the cancelled ones not dismissed; with
        ``action``, only the jobs of the action of that name (see ``Journal.replay``);
        ``NotFound`` for an unknown id."""

    @abstractmethod
    async def cancel(
        self, event_ids: Sequence[str], *, dead_only: bool = False, action: str | None = None
    ) -> dict[str, Cancelled]:
        """Cancel each event's queued jobs, and its running ones once their attempt ends, or
        with ``dead_only`` its dead jobs alone (dismissed dead letters; see ``Journal.cancel``);
        with ``action``, only the jobs of the action of that name; ``NotFound`` for an unknown
        id, changing nothing."""

    @abstractmethod
    async def purge(self, event_ids: Sequence[str]) -> dict[str, Purged]:
        """Delete each event now, with its jobs, their attempts and its dedup key (a provider's
        retry of it is then a new event): an event with a running job is left whole, said in
        its ``Purged``. ``NotFound`` for an unknown id, changing nothing."""

    def _count_purged(self, out: dict[str, Purged]) -> dict[str, Purged]:
        self.backlog_jobs -= sum(p.queued for p in out.values())
        return out

    @abstractmethod
    async def pause(self, source: str) -> bool:
        """Hold processing of ``source``'s jobs (intake goes on); ``False`` if already paused."""

    @abstractmethod
    async def resume(self, source: str) -> bool:
        """Let ``source``'s jobs run again; ``False`` if it was not paused."""

    @abstractmethod
    async def clock_stepped(self, by_s: float) -> int | None:
        """The wall clock was stepped ``by_s`` seconds (back: negative): move every queued
        job's ``run_at`` as far, so that each waits what it was meant to (a retry 30 s, not 30
        s and an hour's step back, nor at once after a step forward) and the jobs keep their
        order. In batches, so that intake commits between them. How many moved; None where
        nodes whose clocks did not step share the jobs (they are left as they are)."""

    @abstractmethod
    async def bring_due_by(self, latest: float) -> int:
        """Queued jobs due after ``latest`` (no wait webhookd plans is that long: their time
        was written by a clock ahead of this one) are made due then. How many."""

    # -- retention and storage ---------------------------------------------------------------

    @abstractmethod
    async def prune(
        self,
        *,
        keep_done_s: float,
        keep_dead_s: float,
        keep_dedup_s: float,
        batch: int = 500,
        start_at: float | None = None,
    ) -> Pruned:
        """Delete one small batch of expired rows of each kind; call until it returns zeros.

        Expired events are looked for from the oldest, or from ``start_at`` (a receive time):
        the ``walked_to`` of the batch before, in one pass, so events kept for a dead job are
        looked at once per pass rather than once per batch."""

    @abstractmethod
    async def maintain(self) -> int:
        """One short step of the backend's housekeeping after a prune; returns the work left
        (0 when there is none; a caller stops when it stops shrinking)."""

    @abstractmethod
    async def storage_bytes(self) -> int:
        """The journal's size in storage (file and WAL, or the database's tables)."""

    # -- reads -------------------------------------------------------------------------------

    @abstractmethod
    async def ready(
        self, now: float, limit: int, exclude: Iterable[str] = (), paused: Iterable[str] = ()
    ) -> list[Ready]:
        """Due queued jobs that may start, highest priority and oldest first."""

    @abstractmethod
    async def ready_in_lanes(self, now: float, wants: Sequence[tuple[Lane, int]]) -> list[Ready]:
        """For each (lane, n): up to n of the lane's due jobs that may start, oldest first."""

    @abstractmethod
    async def queued_lanes(self, after: Lane | None, limit: int) -> list[Lane]:
        """Lanes holding queued jobs, in (priority, source, tenant) order after ``after``."""

    @abstractmethod
    async def lane_backlog(self) -> list[LaneBacklog]:
        """Queued jobs per lane with the oldest one's receive time, biggest lanes first."""

    @abstractmethod
    async def next_run_at(
        self, paused: Iterable[str] = (), after: float | None = None
    ) -> float | None:
        """When the earliest queued job (of a source not paused) becomes due."""

    @abstractmethod
    async def backlog(self) -> int:
        """Jobs not yet finished (queued or running)."""

    @abstractmethod
    async def event_ids_with_jobs(
        self,
        state: JobsIn,
        source: str | None = None,
        since: float | None = None,
        limit: int = 10_000,
        after: str | None = None,
        tenant: str | None = None,
        action: str | None = None,
        until: float | None = None,
    ) -> list[str]:
        """Events with a job in ``state`` (what ``replay --dead``, ``--dismissed``, ``--done`` and
        ``--cancelled`` and ``cancel --queued`` take: ``dismissed`` is a dead job dismissed, now
        cancelled, ``cancelled`` any other cancelled job;
        ``unfinished``, queued or running, cancel's), optionally of one source, received since a
        time (that time included) and before another (``until``, excluded: windows laid end to
        end take each event once), of one tenant (as sent: see ``tenant_forms``) and, the job,
        of the action of that name, in id order: the first ``limit`` of those past the id
        ``after``."""

    async def pages_of_event_ids_with_jobs(
        self,
        state: JobsIn,
        source: str | None,
        since: float | None,
        tenant: str | None = None,
        page_size: int = 10_000,
        action: str | None = None,
        until: float | None = None,
    ) -> AsyncIterator[list[str]]:
        """``event_ids_with_jobs``, all of them, a page at a time: a page replayed or cancelled
        before the next is read is not met again, and one that dies again is not either."""
        after = None
        while page := await self.event_ids_with_jobs(
            state, source, since, page_size, after, tenant, action, until
        ):
            yield page
            after = page[-1]

    @abstractmethod
    async def oldest_queued_event_ids(self, limit: int, exclude_source: str) -> list[str]:
        """The events of the oldest queued jobs (any source but ``exclude_source``), oldest
        first, at most ``limit``: what a backlog alert names."""

    @abstractmethod
    async def dead_between(
        self, after: float, before: float, limit: int, exclude_source: str
    ) -> DeadJobs:
        """The jobs (of any source but ``exclude_source``) that went dead after ``after`` and
        before ``before``: by source, and the latest ``limit`` of them."""

    @abstractmethod
    async def expired_events(self, *, keep_done_s: float, keep_dead_s: float) -> int:
        """How many events ``prune`` with these windows would delete now (a progress bar)."""

    @abstractmethod
    async def series(
        self, *, now: float, minutes: int, source: str | None = None, step_s: int = 60
    ) -> Series:
        """Accepted events, jobs done and dead per step, and the backlog at each step's end, for
        the ``minutes`` steps ending with the one holding ``now`` (the dashboard's charts)."""

    @abstractmethod
    async def get_event(self, event_id: str) -> EventDetail:
        """One event with its jobs and their attempts; ``NotFound`` for an unknown id.

        The jobs and their attempts are one read (a job's state and its attempts from one
        moment), the event's row another, after it. An event's jobs are all written by the
        commit that journals it and deleted only with it (prune), so in this order a prune
        between the two reads is ``NotFound``, never the event without its jobs.
        """

    async def event_by_key(self, dedup_key: str) -> tuple[str, float, EventDetail | None] | None:
        """``key_owner`` of the key as sent, or as the journal keeps it (``key_forms``: a
        delivery id over ``MOST_KEY_CHARS`` as its digest), and the event itself: ``None`` in
        its place once it has been pruned (a key is kept longer than a done event)."""
        for form in key_forms(dedup_key):
            if (owner := await self.key_owner(form)) is not None:
                break
        else:
            return None
        try:
            return (*owner, await self.get_event(owner[0]))
        except NotFound:
            return (*owner, None)

    @abstractmethod
    async def key_owner(self, dedup_key: str) -> tuple[str, float] | None:
        """The id of the event that owns ``dedup_key`` (``source:key``, as an event's
        ``dedup_key`` reads: a provider's delivery id, say) and when the key was first seen;
        ``None`` for a key never seen, or pruned (after ``journal.keep_dedup_d``). The event
        itself may be pruned sooner."""

    @abstractmethod
    async def list_events(
        self,
        *,
        state: str | None = None,
        source: str | None = None,
        limit: int = 50,
        before: str | None = None,
        since: float | None = None,
        contains: bytes | None = None,
        tenant: str | None = None,
        positions: tuple[int, int] | None = None,
    ) -> list[EventSummary]:
        """Newest first (in the order events were journaled). ``state`` filters on the derived
        event state, ``tenant`` on the tenant as sent (see ``tenant_forms``): like
        ``contains``, a scan (of the events, newest first, until ``limit`` are found).
        ``contains``: only events whose raw body holds these bytes (a scan of the bodies,
        newest first, until ``limit`` are found: ``since`` and ``source`` bound it).
        ``before``: the events listed after that event id, for the next page. The cursor goes
        by the same order as the listing, not by the ids' order: in a cluster an event can be
        committed after one with a younger id (its node's clock behind), and a cursor by id
        would skip it between two pages. A cursor no longer in the journal (pruned) falls back
        to the ids' order. ``positions`` (low, high): only the events journaled after ``low``
        and up to ``high``, two ``position()`` answers (a seek, whatever the journal holds)."""

    @abstractmethod
    async def position(self) -> int:
        """How far the journal has come: the position of the newest event committed, 0 while
        it holds none; each event journaled takes a higher one, never used again (what
        ``events --follow`` asks from). With one writer (``one_writer``) events commit in the
        order of their positions; where several nodes write, an event can commit after another
        node's at a higher position, by as long as its commit took."""

    @abstractmethod
    async def counts(self, keep: Collection[str] = (), most: int = CATCH_ALL_SHOWN) -> Counts:
        """Jobs by state and by source, the oldest queued job's receive time, events.

        By source: each name in ``keep`` (the configured sources) and the alerts' own
        (``kept_sources``), the ``most`` other names
        with the most jobs (ties by name), and the rest summed under ``*`` in the database, so
        the answer stays small however many names a catch-all took."""

    @abstractmethod
    async def dead_causes(
        self,
        limit: int = 10,
        names: Collection[str] | None = None,
        other: str = "*",
        other_actions: Collection[str] | None = None,
    ) -> list[DeadCause]:
        """The dead jobs grouped by source, action and the start of their last error, most
        jobs first, at most ``limit`` groups; with ``names``, a source not among them is
        grouped as ``other`` (a catch-all's names: one cause, not one row per name). With
        ``other_actions`` too, only a job of one of those actions is (those the catch-all
        has); another keeps its source's name (a source since removed, whose action the
        catch-all lacks, is not the catch-all's)."""

    @abstractmethod
    async def unfinished_by_action(self) -> dict[tuple[str, str], int]:
        """Jobs queued or running by (source, action): what a config must still be able to run
        (the start's warning of jobs no configured action will take)."""

    @abstractmethod
    async def nodes(self, limit: int = 64) -> list[NodeInfo]:
        """The processes working on this journal, oldest first, at most ``limit`` (this one
        included; a node that stopped cleanly is not listed, one that died shows ``stale``)."""

    async def publish_names(self, names: str) -> None:
        """Take this node's ``config_names`` (a reload's, before it applies): a journal shared
        by several nodes tells the others at once, where its heartbeat would tell them only
        later, and a webhook of a source just added could meet a node that knows no better."""
        self.config_names = names

    async def peer_names(self) -> list[Peer]:
        """The other live nodes, and those that stopped cleanly less than their lease ago
        (a restart), each with what it runs (its ``config_names``), read now: a job this node
        cannot run is left to those whose names take it. None for a journal of one node
        (SQLite)."""
        return []

    @abstractmethod
    async def paused_sources(self) -> frozenset[str]:
        """Sources an operator paused."""

    @abstractmethod
    async def activity(self, window_s: float) -> Activity:
        """Events received and attempts by outcome over the last ``window_s`` seconds."""

    @abstractmethod
    async def lane_calls(
        self, actions: Sequence[LaneAction], since: float, named: Collection[str] = ()
    ) -> dict[str, list[LaneCall]]:
        """The calls ``actions`` made through their lanes whose attempts ended after ``since``
        (wall clock), by lane, oldest first: of each lane the latest ``most`` (by the order the
        attempts were written), as ``lane_call`` reads each attempt. An action of the catch-all
        (source ``CATCH_ALL``) is the one of that name in the jobs of any source not ``named``.

        What a process's lanes start with on a journal of their own, so that a restart does not
        let one 60 s window hold a minute's calls before it and a minute's after: one read, of
        the attempts ended in the window (PostgreSQL's ``attempts_finished``; SQLite's rowid
        order). A journal whose lanes are shared (``shares_lanes``) has their log in the
        database already and needs none of this."""

    # -- lanes shared by several nodes (only where ``shares_lanes``) ---------------------------

    async def reserve_lane(
        self,
        spec: LaneSpec,
        *,
        need: tuple[float, float],
        want: tuple[float, float],
        returns: Sequence[tuple[float, float, float]] = (),
    ) -> LaneGrant:
        """One round trip to the lane's shared bucket: first apply ``returns`` (grant at,
        requests, tokens: what a node gives back or its settlements charge), then grant between
        ``need`` and ``want`` (requests, tokens), or nothing with ``retry_s`` set. Raises
        ``JournalUnavailable`` when the database cannot be reached."""
        raise JournalError(f"journal {self.location} keeps no shared lanes")

    async def cool_lane(self, spec: LaneSpec, seconds: float) -> None:
        """Make every node's lane admit nothing for ``seconds`` (a 429's cool-down)."""
        raise JournalError(f"journal {self.location} keeps no shared lanes")

    async def set_lane_circuit(self, spec: LaneSpec, reason: str | None) -> None:
        """Open (with a reason) or close (``None``) the lane's circuit on every node."""
        raise JournalError(f"journal {self.location} keeps no shared lanes")
