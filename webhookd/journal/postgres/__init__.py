"""The PostgreSQL journal: one database shared by any number of webhookd nodes (DESIGN §7).

The one home of asyncpg: its errors become ``JournalUnavailable`` here. Hazards:

* Ingests and outcomes go through one writer task that commits whatever is waiting as one
  transaction (group commit, ``synchronous_commit`` on, asked for per transaction where the
  database's default is off): a webhook is acknowledged only after its batch commits. No
  transaction is ever held across an action: a claim commits before the action starts and its
  outcome is a transaction of its own.
* A node is a process with a row in ``nodes`` and a heartbeat every few seconds, on a task and
  a connection of its own; that heartbeat is the lease on every job it claimed. Any node
  re-queues the running jobs of a node silent for ``lease_s`` (the poison-pill rule counts
  those recoveries). Each claim gets a fresh token and an outcome is written only while its
  token still stands, so a node that lost its lease (a long GC pause, a network cut) cannot
  overwrite the new owner's outcome.
* Wake-ups: after a commit that made jobs ready a task of its own sends a ``NOTIFY`` naming
  this node (at most one per ``NOTIFY_EVERY_S``: NOTIFY takes a global lock at commit, so it
  stays out of the ingest transaction; commits meanwhile share the next one, none is dropped);
  an operator's change that made jobs runnable (a replay, the CLI's too) notifies in its own
  transaction, as a pause and a copy from SQLite (``webhookd copy``) do. Every node LISTENs on
  a connection of its own, outside the pool, so an idle node starts another node's job within
  milliseconds. Notifications are only a hint: those sent while the listener was disconnected
  are lost, so it asks the dispatcher to look at once after every reconnect, and the
  dispatcher's sweep finds everything anyway.
* Leases compare this process's clock with the other nodes' heartbeats: hosts' clocks must
  agree to well within ``lease_s`` (NTP does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal.batch import (
    GATHER_PASSES,
    FinishOp,
    IngestOp,
    Op,
    OpQueue,
    reserve_starts,
)
from webhookd.journal.postgres.changes import REINDEX_EVERY_S, PgChanges
from webhookd.journal.postgres.db import (
    DB_ERRORS,
    BoundedPool,
    db_error,
    keep_alive,
    quiet_pool_retries,
    redact_url,
    rowcount,
    what_became,
)
from webhookd.journal.postgres.lanes import PgLanes
from webhookd.journal.postgres.nodes import PgNodes
from webhookd.journal.postgres.reads import PgReads
from webhookd.journal.postgres.schema import migrate
from webhookd.journal.postgres.writes import (
    write_claim,
    write_claim_capped,
    write_forgotten,
    write_group,
    write_unclaims,
)
from webhookd.journal.records import (
    Cap,
    CapClaim,
    Claimed,
    Finished,
    Ingested,
    NewEvent,
    Ready,
    Recorded,
    Recovery,
)
from webhookd.journal.schema import leaving_running
from webhookd.models import JobState, new_boot_id

__all__ = ["REINDEX_EVERY_S", "PostgresJournal", "redact_url"]

log = logging.getLogger("webhookd.journal")

MAX_BATCH = 512
POOL_SIZE = 10
# Only parameters a pooler passes on: PgBouncer refuses a connection that asks for any other
# at startup (``synchronous_commit`` among them), so that one is checked instead (``open``).
_SERVER_SETTINGS = {"application_name": "webhookd"}
# The CLI told apart from the nodes in pg_stat_activity.
_CLI_SETTINGS = {"application_name": "webhookd cli"}
# The heartbeat's connection (``PgNodes.heartbeat``), told apart in pg_stat_activity.
_BEAT_SETTINGS = {"application_name": "webhookd-heartbeat"}
# Each write transaction's lock wait, and how long the server lets one sit idle (_write).
LOCK_TIMEOUT_S = 5
IDLE_IN_TRANSACTION_S = 5
# How often a write the server ended to break a deadlock is tried (_write).
WRITE_TRIES = 3
# How long a command's use of the database (the CLI's) waits before it says that it waits, and
# for what (``BoundedPool``): a commit held by an absent synchronous standby waited the whole
# answer deadline in silence, and an operator took the command for hung.
CLI_WAITING_S = 3.0


async def _on_connect(conn: Any) -> None:
    keep_alive(conn)


_T = TypeVar("_T")


class PostgresJournal(PgNodes, PgReads, PgLanes, PgChanges):
    """A journal in a PostgreSQL database. Use as ``async with PostgresJournal(url) as j:``."""

    # A restarted process is a new node: the leader re-queues its jobs once their lease passes.
    left_claimed_fate = "recovered once their lease runs out"

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lease_s: float = 30.0,
        max_recoveries: int = 3,
        heartbeat_s: float | None = None,
        statement_cache_size: int = 100,
        node: bool = True,
        listen_url: str | None = None,
    ) -> None:
        self.url = url
        # LISTEN needs a session of its own: behind a pooler in transaction mode notifications
        # never arrive, so a direct URL for it alone may be given.
        self.listen_url = listen_url or url
        # A daemon is a node; the CLI is not: it neither heartbeats nor shows in ``nodes()``,
        # takes no lead and listens to nothing.
        self.node = node
        self.clock = clock
        self.lease_s = lease_s
        self._told_differ: frozenset[str] = frozenset()
        self._longest_lease_s = lease_s
        self.max_recoveries = max_recoveries
        # Three heartbeats per lease: one lost or late heartbeat does not cost the node its jobs.
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(5.0, lease_s / 3)
        self.node_id = new_boot_id().replace("boot_", "node_")
        # 0 turns asyncpg's prepared statements off, as PgBouncer before 1.21 in transaction
        # mode needs (a statement prepared on one server connection is unknown on the next).
        self.statement_cache_size = statement_cache_size
        self._leader_until = 0.0
        self._lane_offsets: dict[str, float] = {}
        self._down_since: float | None = None  # when the current outage began (monotonic)
        # This outage was said to be commits waiting for the synchronous standbys (went_down).
        self._replication_stalled = False
        # Since when writes have gone through without a break (monotonic; None while down).
        self._up_since: float | None = None
        self.on_commit: Callable[[list[Ready]], None] | None = None
        self.last_write_error: str | None = None
        self.writer_problem: str | None = None
        self._closing = False
        self._sync_each = False  # see open()
        # Whether commits wait for synchronous standbys: said at open, or by a commit cut in
        # that wait since (the setting may change under a running node). See write_ingests.
        self.sync_standbys = False
        self.commits = 0
        self.batched_ops = 0
        self.backlog_jobs = 0
        self._pool: BoundedPool | None = None
        self._beat_pool: BoundedPool | None = None  # one connection, the heartbeat's alone
        self._beat_sent: float | None = None  # when the heartbeat in flight began (monotonic)
        self._queue = OpQueue()
        self._writer: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._notify_task: asyncio.Task[None] | None = None
        self._notify_wanted = asyncio.Event()
        self.listening = asyncio.Event()  # set while the listener is connected (for tests)
        self.heard_itself = asyncio.Event()  # the listener heard its own probe (for tests)
        self.listener_deaf = False  # its own probe never came back (see _probe_listener)
        # The token of each claim this process holds: its outcome is written only under it.
        self._tokens: dict[str, str] = {}
        # Claims holding a cap: their outcome frees a slot other nodes may be waiting for.
        self._capped: set[str] = set()
        # Outcomes an outage kept back (record_pending), by (job id, the claim token each was
        # bound to): a claim has one outcome, so the worker's repeated tries keep one copy.
        self._pending: dict[tuple[str, str | None], Finished] = {}
        self._doubtful: list[str] = []  # tokens of claims whose commit is unknown
        # Tokens of claims being written (committed, perhaps, but not yet in ``_tokens``) or
        # being given back (``unclaim``): release_forgotten leaves their jobs alone.
        self._claiming: set[str] = set()
        # An outage ended: look for running jobs under this node that it no longer holds.
        self.forgotten_wanted = False
        # A reload's names not yet written (publish_names met an outage): the next group
        # commit or heartbeat writes them.
        self._names_pending = False

    @property
    def location(self) -> str:
        return redact_url(self.url)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        quiet_pool_retries()
        try:
            try:
                raw = await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=POOL_SIZE,
                    server_settings=_SERVER_SETTINGS if self.node else _CLI_SETTINGS,
                    statement_cache_size=self.statement_cache_size,
                    init=_on_connect,
                    timeout=10,  # to connect; a server that never answers is an error, not a hang
                )
                self._pool = BoundedPool(raw, waiting_s=None if self.node else CLI_WAITING_S)
                if self.node:
                    beat = await asyncpg.create_pool(
                        self.url,
                        min_size=1,
                        max_size=1,
                        server_settings=_BEAT_SETTINGS,
                        statement_cache_size=self.statement_cache_size,
                        init=_on_connect,
                        timeout=10,
                    )
                    self._beat_pool = BoundedPool(beat)
            except ValueError as exc:  # a URL the driver cannot read: its words may quote it
                raise JournalError(
                    f"cannot open journal {self.location}: its URL cannot be read"
                ) from exc
            async with self._pool.raw.acquire() as conn:  # a migration may take long
                await migrate(conn, self.location, upgrade=self.node)
                durable = await conn.fetchval("SHOW synchronous_commit")
                standbys = await conn.fetchval("SHOW synchronous_standby_names")
            if self.node:
                await self.heartbeat()
            self.backlog_jobs = await self.backlog()
        except DB_ERRORS as exc:
            await self._close_pool()
            raise JournalError(f"cannot open journal {self.location}: {db_error(exc)}") from exc
        except BaseException:
            await self._close_pool()
            raise
        self.sync_standbys = bool(standbys)
        if self.node and not standbys:
            # Said once per start: a commit is then as safe as this server's disk, and a
            # failover to an asynchronous replica loses the last ones (measured: 406 of 8,000).
            log.info(
                "journal %s: no synchronous standby (synchronous_standby_names is empty): a"
                " failover to a replica may lose the last webhooks acknowledged (see"
                " docs/scaling.md, replicas and failover)",
                self.location,
            )
        # Where the database's default is weaker than on, each write transaction turns it on for
        # itself (in _write_settings, below): "off" loses commits in a crash, and "local" or
        # "remote_write" acknowledge a webhook a synchronous standby has not flushed, which a
        # failover to it loses. "remote_apply" is stronger than "on".
        self._sync_each = durable not in ("on", "remote_apply")
        if self._sync_each:
            log.info(
                "journal %s: synchronous_commit is %s by default; each write asks for on",
                self.location,
                durable,
            )
        # For each write transaction (SET LOCAL passes through a pooler and ends with it): a
        # lock held by another node's transaction is waited for LOCK_TIMEOUT_S at most, and a
        # transaction left open by a node that froze or lost its host mid-commit is ended by
        # the server after IDLE_IN_TRANSACTION_S, its locks with it. Without them one such
        # node held every other node's intake (a dedup row), claims (a cap's lock) or lane.
        self._write_settings = (
            f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s';"
            f" SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'"
            + ("; SET LOCAL synchronous_commit = on" if self._sync_each else "")
        )
        self._closing = False
        self.writer_problem = None
        self._queue = OpQueue()
        self._writer = asyncio.create_task(self._write_loop(), name="journal-writer")
        self._writer.add_done_callback(self._writer_ended)
        if not self.node:
            return
        self._beat_task = asyncio.create_task(self._beat_loop(), name="journal-heartbeat")
        self._lease_task = asyncio.create_task(self._lease_loop(), name="journal-leases")
        self._listen_task = asyncio.create_task(self._listen_loop(), name="journal-listen")
        self._notify_task = asyncio.create_task(self._notify_loop(), name="journal-notify")

    async def close(self) -> None:
        self._closing = True
        for task in (self._notify_task, self._listen_task, self._lease_task, self._beat_task):
            if task is not None:
                await _cancelled(task)
        self._notify_task = self._listen_task = self._lease_task = self._beat_task = None
        if self._writer is not None and self._pending:
            with contextlib.suppress(JournalUnavailable):
                await self.record_pending()  # a last try; else lease recovery re-queues them
        if self._writer is not None:
            self._queue.close()
            await self._writer
            self._writer = None
        if self._pool is not None and self.node:
            # A clean stop gives up the leader lease, so another node takes over maintenance
            # without waiting, and marks the node row stopped (its jobs were finished or
            # unclaimed by now): listed no more, but what it ran counts for its lease, so
            # that a restart's jobs wait for it rather than go dead (``peer_names``).
            with contextlib.suppress(*DB_ERRORS):
                await self.resign()
            with contextlib.suppress(*DB_ERRORS):
                await self._pool.execute(
                    "UPDATE nodes SET stopped_at = $2, heartbeat_at = $2 WHERE node_id = $1",
                    self.node_id,
                    self.clock.time(),
                )
        await self._close_pool()

    async def _close_pool(self) -> None:
        pools = (self._beat_pool, self._pool)
        self._pool = self._beat_pool = None
        for pool in pools:
            if pool is not None:
                with contextlib.suppress(*DB_ERRORS):
                    await asyncio.wait_for(pool.raw.close(), 10)

    @property
    def pool(self) -> BoundedPool:
        if self._pool is None:
            raise JournalError("journal is not open")
        return self._pool

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self.pool.fetch(sql, *args))
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"journal read failed: {db_error(exc)}") from exc

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        """``fn(conn)`` in a transaction of its own; database errors become JournalUnavailable.

        A transaction the server rolled back to break a deadlock (with an operator's cancel
        or replay, a prune, another node's batch) is run again from the start, up to
        ``WRITE_TRIES`` times: the other side has gone on by then, and every ``fn`` here reads
        what it changes inside its transaction, so a second run is the same write. Any other
        error, and the last deadlock, is an outage."""
        tries = 0
        while True:
            tries += 1
            try:
                # READ COMMITTED whatever the database's default: the order-key triggers' reads
                # must see what committed while they waited for a lock.
                async with (
                    self.pool.acquire() as conn,
                    conn.transaction(isolation="read_committed"),
                ):
                    await conn.execute(self._write_settings)
                    result = await fn(conn)
            except DB_ERRORS as exc:
                if isinstance(exc, asyncpg.DeadlockDetectedError) and tries < WRITE_TRIES:
                    log.info("journal write ended to break a deadlock; trying it again")
                    self.rerun_writes += 1
                    continue
                # A node's writes are retried or answered 503, and it says so once per outage;
                # an operator's command is told what became of its change.
                if self.node:
                    self.went_down(exc)
                became = "" if self.node else what_became(exc)
                raise JournalUnavailable(f"journal write failed: {db_error(exc)}{became}") from exc
            # While commits wait for the synchronous standbys, one that wrote nothing (a claim
            # that found its jobs taken) does not wait, and proves nothing: the heartbeat's,
            # which always writes, says when the standbys are back.
            if not self._replication_stalled:
                self.came_back()
            self.commits += 1
            return result

    # -- the writer --------------------------------------------------------------------------

    @property
    def queued_body_bytes(self) -> int:
        return self._queue.body_bytes

    @property
    def queued_ingests(self) -> int:
        return self._queue.ingests

    def submit_ingest(self, item: NewEvent) -> asyncio.Future[Ingested]:
        future: asyncio.Future[Ingested] = asyncio.get_running_loop().create_future()
        self._enqueue(IngestOp(future, item))
        return future

    def _enqueue(self, op: Op) -> None:
        if self._writer is None or self._writer.done():
            raise JournalUnavailable("journal writer is not running")
        self._queue.put(op)

    async def _write_loop(self) -> None:
        # After close() the queue still hands out what was queued, then nothing.
        while batch := await self._queue.take(MAX_BATCH, GATHER_PASSES):
            try:
                await self._commit_group(batch)
            except BaseException as exc:
                # Not a database error (those fail only their batch) but a bug: the writer
                # stops (later writes get JournalUnavailable, close() re-raises this), and
                # nobody waiting on this batch may hang meanwhile.
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(
                            JournalUnavailable(f"journal writer failed: {db_error(exc)}")
                        )
                raise

    async def _commit_group(self, batch: list[Op]) -> None:
        """One transaction for every ingest and outcome waiting; resolve each waiter after it."""
        ingests = [op for op in batch if isinstance(op, IngestOp)]
        finishes = [op for op in batch if isinstance(op, FinishOp)]
        results = [f for op in finishes for f in op.results]
        tokens = [t for op in finishes for t in op.claims]  # bound by finish(), never here
        now = self.clock.time()
        starts = reserve_starts(self.starter, ingests)
        claim = (self.node_id, secrets.token_hex(8) if starts.job_ids else "", self.lease_s)
        if claim[1]:
            self._claiming.add(claim[1])

        # What a reload's publish_names could not write (an outage) goes in this commit, ahead
        # of the webhooks it takes: no job of a source just added is committed before the other
        # nodes can see that this node has it.
        names = self.config_names if self._names_pending else None

        async def write(conn: Any) -> Any:
            if names is not None:
                await conn.execute(
                    "UPDATE nodes SET runs = $2 WHERE node_id = $1", self.node_id, names
                )
            return await write_group(
                conn, ingests, results, tokens, now, starts.job_ids, claim, self.sync_standbys
            )

        began = time.perf_counter()
        self._writing_since = time.monotonic()
        try:
            ingested, (recorded, cancelled, earlier) = await self._write(write)
        except BaseException as exc:
            self._claiming.discard(claim[1])
            if starts.job_ids:
                # Jobs written claimed in a commit that may have happened: undone by token
                # once the server answers again (as a claim's are), and the slots given back.
                self._doubtful.append(claim[1])
                if self.starter is not None:
                    self.starter.settle([], starts.job_ids)
            if not isinstance(exc, JournalUnavailable):
                raise
            log.debug("%s", exc)  # an outage is logged once, by went_down; each waiter hears it
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(exc)
            return
        finally:
            self._writing_since = None
        write_s = time.perf_counter() - began
        if names is not None and names == self.config_names:
            self._names_pending = False
        self.batched_ops += len(batch)
        started: list[Claimed] = []
        created: list[Ready] = []
        for iop, (result, ready, claimed) in zip(ingests, ingested, strict=True):
            created.extend(ready)
            started.extend(claimed)
            if not iop.future.done():
                iop.future.set_result(result)
        for c in started:
            self._tokens[c.job.id] = claim[1]
        self._claiming.discard(claim[1])
        freed = due = False
        lost: set[str] = set()
        # (job, token) of the claims answered here: another copy of one of their outcomes in
        # this batch is a duplicate, not a lost lease.
        answered = {(results[i].job_id, tokens[i]) for i in recorded}
        for i, (f, token) in enumerate(zip(results, tokens, strict=True)):
            # Whether the claim this outcome answers is still the one this node holds for its
            # job. Not so once its outcome was recorded (by an earlier copy) or the job was
            # claimed again since: the bookkeeping below is then the current claim's, and this
            # outcome must leave it alone.
            held = token is not None and self._tokens.get(f.job_id) == token
            if i in recorded or (held and i in earlier):
                # (Or recorded by an earlier try whose commit this node never heard of.)
                if f.state != JobState.QUEUED or f.job_id in cancelled:
                    self.backlog_jobs -= 1
                elif f.run_at is not None and f.run_at <= now:
                    due = True  # given back for another node to run (``WorkerPool._give_back``)
            elif not held or (f.job_id, token) in answered:
                log.debug(
                    "job=%s outcome=%s attempt=%d already recorded or superseded",
                    f.job_id,
                    f.outcome,
                    f.attempt,
                )
                continue
            else:
                lost.add(f.job_id)
                log.warning(
                    "job=%s outcome=%s not recorded: its lease passed to another node",
                    f.job_id,
                    f.outcome,
                )
            if held:
                del self._tokens[f.job_id]
                if f.job_id in self._capped:
                    self._capped.discard(f.job_id)
                    freed = True
        for fop in finishes:
            if not fop.future.done():
                ids = {f.job_id for f in fop.results}
                fop.future.set_result(Recorded(cancelled & ids, frozenset(lost & ids)))
        self.backlog_jobs += len(created) + len(started)
        if created or freed or due:
            self._notify_wanted.set()
        if starts.job_ids and self.starter is not None:
            # Before the announcement, whose error ends the writer: the pool gets every slot
            # it reserved back either way.
            self.starter.settle(started, starts.job_ids)
        # After every waiter has its answer, as the SQLite journal does.
        if self.on_commit_seconds is not None:
            self.on_commit_seconds(write_s)
        if created and self.on_commit is not None:
            self.on_commit(created)

    # -- dispatch and outcomes ---------------------------------------------------------------

    async def claim(self, job_ids: Sequence[str], boot_id: str) -> list[Claimed]:
        """Claim for this node (``boot_id`` names the process; the node id is the journal's)."""
        if not job_ids:
            return []
        token = secrets.token_hex(8)
        now = self.clock.time()
        self._claiming.add(token)
        try:
            claimed = await self._write(
                lambda conn: write_claim(conn, job_ids, self.node_id, token, now, self.lease_s)
            )
        except JournalUnavailable:
            # The connection may have dropped after the server committed: jobs claimed then
            # would stay running under this live node forever. Undo by token once it is back.
            self._doubtful.append(token)
            raise
        finally:
            self._claiming.discard(token)
        for c in claimed:
            self._tokens[c.job.id] = token
        return claimed

    async def claim_capped(
        self, job_ids: Sequence[str], boot_id: str, caps: Mapping[str, Sequence[Cap]]
    ) -> CapClaim:
        """``claim`` within caps counted over every node's running jobs (see BaseJournal)."""
        if not job_ids:
            return CapClaim([], frozenset())
        token = secrets.token_hex(8)
        now = self.clock.time()
        self._claiming.add(token)
        try:
            result = await self._write(
                lambda conn: write_claim_capped(
                    conn, job_ids, caps, self.node_id, token, now, self.lease_s
                )
            )
        except JournalUnavailable:
            self._doubtful.append(token)
            raise
        finally:
            self._claiming.discard(token)
        for c in result.claimed:
            self._tokens[c.job.id] = token
            if caps.get(c.job.id):
                self._capped.add(c.job.id)
        return result

    async def finish(self, results: Sequence[Finished]) -> Recorded:
        """Record outcomes; if the database cannot take them now, raise JournalUnavailable and
        keep them to record with the next heartbeat (``record_pending``): this node's lease
        keeps their jobs running meanwhile, and no other node would ever re-queue them.

        Each outcome is written only under the claim it answers: its ``claim``, or else the
        token this node holds for its job now, as it first arrives here. It keeps that binding
        for good, kept back or not. The worker tries again while the database is down and the
        heartbeat writes what was kept back, so one outcome can arrive more than once, and
        after its job was recorded, queued and claimed again: looked up at write time, a late
        copy would take the new claim's token and set the running attempt back to queued."""
        if not results:
            return Recorded()
        return await self._finish_bound(
            [(f, f.claim or self._tokens.get(f.job_id)) for f in results]
        )

    async def _finish_bound(self, bound: Sequence[tuple[Finished, str | None]]) -> Recorded:
        """``finish`` of outcomes already bound to their claim tokens."""
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        try:
            self._enqueue(FinishOp(future, [f for f, _ in bound], [t for _, t in bound]))
            return await future
        except JournalUnavailable:
            for f, token in bound:
                self._pending.setdefault((f.job_id, token), f)
            raise

    async def release_forgotten(self) -> Recovery:
        """Once an outage has ended: re-queue, as a crashed node's are, the running jobs under
        this node's id whose claim it no longer holds. Their outcome was committed to a
        primary that then failed over before its replica had it; this node's heartbeat keeps
        their lease, so no other node would ever take them (measured: 5 jobs running two
        minutes on, freed only by a restart)."""
        if not self.forgotten_wanted:
            return Recovery(requeued=0)

        def holds() -> tuple[set[tuple[str, str]], set[str]]:
            # Every claim this process may hold: answered ones (by job: one claim takes
            # several), outcomes kept back; and by token, ones being written (their jobs not
            # yet known here) and ones in doubt (released by token, unpenalised). Asked once
            # the running jobs are read: a claim that committed before that read is in one of
            # them by then, where one taken before the transaction began would miss it.
            held = {*self._tokens.items(), *((job, token) for job, token in self._pending if token)}
            return held, {*self._claiming, *self._doubtful}

        now = self.clock.time()
        recovery = await self._write(
            lambda conn: write_forgotten(conn, self.node_id, holds, now, self.max_recoveries)
        )
        self.forgotten_wanted = False
        if recovery.requeued:
            self._notify_wanted.set()
        return recovery

    async def release_doubtful(self) -> int:
        """Re-queue, without counting the attempt, jobs of claims whose commit was in doubt
        (the connection lost mid-claim); returns how many there were."""
        tokens, self._doubtful = self._doubtful, []
        if not tokens:
            return 0
        now = self.clock.time()
        try:
            status = await self._write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET attempts = GREATEST(attempts - 1, 0), run_at = $2,"
                    " node_id = NULL, claim_token = NULL, lease_until = NULL, "
                    + leaving_running("'queued'", "finished_at", "$2::double precision")
                    + " WHERE state = 'running' AND claim_token = ANY($1::text[])",
                    tokens,
                    now,
                )
            )
        except JournalUnavailable:
            self._doubtful.extend(tokens)
            raise
        released = rowcount(status)
        if released:
            self._notify_wanted.set()  # queued again: any idle node may take them now
            if self.on_remote_jobs is not None:
                self.on_remote_jobs()
        return released

    async def record_pending(self) -> int:
        """Record outcomes a database outage kept back; returns how many were written."""
        pending, self._pending = self._pending, {}
        if pending:
            # Under the tokens they were bound to: on failure they are kept again.
            await self._finish_bound([(f, token) for (_, token), f in pending.items()])
        return len(pending)

    async def unclaim(self, job_ids: Sequence[str], cut: Sequence[Finished] = ()) -> None:
        self._capped.difference_update(job_ids)
        held = {job_id: self._tokens.pop(job_id) for job_id in job_ids if job_id in self._tokens}
        if held:
            now = self.clock.time()
            # Still this node's until the write ends: not for release_forgotten to take.
            releasing = set(held.values()) - self._claiming
            self._claiming |= releasing
            try:
                await self._write(lambda conn: write_unclaims(conn, held, cut, now))
            finally:
                self._claiming -= releasing
            self._notify_wanted.set()  # given back by a drain: another node need not sweep

    async def recover(self, boot_id: str, max_recoveries: int) -> Recovery:
        """At start: heartbeat, then, if this node leads, re-queue what nodes that are gone
        left running. A restarted process is a new node, so its own earlier jobs come back
        once their lease has passed (by the leader's lease loop if another node leads).

        Until this node has reached the database for a whole lease (``_settled``, never so
        just after it opened) that is only the jobs of nodes with no row in ``nodes`` (one
        that stopped, jobs copied from SQLite): it may be starting as the database comes back
        from an outage, when every live node's heartbeat is stale at once. A silent node's
        jobs are left to the lease loop, a lease later."""
        self.max_recoveries = max_recoveries
        await self.heartbeat()
        if not await self.lead():
            return Recovery(requeued=0)
        return await self.recover_lost(gone_only=not self._settled())

    # -- liveness ----------------------------------------------------------------------------

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The writer's task is done: if close() did not ask for that, say why (``/readyz``)."""
        if self._closing:
            return
        exc = None if task.cancelled() else task.exception()
        why = "cancelled" if task.cancelled() else (repr(exc) if exc is not None else "returned")
        self.writer_problem = f"journal writer stopped: {why}"

    async def watch(self) -> None:
        """Wait for as long as the writer runs; raise ``JournalError`` if it stops unasked."""
        task = self._writer
        if task is None:
            raise JournalError("journal is not open")
        await asyncio.wait({task})  # cancelling the watch leaves the writer alone
        if not self._closing:
            raise JournalError(self.writer_problem or "journal writer stopped")


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again should it go on: on Python
    3.11 ``asyncio.wait_for`` (asyncpg uses it too) drops a cancellation that arrives as what
    it waits for completes, and a close that awaited such a task once waited for ever. The
    tasks' own cleanup (closing a connection) takes at most 5 s, so 10 s is never too soon."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=10.0)
    with contextlib.suppress(asyncio.CancelledError):
        await task
