"""The PostgreSQL journal's changes made to order, each in a transaction of its own: an
operator's (replay, cancel, purge, pause, resume, which wake the nodes where they make jobs
runnable), retention's (prune, the queue indexes' rebuild) and those a step of the wall clock
calls for."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from webhookd.clock import STEP_S
from webhookd.errors import JournalUnavailable, NotFound
from webhookd.journal.base import REPLAYED_RESULT, BaseJournal
from webhookd.journal.postgres.db import (
    DB_ERRORS,
    BoundedPool,
    db_error,
    rowcount,
)
from webhookd.journal.postgres.nodes import CHANNEL, PAUSE_CHANNEL
from webhookd.journal.postgres.writes import (
    PRUNE_RECHECK_SQL,
    PRUNE_SQL,
)
from webhookd.journal.records import (
    Cancelled,
    Pruned,
    Purged,
    Replayed,
    walk_end,
)
from webhookd.journal.schema import action_clause, replayed_jobs

_T = TypeVar("_T")

# An event's dedup keys are written by its commit, this long at most after it was received
# (the ack's deadline is seconds): purge finds them by that time.
_KEYS_WRITTEN_WITHIN_S = 600.0

# The partial indexes every claim and ready read walks, rebuilt this often (see ``maintain``).
QUEUE_INDEXES = ("jobs_due", "jobs_lane", "jobs_running", "jobs_order")
REINDEX_EVERY_S = 6 * 3600.0


class PgChanges(BaseJournal):
    """The change half of ``PostgresJournal``; it needs ``_write``, ``pool`` and ``node_id``."""

    node_id: str

    @property
    def pool(self) -> BoundedPool:
        raise NotImplementedError

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        raise NotImplementedError

    # -- operator actions --------------------------------------------------------------------

    async def _each_event(
        self,
        event_ids: Sequence[str],
        change: Callable[[Any, str], Awaitable[_T]],
        runnable: Callable[[_T], bool] = lambda _: False,
    ) -> dict[str, _T]:
        """``change(conn, event_id)`` for each event, in one transaction; ``NotFound`` for an
        unknown id, changing nothing. Each event is locked (``FOR KEY SHARE``, held to the
        commit) before its jobs are touched, so a prune on any node cannot delete it under the
        change: prune's candidate lock skips an event held so, and a change that comes after
        prune locked it waits, then finds it gone. Events are taken in id order, so two changes
        of overlapping events (two operators, two nodes) lock their jobs in the same order: one
        waits for the other instead of both deadlocking.

        Where ``runnable`` says a change made jobs runnable (queued again, made due, or the
        next of an order key let through), every node is woken in the same transaction (the
        notification goes out at commit), as a pause is: the CLI runs no notify task, and a
        node's would wait for its next sweep (``workers.sweep_interval_s``). Operator changes
        are rare: NOTIFY's commit lock costs nothing here."""

        async def fn(conn: Any) -> dict[str, _T]:
            out: dict[str, _T] = {}
            for event_id in sorted(set(event_ids)):
                found = await conn.fetchval(
                    "SELECT 1 FROM events WHERE id = $1 FOR KEY SHARE", event_id
                )
                if found is None:
                    raise NotFound(event_id)
                out[event_id] = await change(conn, event_id)
            if any(runnable(r) for r in out.values()):
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
            return out

        return await self._write(fn)

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
        """``BaseJournal.replay``, safe beside a prune on any node (see ``_each_event``): an
        acknowledged replay is never followed by the deletion of the event it re-queued."""
        now = self.clock.time()
        again = replayed_jobs(dead_only, dismissed_only, done_only, cancelled_only)
        of_action, named = action_clause(action, "$3")
        of_action_2, _ = action_clause(action, "$2")  # where the event id is the one other

        async def change(conn: Any, event_id: str) -> Replayed:
            requeued = await conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, recoveries = 0, waits = 0,"
                " run_at = $1, finished_at = NULL, node_id = NULL, claim_token = NULL,"
                f" lease_until = NULL, result = {REPLAYED_RESULT}, cancel_requested_at = NULL,"
                f" dismissed_at = NULL WHERE event_id = $2 AND {again}{of_action}",
                now,
                event_id,
                *named,
            )
            if dead_only or dismissed_only or done_only or cancelled_only:
                return Replayed(requeued=rowcount(requeued), run_now=0)
            hurried = await conn.execute(
                "UPDATE jobs SET run_at = $1 WHERE event_id = $2 AND state = 'queued'"
                f" AND run_at > $1{of_action}",
                now,
                event_id,
                *named,
            )
            await conn.execute(
                "UPDATE jobs SET cancel_requested_at = NULL WHERE event_id = $1"
                f" AND state = 'running' AND cancel_requested_at IS NOT NULL{of_action_2}",
                event_id,
                *named,
            )
            return Replayed(requeued=rowcount(requeued), run_now=rowcount(hurried))

        return self._count_replayed(
            await self._each_event(event_ids, change, lambda r: bool(r.requeued or r.run_now))
        )

    async def cancel(
        self, event_ids: Sequence[str], *, dead_only: bool = False, action: str | None = None
    ) -> dict[str, Cancelled]:
        """``BaseJournal.cancel``, events locked as ``replay`` locks them. A job some node is
        claiming this instant is waited for, then marked as a running one is."""
        now = self.clock.time()
        of_action, named = action_clause(action, "$3")
        if dead_only:

            async def dismiss(conn: Any, event_id: str) -> Cancelled:
                cur = await conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = $1, dismissed_at = $1"
                    f" WHERE event_id = $2 AND state = 'dead'{of_action}",
                    now,
                    event_id,
                    *named,
                )
                return Cancelled(rowcount(cur), 0)

            return await self._each_event(event_ids, dismiss)  # the backlog is unchanged

        async def change(conn: Any, event_id: str) -> Cancelled:
            cancelled = await conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = $1"
                f" WHERE event_id = $2 AND state = 'queued'{of_action}",
                now,
                event_id,
                *named,
            )
            running = await conn.execute(
                "UPDATE jobs SET cancel_requested_at = $1 WHERE event_id = $2"
                f" AND state = 'running'{of_action}",
                now,
                event_id,
                *named,
            )
            return Cancelled(rowcount(cancelled), rowcount(running))

        # A cancelled job may have held its order key: the next one may run now.
        return self._count_cancelled(
            await self._each_event(event_ids, change, lambda r: bool(r.cancelled))
        )

    async def purge(self, event_ids: Sequence[str]) -> dict[str, Purged]:
        """``BaseJournal.purge``, events locked as ``replay`` locks them and their jobs before
        they are looked at, so that no node claims one in between. A deleted row stays in the
        tables' files until a ``VACUUM`` reuses its space (``VACUUM FULL`` rewrites them)."""

        async def delete(conn: Any, event_id: str) -> Purged:
            # The event first, for the delete (a replay holding it is waited for before any
            # of its jobs is locked here: no deadlock), then its jobs.
            received = await conn.fetchval(
                "SELECT received_at FROM events WHERE id = $1 FOR UPDATE", event_id
            )
            states = [
                r[0]
                for r in await conn.fetch(
                    "SELECT state FROM jobs WHERE event_id = $1 ORDER BY id FOR UPDATE", event_id
                )
            ]
            if "running" in states:
                return Purged(0, 0, states.count("running"))
            await conn.execute(
                "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = $1)",
                event_id,
            )
            await conn.execute("DELETE FROM jobs WHERE event_id = $1", event_id)
            # Its keys (the second, what a signed body's signature covers, too) by the time
            # they were written, the event's arrival: the table has no index on the event.
            await conn.execute(
                "DELETE FROM dedup WHERE created_at BETWEEN $2::double precision - $3"
                " AND $2::double precision + $3 AND event_id = $1",
                event_id,
                received,
                _KEYS_WRITTEN_WITHIN_S,
            )
            await conn.execute("DELETE FROM events WHERE id = $1", event_id)
            return Purged(len(states), states.count("queued"))

        # A deleted queued job may have held its order key: the next one may run now.
        return self._count_purged(
            await self._each_event(event_ids, delete, lambda r: bool(r.queued))
        )

    async def pause(self, source: str) -> bool:
        now = self.clock.time()
        return await self._write(
            lambda conn: _changed_and_told(
                conn,
                source,
                "INSERT INTO paused_sources (source, paused_at) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                source,
                now,
            )
        )

    async def resume(self, source: str) -> bool:
        return await self._write(
            lambda conn: _changed_and_told(
                conn, source, "DELETE FROM paused_sources WHERE source = $1", source
            )
        )

    async def clock_stepped(self, by_s: float) -> int | None:
        # The jobs' times were written by every node, each by its own clock: this one's step
        # says nothing of theirs.
        return None

    async def bring_due_by(self, latest: float) -> int:
        return rowcount(
            await self._write(
                lambda conn: conn.execute(
                    "UPDATE jobs SET run_at = $1 WHERE state = 'queued' AND run_at > $1", latest
                )
            )
        )

    # -- retention ---------------------------------------------------------------------------

    async def prune(
        self,
        *,
        keep_done_s: float,
        keep_dead_s: float,
        keep_dedup_s: float,
        batch: int = 500,
        start_at: float | None = None,
    ) -> Pruned:
        """Delete at most ``batch`` expired events (with their jobs and attempts) and dedup keys,
        in one short transaction; rows another node is pruning, and events a replay holds, are
        skipped.

        ``PRUNE_SQL`` says how the candidates are found, ``PRUNE_RECHECK_SQL`` why they are
        looked at again once locked.
        """
        now = self.clock.time()
        done_before, dead_before = now - keep_done_s, now - keep_dead_s

        async def fn(conn: Any) -> Pruned:
            rows = await conn.fetch(
                PRUNE_SQL,
                done_before,
                dead_before,
                batch,
                -math.inf if start_at is None else start_at,
            )
            ids = [r[0] for r in rows]
            walked_to = walk_end(rows, batch, done_before)
            if ids:
                # Locked now: drop any a replay re-queued after the candidates were read.
                ids = [
                    r[0] for r in await conn.fetch(PRUNE_RECHECK_SQL, done_before, dead_before, ids)
                ]
            jobs = 0
            if ids:
                await conn.execute(
                    "DELETE FROM attempts WHERE job_id IN"
                    " (SELECT id FROM jobs WHERE event_id = ANY($1::text[]))",
                    ids,
                )
                jobs = rowcount(
                    await conn.execute("DELETE FROM jobs WHERE event_id = ANY($1::text[])", ids)
                )
                await conn.execute("DELETE FROM events WHERE id = ANY($1::text[])", ids)
            # Keys stamped ahead of the clock (by a node whose clock was since stepped back) are
            # taken as made now, as on SQLite: else they are kept until that time comes.
            await conn.execute(
                "UPDATE dedup SET created_at = $1 WHERE key IN (SELECT key FROM dedup"
                " WHERE created_at > $1::double precision + $2 LIMIT $3 FOR UPDATE SKIP LOCKED)",
                now,
                STEP_S,
                batch,
            )
            dedup = await conn.execute(
                "DELETE FROM dedup WHERE key IN (SELECT key FROM dedup WHERE created_at < $1"
                " LIMIT $2 FOR UPDATE SKIP LOCKED)",
                now - keep_dedup_s,
                batch,
            )
            return Pruned(len(ids), jobs, rowcount(dedup), walked_to)

        return await self._write(fn)

    async def maintain(self) -> int:
        """Rebuild the queue's partial indexes when they are due (every ``REINDEX_EVERY_S``,
        cluster-wide; the leader's retention round calls this). Autovacuum reclaims the rows
        prune deleted (the job table is tuned for a queue in its migration), but an index
        through which many jobs passed keeps its pages: 100,000 jobs through a queue of 2,000
        leave ``jobs_lane`` at 800 pages instead of 15, and its scans twice as slow."""
        now = self.clock.time()
        due = await self._write(
            lambda conn: conn.fetchval(
                "UPDATE leader SET node_id = $1, expires_at = $2::double precision + $3"
                " WHERE name = 'reindex' AND expires_at < $2 RETURNING true",
                self.node_id,
                now,
                REINDEX_EVERY_S,
            )
        )
        if due:
            await self.reindex_queue()
        return 0

    async def reindex_queue(self) -> None:
        """``REINDEX INDEX CONCURRENTLY`` each of the queue's partial indexes: no lock that
        stops claims or ingests. A rebuild that failed half way leaves an invalid copy behind;
        those are dropped first."""
        try:
            leftovers = await self.pool.fetch(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = 'jobs'::regclass AND NOT i.indisvalid"
            )
            # Unbounded (``raw``): a rebuild of a large index may take longer than any answer.
            for row in leftovers:
                await self.pool.raw.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{row[0]}"')
            for index in QUEUE_INDEXES:
                await self.pool.raw.execute(f"REINDEX INDEX CONCURRENTLY {index}")
        except DB_ERRORS as exc:
            raise JournalUnavailable(f"journal reindex failed: {db_error(exc)}") from exc


async def _changed_and_told(conn: Any, source: str, sql: str, *args: Any) -> bool:
    """Run a pause or resume; if it changed anything, tell every node in the same transaction
    (the notification goes out at commit), so each drops or takes back the source's jobs now
    rather than at its next sweep. Pauses are rare: NOTIFY's commit lock costs nothing here."""
    changed = rowcount(await conn.execute(sql, *args)) > 0
    if changed:
        await conn.execute("SELECT pg_notify($1, $2)", PAUSE_CHANNEL, source)
    return changed
