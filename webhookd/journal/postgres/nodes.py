"""A PostgreSQL journal's life as a node: its heartbeat (the lease on every job it runs, on a
task and a connection of its own, so that nothing else the node does holds it up), the leader
lease and the maintenance only its holder runs (recovery of silent nodes' jobs, retention), the
cluster-wide backlog count, and the wake-ups between nodes (LISTEN on a connection of its own,
NOTIFY after commits that made jobs ready or freed a cap's slot, and after a pause, a resume,
an operator's replay, cancel or purge, or a copy from SQLite).

Hazard: leadership is a lease, not a lock. A leader cut off from the database (or paused past
its lease) may still believe it leads for a moment while another node has taken over; the
maintenance it runs is safe twice (``FOR UPDATE SKIP LOCKED``, idempotent deletes), so the
lease only saves redundant work and never guards correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from webhookd.clock import Clock
from webhookd.errors import JournalUnavailable
from webhookd.journal.postgres.db import (
    DB_ERRORS,
    ReplicationStall,
    db_error,
    keep_alive,
    redact_url,
)
from webhookd.journal.postgres.writes import write_recovery
from webhookd.journal.records import Peer, Poisoned, Recovery

log = logging.getLogger("webhookd.journal")

CHANNEL = "webhookd_jobs"
PAUSE_CHANNEL = "webhookd_paused"  # a source was paused or resumed (payload: its name)
NOTIFY_EVERY_S = 0.1
# How long a new listener waits to hear its own probe before saying that it hears nothing.
PROBE_S = 5.0
LISTEN_CHECK_S = 5.0  # how often an idle listener proves its connection is alive
RECONNECT_MAX_S = 5.0
# A heartbeat that waits longer than this share of the lease (half a heartbeat at the default
# pace of three a lease) was held up by a lock on ``nodes``, which holds every node's (see
# ``_settled``).
HELD_UP_LEASES = 1 / 6
_T = TypeVar("_T")


class PgNodes:
    """The node half of ``PostgresJournal`` (a mixin: the journal supplies the pool and writes)."""

    url: str
    listen_url: str
    statement_cache_size: int
    clock: Clock
    node_id: str
    lease_s: float
    config_digest: str | None
    config_names: str | None
    _told_differ: frozenset[str]
    _names_pending: bool
    _longest_lease_s: float
    max_recoveries: int
    heartbeat_s: float
    last_write_error: str | None
    backlog_jobs: int
    _leader_until: float
    _down_since: float | None
    _replication_stalled: bool
    sync_standbys: bool
    _up_since: float | None
    _beat_pool: Any
    _beat_sent: float | None
    forgotten_wanted: bool
    listening: asyncio.Event
    on_remote_jobs: Callable[[], None] | None
    on_pause_change: Callable[[], None] | None
    on_poisoned: Callable[[Sequence[Poisoned]], None] | None
    _notify_wanted: asyncio.Event
    heard_itself: asyncio.Event
    listener_deaf: bool

    @property
    def pool(self) -> Any:
        raise NotImplementedError

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        raise NotImplementedError

    async def release_doubtful(self) -> int:
        raise NotImplementedError

    async def release_forgotten(self) -> Recovery:
        raise NotImplementedError

    if TYPE_CHECKING:  # PgReads supplies it; a stub here would shadow it in the MRO

        async def backlog(self) -> int: ...

    async def record_pending(self) -> int:
        raise NotImplementedError

    async def heartbeat(self) -> None:
        """Renew this node's lease on the jobs it runs. Being a write, it also tells /readyz
        whether the database takes writes when no webhook is arriving: cut after two
        heartbeats' time (at least 5 s), not the pool's minute, so that a database that hangs
        (keeps its connections and stops answering) makes the node not ready in seconds while
        its webhooks are answered 503.

        It goes over a connection of its own and writes ``nodes`` alone: a lock on ``jobs``
        (``VACUUM FULL``, ``LOCK TABLE``, a newer node's migration), or a pool taken up by
        statements waiting on one, does not hold it up, so the other nodes see this one alive
        while it lasts. One held up past a sixth of a lease makes this node wait a lease before
        it takes others' silence for their loss (``_settled``)."""
        now = self.clock.time()
        names = self.config_names
        # Real time, as the deadlines: what it measures is a wait on the server.
        sent = self._beat_sent = time.monotonic()
        try:
            # Its own pool; the shared one says "not open" once closed, and is a non-node's only.
            await (self._beat_pool or self.pool).execute(
                "INSERT INTO nodes (node_id, started_at, heartbeat_at, host, pid, lease_s,"
                " config_digest, runs) VALUES ($1, $2, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at,"
                " lease_s = EXCLUDED.lease_s, config_digest = EXCLUDED.config_digest,"
                " runs = EXCLUDED.runs",
                self.node_id,
                now,
                socket.gethostname(),
                os.getpid(),
                self.lease_s,
                self.config_digest,
                names,
                deadline_s=max(2 * self.heartbeat_s, 5.0),
            )
        except DB_ERRORS as exc:
            self.went_down(exc)
            raise JournalUnavailable(f"journal heartbeat failed: {db_error(exc)}") from exc
        finally:
            self._beat_sent = None
        if names == self.config_names:
            self._names_pending = False
        took_s = time.monotonic() - sent
        if took_s > self.lease_s * HELD_UP_LEASES and self._up_since is not None:
            # What held it (a lock on nodes) held every node's: their heartbeats are as late.
            self._up_since = self.clock.monotonic()
            log.info(
                "a heartbeat waited %.1f s (a lock on the nodes table?): other nodes' silence is"
                " not taken for their loss for a lease",
                took_s,
            )
        self.came_back()

    async def publish_names(self, names: str) -> None:
        """Take ``names`` and write them to this node's row now (a reload's, before it takes
        the new sources' webhooks): another node that meets a job of a source just added here
        then finds this node has it. A database that does not answer within a heartbeat's
        deadline (an outage) gets them with the first write that goes through once it is
        back: the next group commit, ahead of the webhooks it takes, or the next heartbeat."""
        self.config_names = names
        self._names_pending = True
        try:
            await self.pool.execute(
                "UPDATE nodes SET runs = $2 WHERE node_id = $1",
                self.node_id,
                names,
                deadline_s=max(2 * self.heartbeat_s, 5.0),
            )
        except DB_ERRORS as exc:
            log.debug("publishing this node's sources and actions failed: %s", db_error(exc))
            return
        if names == self.config_names:
            self._names_pending = False

    async def peer_names(self) -> list[Peer]:
        """The other nodes alive (heartbeat within their lease, as ``compare_configs`` judges
        them) and those that stopped cleanly less than their lease ago, each as ``host pid N``
        with what it runs (``config.cluster_names``); a node of an older webhookd, which says
        nothing of what it runs, is left out. A stopped node counts for the lease a killed one
        would keep its jobs: a restart (seconds) leaves its sources' jobs waiting for it, not
        sent to dead."""
        now = self.clock.time()
        try:
            rows = await self.pool.fetch(
                "SELECT host, pid, runs, stopped_at IS NOT NULL,"
                " heartbeat_at + COALESCE(lease_s, $3) - $2::double precision FROM nodes"
                " WHERE node_id <> $1 AND runs IS NOT NULL"
                " AND heartbeat_at >= $2::double precision - COALESCE(lease_s, $3)"
                " ORDER BY started_at",
                self.node_id,
                now,
                self.lease_s,
            )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"journal read failed: {db_error(exc)}") from exc
        return [
            Peer(f"{r[0] or '?'} pid {r[1]}", r[2], max(float(r[4]), 0.0) if r[3] else None)
            for r in rows
        ]

    async def compare_configs(self) -> frozenset[str]:
        """The live nodes whose sources, actions or lanes are not this node's, said once
        each time that set grows (and once when it empties): until every node has one file,
        a job of a source or action one node lacks is left to those that have it
        (``peer_names``), and caps and lanes are as loose as the loosest node's. Also notes
        the longest lease any node has (``_settled``)."""
        try:
            rows = await self.pool.fetch(
                "SELECT host, pid, config_digest, lease_s,"
                " heartbeat_at >= $2::double precision - COALESCE(lease_s, $3)"
                " FROM nodes WHERE node_id <> $1 AND stopped_at IS NULL",
                self.node_id,
                self.clock.time(),
                self.lease_s,
            )
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"journal read failed: {db_error(exc)}") from exc
        self._longest_lease_s = max([self.lease_s, *(float(r[3]) for r in rows if r[3])])
        mine = self.config_digest
        differ = frozenset(
            f"{r[0] or '?'} pid {r[1]}"
            for r in rows
            if mine is not None and r[2] is not None and r[2] != mine and r[4]
        )
        if differ - self._told_differ:
            log.warning(
                "node(s) %s run a config other than this node's config (its sources, actions,"
                " lanes or alerts differ): until"
                " every node has the same file, a job of a source or action one lacks is left"
                " to the nodes that have it, and concurrency caps and lanes are as loose as the"
                " loosest node's",
                ", ".join(sorted(differ)),
            )
        elif self._told_differ and not differ:
            live = {f"{r[0] or '?'} pid {r[1]}" for r in rows if r[4]}
            if self._told_differ & live:
                log.warning("every node runs this node's sources, actions and lanes again")
            else:
                # Not an agreement: those nodes stopped (a restart, perhaps with the other file
                # again) or went silent.
                log.warning(
                    "node(s) %s, which ran another config, stopped or went silent: the nodes"
                    " running now run this node's sources, actions and lanes",
                    ", ".join(sorted(self._told_differ)),
                )
        self._told_differ = differ
        return differ

    def went_down(self, exc: BaseException) -> None:
        """A write failed: say so once per outage (the retries that follow stay at debug), and
        once more if it turns out to be commits waiting for the synchronous standbys: an
        operator told only that the database does not answer looks at the network."""
        self.last_write_error = db_error(exc)
        self._up_since = None
        if isinstance(exc, ReplicationStall):
            self.sync_standbys = True
        stalled = isinstance(exc, ReplicationStall) and not self._replication_stalled
        self._replication_stalled |= stalled
        if self._down_since is None:
            self._down_since = self.clock.monotonic()
            log.warning("journal unavailable: %s; retrying until it is back", self.last_write_error)
        elif stalled:
            log.warning("journal unavailable: %s", self.last_write_error)

    def came_back(self) -> None:
        """A write succeeded: clear the error, and say the outage is over if there was one."""
        self.last_write_error = None
        if self._up_since is None:
            self._up_since = self.clock.monotonic()
        if self._down_since is not None:
            down_s = self.clock.monotonic() - self._down_since
            self._down_since = None
            # The database may not be the one that went away (a replica promoted): what this
            # node last wrote may be missing from it (``release_forgotten``).
            self.forgotten_wanted = True
            # From when a write first failed: a hang may have begun up to a deadline before.
            log.warning(
                "journal available again, %.1f s after a write first failed%s",
                down_s,
                ": the synchronous standbys confirm commits again"
                if self._replication_stalled
                else "",
            )
        self._replication_stalled = False

    async def lead(self) -> bool:
        """Take or renew the leader lease (for ``lease_s``) if it is free, expired or already
        ours, in one statement; returns whether this node now leads."""
        now = self.clock.time()
        try:
            held = await self.pool.fetchval(
                "UPDATE leader SET node_id = $1, expires_at = $2::double precision + $3"
                " WHERE name = 'maintenance' AND (expires_at < $2 OR node_id = $1)"
                " RETURNING true",
                self.node_id,
                now,
                self.lease_s,
            )
        except DB_ERRORS as exc:
            self.went_down(exc)
            raise JournalUnavailable(f"journal leader lease failed: {db_error(exc)}") from exc
        was = self.leads()
        # Counted from before the statement: this node never believes it leads for longer than
        # the row says, whatever the round trip took.
        self._leader_until = now + self.lease_s if held else 0.0
        if self.leads() != was:
            state = "leads" if held else "no longer leads"
            log.info("this node %s the cluster's maintenance", state)
        return bool(held)

    def leads(self) -> bool:
        return self.clock.time() < self._leader_until

    async def resign(self) -> None:
        """Give the leader lease up at once (a clean stop): the next node need not wait."""
        self._leader_until = 0.0
        await self.pool.execute(
            "UPDATE leader SET expires_at = 0 WHERE name = 'maintenance' AND node_id = $1",
            self.node_id,
        )

    async def recover_lost(self, *, gone_only: bool = False) -> Recovery:
        """Re-queue the running jobs of nodes silent past their ``lease_s``; forget long-gone
        nodes. ``gone_only``: only those of nodes with no row at all, which no outage makes
        look so (see ``recover``)."""
        # Silence is judged as of now, as the caller found this node ``_settled``: a statement
        # that then waits on a lock finds the heartbeats only fresher when it runs.
        now = self.clock.time()

        async def fn(conn: Any) -> Recovery:
            recovery = await write_recovery(
                conn, now, self.lease_s, self.max_recoveries, gone_only=gone_only
            )
            if gone_only:
                return recovery
            # A node stopped cleanly is forgotten once its lease has passed (see peer_names).
            await conn.execute(
                "DELETE FROM nodes WHERE (heartbeat_at < $1 OR (stopped_at IS NOT NULL AND"
                " heartbeat_at < $2::double precision - COALESCE(lease_s, $3)))"
                " AND NOT EXISTS (SELECT 1 FROM jobs j"
                " WHERE j.state = 'running' AND j.node_id = nodes.node_id)",
                now - 10 * self.lease_s,
                now,
                self.lease_s,
            )
            return recovery

        recovery = await self._write(fn)
        if recovery.requeued:
            # Queued again: the idle nodes hear of them now, not at their next sweep (which
            # may be workers.sweep_interval_s away).
            self._notify_wanted.set()
        return recovery

    async def _beat_loop(self) -> None:
        """Heartbeat every ``heartbeat_s``, apart from the lease loop: its writes and reads of
        ``jobs`` may each wait up to a minute. A database outage is survived: the next beat
        tries again (and this node's own jobs are re-queued by the others if it stays cut off
        past its lease)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
            except JournalUnavailable as exc:
                log.debug("%s", exc)  # the outage itself was logged once, by went_down

    async def _lease_loop(self) -> None:
        """Recount the cluster's backlog, and, while leading, take over the jobs of silent
        nodes, every ``heartbeat_s``. A database outage is survived: the next round tries
        again."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.compare_configs()
                await self.release_doubtful()
                await self.record_pending()
                forgotten = await self.release_forgotten()
                # Every node's backpressure reads the whole cluster's backlog, not its own
                # writes: one index-only count over the queued/running partial indexes.
                self.backlog_jobs = await self.backlog()
                leads = await self.lead()
                recovered = (
                    await self.recover_lost() if leads and self._settled() else Recovery(requeued=0)
                )
            except JournalUnavailable as exc:
                self._leader_until = min(self._leader_until, self.clock.time())
                log.debug("%s", exc)  # the outage itself was logged once, by went_down
                continue
            self._said_recovered(recovered, recovered.whose())
            self._said_recovered(
                forgotten,
                "this node ran whose outcome the database no longer has (a failover to a"
                " replica that lacked the last commits?)",
            )

    def _said_recovered(self, recovered: Recovery, whose: str) -> None:
        """What a recovery re-queued (``whose`` jobs), said once, with the backlog and the
        hooks told."""
        if recovered.requeued and self.on_remote_jobs is not None:
            self.on_remote_jobs()
        if recovered.requeued or recovered.dead or recovered.cancelled:
            log.warning(
                "re-queued %d job(s) %s; %d poison pill(s) sent to dead%s; %d cancelled while"
                " running",
                recovered.requeued,
                whose,
                recovered.dead,
                recovered.named(),
                recovered.cancelled,
            )
            self.backlog_jobs -= recovered.dead + recovered.cancelled
        if recovered.poisoned and self.on_poisoned is not None:
            self.on_poisoned(recovered.poisoned)

    def _settled(self) -> bool:
        """Whether this node has reached the database without a break for a whole lease: only
        then may it take other nodes' silence for their loss. After an outage longer than
        ``lease_s`` every node's heartbeat is stale at once; the first one back would else
        re-queue the jobs of nodes that are alive and running them (and fence out their
        outcomes), so the work would be done twice. Meanwhile the others heartbeat again:
        within their own lease, so the wait is the longest lease of any node.

        A lock on ``nodes`` (a newer node's migration, ``LOCK TABLE``) holds every node's
        heartbeat as an outage does, though no write fails: this node's own heartbeat is the
        witness. While it has waited past a sixth of a lease, the node is not settled, and
        once it went through so late, the wait starts again (``heartbeat``). The recovery
        judges silence as of this moment (its ``now`` is read now), so a recovery statement
        that then waits on a lock can only find the heartbeats fresher."""
        sent = self._beat_sent
        if sent is not None and time.monotonic() - sent > self.lease_s * HELD_UP_LEASES:
            return False
        up_since = self._up_since
        wait_s = max(self.lease_s, self._longest_lease_s)
        return up_since is not None and self.clock.monotonic() - up_since >= wait_s

    async def _listen_loop(self) -> None:
        """LISTEN on a connection of its own; reconnect when it is lost, looking at once."""
        delay_s = 0.1
        while True:
            try:
                conn = await _connect_alone(
                    self.listen_url, "webhookd-listen", self.statement_cache_size
                )
            except DB_ERRORS as exc:
                log.debug("journal listener cannot connect: %s", exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
                continue
            delay_s = 0.1
            try:
                await self._listen_on(conn)
            except DB_ERRORS as exc:
                log.debug("journal listener lost its connection: %s", exc)
            finally:
                self.listening.clear()
                await _close_quietly(conn)

    async def _listen_on(self, conn: Any) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        # A path that hangs here (a pooler stuck as the LISTEN goes out) would leave this
        # waiting for ever, deaf: given up as the check below gives up, then connected again.
        async with asyncio.timeout(LISTEN_CHECK_S):
            await conn.add_listener(CHANNEL, self._notified)
            await conn.add_listener(PAUSE_CHANNEL, self._pause_notified)
        self.listening.set()
        # What was notified while this was not listening is lost: look now.
        if self.on_remote_jobs is not None:
            self.on_remote_jobs()
        if self.on_pause_change is not None:
            self.on_pause_change()
        await self._probe_listener()
        # asyncio.timeout, never wait_for, in this task: Python 3.11's wait_for swallows a
        # cancellation that arrives as what it awaits completes, and the journal's close, which
        # cancels this task and waits for it, then waited for ever (a stop as the probe was
        # heard).
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_CHECK_S):
                    await lost.wait()
                return
            # A cut network may never close the socket: prove the connection still answers.
            async with asyncio.timeout(LISTEN_CHECK_S):
                await conn.fetchval("SELECT 1")

    async def _probe_listener(self) -> None:
        """Notify this node's own probe as another node would and wait to hear it: a pooler in
        transaction mode passes a LISTEN on and then drops what it should hear, silently, so
        say so once (with what to do about it) rather than leave the wake-ups quietly gone.

        The probe goes over a connection of its own, not the pool: the journal's close cancels
        this task, and a pooled connection cancelled mid-statement could be handed on unsettled.
        """
        if self.listener_deaf:
            return
        self.heard_itself.clear()
        try:
            conn = await _connect_alone(self.url, "webhookd-probe", 0)
            try:
                async with asyncio.timeout(PROBE_S):
                    await conn.execute(f"NOTIFY {CHANNEL}, 'probe:{self.node_id}'")
            finally:
                await _close_quietly(conn)
        except DB_ERRORS as exc:
            log.debug("journal listener probe failed: %s", exc)  # an outage: it comes back
            return
        try:
            async with asyncio.timeout(PROBE_S):
                await self.heard_itself.wait()
        except TimeoutError:
            self.listener_deaf = True
            log.warning(
                "LISTEN on %s hears nothing (a pooler in transaction mode?), so nodes"
                " find each other's new jobs only at their next sweep; give journal.listen_url,"
                " a URL straight to PostgreSQL",
                redact_url(self.listen_url),
            )

    def _notified(self, _conn: Any, _pid: int, _channel: str, sender: str) -> None:
        if sender.startswith("probe:"):  # a node checking that it hears: not a wake-up
            if sender == f"probe:{self.node_id}":
                self.heard_itself.set()
            return
        if sender != self.node_id and self.on_remote_jobs is not None:
            self.on_remote_jobs()

    def _pause_notified(self, _conn: Any, _pid: int, _channel: str, _source: str) -> None:
        if self.on_pause_change is not None:
            self.on_pause_change()

    async def _notify_loop(self) -> None:
        """Tell idle nodes that jobs were committed: this node runs its own in-process."""
        while True:
            await self._notify_wanted.wait()
            self._notify_wanted.clear()
            try:
                await self.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
            except DB_ERRORS as exc:
                log.debug("journal notify failed: %s", exc)  # a hint; the sweep finds the jobs
            await asyncio.sleep(NOTIFY_EVERY_S)


async def _connect_alone(url: str, name: str, statement_cache_size: int) -> Any:
    """A connection of its own, outside the pool, named ``name`` in ``pg_stat_activity``."""
    conn = await asyncpg.connect(
        url,
        timeout=10,
        statement_cache_size=statement_cache_size,
        server_settings={"application_name": name},
    )
    keep_alive(conn)  # a listener on a path gone silent would otherwise be deaf for ever
    return conn


async def _close_quietly(conn: Any) -> None:
    """Close a connection of its own within 5 s, whatever the server or network does."""
    with contextlib.suppress(*DB_ERRORS):  # TimeoutError is one of them
        async with asyncio.timeout(5):
            await conn.close()
