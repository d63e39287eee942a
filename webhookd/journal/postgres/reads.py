"""The PostgreSQL journal's queries: everything that only reads, on the connection pool."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from webhookd.clock import Clock
from webhookd.config.sections import CATCH_ALL
from webhookd.errors import NotFound
from webhookd.journal.postgres.db import UNFINISHED_BY_ACTION_SQL
from webhookd.journal.records import (
    CATCH_ALL_SHOWN,
    CAUSE_CHARS,
    Activity,
    Counts,
    DeadCause,
    DeadJobs,
    EventDetail,
    EventSummary,
    JobsIn,
    Lane,
    LaneAction,
    LaneBacklog,
    LaneCall,
    NodeInfo,
    Ready,
    Series,
    by_action,
    calls_by_lane,
    kept_sources,
)
from webhookd.journal.schema import (
    EVENT_COLUMNS,
    HEAD_OF_KEY,
    READY_COLUMNS,
    STATE_FILTERS,
    event_detail,
    job_history_sql,
)
from webhookd.models import Priority, event_state, tenant_forms

TABLES = (
    "events",
    "dedup",
    "jobs",
    "attempts",
    "paused_sources",
    "nodes",
    "leader",
    "lanes",
    "webhookd_schema",
)

# The lanes (priority, source, tenant) holding queued jobs after a cursor, in index order: a
# loose index scan, one seek on ``jobs_lane`` per lane however many jobs each holds.
# Every node runs this with each heartbeat: two index-only counts over the queue's partial
# indexes. ``state IN ('queued', 'running')`` would scan the whole table, finished jobs and all
# (150 ms at 500,000 done jobs, against 0.4 ms).
BACKLOG_SQL = (
    "SELECT (SELECT COUNT(*) FROM jobs WHERE state = 'queued')"
    " + (SELECT COUNT(*) FROM jobs WHERE state = 'running')"
)
_LANES_SQL = """
WITH RECURSIVE lane(p, s, t) AS (
  (SELECT priority, source, tenant FROM jobs WHERE state = 'queued'
     AND (priority, source, tenant) > ($1::integer, $2::text, $3::text)
   ORDER BY priority, source, tenant LIMIT 1)
  UNION ALL
  SELECT nxt.priority, nxt.source, nxt.tenant FROM lane CROSS JOIN LATERAL (
    SELECT priority, source, tenant FROM jobs WHERE state = 'queued'
      AND (priority, source, tenant) > (lane.p, lane.s, lane.t)
    ORDER BY priority, source, tenant LIMIT 1) nxt
)
SELECT p, s, t FROM lane LIMIT $4
"""


# For each lane ($1-$3, in order) up to $4 of its due jobs ($5: now), the longest due first:
# a seek into ``jobs_lane`` (…, run_at, seq) that reads only due jobs, so those waiting out a
# retry's backoff, first in their lane by seq, are not walked past at every refill.
READY_IN_LANES_SQL = (
    "SELECT r.id, r.source, r.action, r.priority, r.tenant, r.order_key, r.seq"
    " FROM unnest($1::integer[], $2::text[], $3::text[], $4::integer[])"
    " WITH ORDINALITY AS w(p, s, t, n, i) CROSS JOIN LATERAL ("
    f" SELECT {READY_COLUMNS}, j.run_at FROM jobs j WHERE j.state = 'queued'"
    " AND j.priority = w.p AND j.source = w.s AND j.tenant = w.t AND j.behind IS NULL"
    f" AND j.run_at <= $5 AND {HEAD_OF_KEY} ORDER BY j.run_at, j.seq LIMIT w.n) r"
    " ORDER BY w.i, r.run_at, r.seq"
)


class PgReads:
    """The read half of ``PostgresJournal``; it needs ``fetch``, ``clock``, ``node_id`` and
    ``lease_s``."""

    clock: Clock
    node_id: str
    lease_s: float
    config_digest: str | None

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def ready(
        self, now: float, limit: int, exclude: Iterable[str] = (), paused: Iterable[str] = ()
    ) -> list[Ready]:
        skip = set(exclude)
        rows = await self.fetch(
            f"SELECT {READY_COLUMNS} FROM jobs j WHERE j.state = 'queued' AND j.run_at <= $1"
            f" AND j.source <> ALL($2::text[]) AND j.behind IS NULL AND {HEAD_OF_KEY}"
            " ORDER BY j.priority, j.seq LIMIT $3",
            now,
            sorted(paused),
            limit + len(skip),
        )
        return [Ready(*r) for r in rows if r[0] not in skip][:limit]

    async def ready_in_lanes(self, now: float, wants: Sequence[tuple[Lane, int]]) -> list[Ready]:
        if not wants:
            return []
        rows = await self.fetch(
            READY_IN_LANES_SQL,
            [lane[0] for lane, _ in wants],
            [lane[1] for lane, _ in wants],
            [lane[2] for lane, _ in wants],
            [n for _, n in wants],
            now,
        )
        return [Ready(*r) for r in rows]

    async def queued_lanes(self, after: Lane | None, limit: int) -> list[Lane]:
        p, s, t = after if after is not None else (-1, "", "")  # -1: before every priority
        rows = await self.fetch(_LANES_SQL, p, s, t, limit)
        return [(int(r[0]), r[1], r[2]) for r in rows]

    async def lane_backlog(self) -> list[LaneBacklog]:
        rows = await self.fetch(
            "SELECT priority, source, tenant, COUNT(*),"
            " MIN(run_at) FILTER (WHERE run_at <= $1::double precision)"
            " FROM jobs WHERE state = 'queued'"
            " GROUP BY priority, source, tenant ORDER BY COUNT(*) DESC, priority",
            self.clock.time(),
        )
        return [LaneBacklog((int(r[0]), r[1], r[2]), int(r[3]), r[4]) for r in rows]

    async def next_run_at(
        self, paused: Iterable[str] = (), after: float | None = None
    ) -> float | None:
        value = await self._value(
            "SELECT MIN(run_at) FROM jobs WHERE state = 'queued'"
            " AND source <> ALL($1::text[]) AND ($2::double precision IS NULL OR run_at > $2)",
            sorted(paused),
            after,
        )
        return float(value) if value is not None else None

    async def backlog(self) -> int:
        return int(await self._value(BACKLOG_SQL))

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
        # $7: dismissed (a cancelled job with dismissed_at), not (cancelled without), or either.
        dismissed = {"dismissed": True, "cancelled": False}.get(state)
        states = {"dismissed": ["cancelled"], "unfinished": ["queued", "running"]}
        rows = await self.fetch(
            "SELECT DISTINCT j.event_id FROM jobs j JOIN events e ON e.id = j.event_id"
            " WHERE j.state = ANY($4::text[])"
            " AND ($7::boolean IS NULL OR (j.dismissed_at IS NOT NULL) = $7)"
            " AND ($1::text IS NULL OR e.source = $1)"
            " AND ($2::double precision IS NULL OR e.received_at >= $2)"
            " AND ($5::text IS NULL OR j.event_id > $5)"
            " AND ($6::text[] IS NULL OR e.tenant = ANY($6::text[]))"
            " AND ($8::text IS NULL OR j.action = $8)"
            " AND ($9::double precision IS NULL OR e.received_at < $9)"
            " ORDER BY j.event_id LIMIT $3",
            source,
            since,
            limit,
            states.get(state, [state]),
            after,
            list(tenant_forms(tenant)) if tenant is not None else None,
            dismissed,
            action,
            until,
        )
        return [r[0] for r in rows]

    async def key_owner(self, dedup_key: str) -> tuple[str, float] | None:
        rows = await self.fetch("SELECT event_id, created_at FROM dedup WHERE key = $1", dedup_key)
        return (rows[0][0], rows[0][1]) if rows else None

    async def get_event(self, event_id: str) -> EventDetail:
        # The jobs first (see BaseJournal.get_event): a prune between the two reads is NotFound.
        jobs = await self.fetch(job_history_sql("$1"), event_id)
        rows = await self.fetch(
            f"SELECT {EVENT_COLUMNS}, e.filtered FROM events e WHERE e.id = $1", event_id
        )
        if not rows:
            raise NotFound(event_id)
        return event_detail(rows[0], jobs)

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
        where = [
            "($1::text IS NULL OR e.source = $1)",
            "($2::double precision IS NULL OR e.received_at >= $2)",
        ]
        args: list[Any] = [source, since, limit]
        if tenant is not None:
            where.append(f"e.tenant = ANY(${len(args) + 1}::text[])")
            args.append(list(tenant_forms(tenant)))
        if contains is not None:
            where.append(f"position(${len(args) + 1}::bytea in e.body) > 0")
            args.append(contains)
        if before is not None:  # by insert order, as the listing goes (see BaseJournal)
            seq = await self._value("SELECT seq FROM events WHERE id = $1", before)
            n = len(args) + 1
            where.append(f"e.seq < ${n}::bigint" if seq is not None else f"e.id < ${n}::text")
            args.append(seq if seq is not None else before)
        if positions is not None:
            n = len(args) + 1
            where.append(f"e.seq > ${n}::bigint AND e.seq <= ${n + 1}::bigint")
            args.extend(positions)
        if state is not None:
            where.append(STATE_FILTERS[state])  # a fixed clause chosen by name, not user text
        rows = await self.fetch(
            "SELECT e.id, e.source, e.received_at, e.tenant, e.priority,"
            " (SELECT string_agg(state, ',') FROM jobs WHERE event_id = e.id) AS states,"
            " (SELECT COUNT(*) FROM jobs WHERE event_id = e.id) AS njobs FROM events e"
            f" WHERE {' AND '.join(where)} ORDER BY e.seq DESC LIMIT $3",
            *args,
        )
        return [
            EventSummary(
                id=r[0],
                source=r[1],
                received_at=r[2],
                tenant=r[3],
                priority=Priority(r[4]).label,
                state=event_state(r[5].split(",") if r[5] else []),
                jobs=int(r[6]),
            )
            for r in rows
        ]

    async def position(self) -> int:
        return int(await self._value("SELECT COALESCE(MAX(seq), 0) FROM events"))

    async def counts(self, keep: Collection[str] = (), most: int = CATCH_ALL_SHOWN) -> Counts:
        rows = await self.fetch(
            "WITH c AS (SELECT source, state, COUNT(*) AS n FROM jobs GROUP BY source, state),"
            " shown AS (SELECT source FROM c WHERE NOT source = ANY($1::text[])"
            ' GROUP BY source ORDER BY SUM(n) DESC, source COLLATE "C" LIMIT $2)'
            " SELECT CASE WHEN source = ANY($1::text[]) OR source IN (SELECT source FROM shown)"
            " THEN source ELSE $3 END, state, SUM(n) FROM c GROUP BY 1, 2",
            kept_sources(keep),
            most,
            CATCH_ALL,
        )
        oldest = await self._value(
            "SELECT MIN(run_at) FROM jobs WHERE state = 'queued'"
            " AND run_at <= $1::double precision",
            self.clock.time(),
        )
        events = await self._value("SELECT COUNT(*) FROM events")
        return Counts.of(rows, oldest, int(events))

    async def dead_causes(
        self,
        limit: int = 10,
        names: Collection[str] | None = None,
        other: str = "*",
        other_actions: Collection[str] | None = None,
    ) -> list[DeadCause]:
        rows = await self.fetch(
            "SELECT CASE WHEN $2::text[] IS NULL OR source = ANY($2::text[])"
            " OR ($4::text[] IS NOT NULL AND action <> ALL($4::text[])) THEN source"
            f" ELSE $3 END AS named, action, left(last_error, {CAUSE_CHARS}) AS cause,"
            " COUNT(*), MAX(finished_at) FROM jobs WHERE state = 'dead'"
            " GROUP BY named, action, cause ORDER BY COUNT(*) DESC, MAX(finished_at) DESC"
            " LIMIT $1",
            limit,
            sorted(names) if names is not None else None,
            other,
            sorted(other_actions) if other_actions is not None else None,
        )
        return [DeadCause(r[0], r[1], r[2], int(r[3]), float(r[4] or 0)) for r in rows]

    async def unfinished_by_action(self) -> dict[tuple[str, str], int]:
        rows = await self.fetch(UNFINISHED_BY_ACTION_SQL)
        return by_action(rows)

    async def storage_bytes(self) -> int:
        """The journal's tables with their indexes and TOAST, in the current schema."""
        value = await self._value(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname = ANY($1)",
            list(TABLES),
        )
        return int(value)

    async def identity(self) -> str:
        # Readable by any role: no server-wide identifier is (pg_control_system's is not).
        [row] = await self.fetch(
            "SELECT oid, pg_postmaster_start_time()::text FROM pg_database"
            " WHERE datname = current_database()"
        )
        return f"postgresql:{row[0]}:{row[1]}"

    async def sizes(self) -> dict[str, int]:
        return {"tables": await self.storage_bytes()}

    async def nodes(self, limit: int = 64) -> list[NodeInfo]:
        # Running jobs per node come from ``jobs_running``, one index range per node.
        rows = await self.fetch(
            "SELECT n.node_id, n.host, n.pid, n.started_at, n.heartbeat_at, (SELECT COUNT(*)"
            " FROM jobs j WHERE j.state = 'running' AND j.node_id = n.node_id),"
            " COALESCE(n.lease_s, $2), n.config_digest FROM nodes n WHERE n.stopped_at IS NULL"
            " ORDER BY n.started_at, n.node_id LIMIT $1",
            limit,
            self.lease_s,
        )
        now = self.clock.time()
        nodes = []
        for r in rows:
            stale = float(r[4]) < now - float(r[6])  # silent past its own lease
            nodes.append(
                NodeInfo(
                    r[0],
                    r[1] or "",
                    r[2],
                    float(r[3]),
                    float(r[4]),
                    int(r[5]),
                    this=r[0] == self.node_id,
                    stale=stale,
                    # Not said of a stale node, as ``compare_configs`` does not: what it ran
                    # is no config any node runs now.
                    same_config=(
                        None
                        if r[7] is None or self.config_digest is None or stale
                        else r[7] == self.config_digest
                    ),
                )
            )
        return nodes

    async def paused_sources(self) -> frozenset[str]:
        rows = await self.fetch("SELECT source FROM paused_sources")
        return frozenset(r[0] for r in rows)

    async def activity(self, window_s: float) -> Activity:
        since = self.clock.time() - window_s
        received = await self._value("SELECT COUNT(*) FROM events WHERE received_at >= $1", since)
        rows = await self.fetch(
            "SELECT outcome, COUNT(*) FROM attempts WHERE finished_at >= $1 GROUP BY outcome",
            since,
        )
        return Activity(window_s, int(received), {r[0]: int(r[1]) for r in rows})

    async def lane_calls(
        self, actions: Sequence[LaneAction], since: float, named: Collection[str] = ()
    ) -> dict[str, list[LaneCall]]:
        """The calls ``actions`` made through their lanes whose attempts ended after ``since``,
        by lane, oldest first, the latest ``most`` of each (see ``BaseJournal``): the window's
        attempts from ``attempts_finished``, each one's job by its id. The daemon does not ask:
        lanes on this journal are shared, their log kept in the ``lanes`` table."""
        if not actions:
            return {}
        rows = await self.fetch(
            "WITH called AS (SELECT w.lane, w.most, w.tokens, a.seq, a.job_id,"
            " row_number() OVER (PARTITION BY w.lane ORDER BY a.seq DESC) AS nth"
            " FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " JOIN unnest($2::text[], $3::text[], $4::text[], $5::integer[], $6::bigint[])"
            " AS w(source, action, lane, most, tokens) ON w.action = j.action"
            " AND (w.source = j.source OR (w.source = $7 AND j.source <> ALL($8::text[])))"
            " WHERE a.finished_at > $1)"
            # The rows and answers of the calls kept only (an answer is up to 64 KiB).
            " SELECT c.lane, a.started_at, a.finished_at, a.outcome, a.detail,"
            " CASE WHEN a.outcome = 'done' THEN j.result END, c.tokens"
            " FROM called c JOIN attempts a ON a.seq = c.seq JOIN jobs j ON j.id = c.job_id"
            " WHERE c.nth <= c.most",
            since,
            [a.source for a in actions],
            [a.action for a in actions],
            [a.lane for a in actions],
            [a.most for a in actions],
            [a.tokens for a in actions],
            CATCH_ALL,
            sorted(named),
        )
        return calls_by_lane(rows)

    async def _value(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def oldest_queued_event_ids(self, limit: int, exclude_source: str) -> list[str]:
        """The events of the oldest queued jobs (of any source but ``exclude_source``), oldest
        first, at most ``limit`` of them: what a backlog alert names."""
        rows = await self.fetch(
            "SELECT event_id FROM jobs WHERE state = 'queued' AND run_at <= $3::double precision"
            " AND source <> $1 ORDER BY run_at, seq LIMIT $2",
            exclude_source,
            limit * 4,  # an event may hold several queued jobs
            self.clock.time(),
        )
        return list(dict.fromkeys(r[0] for r in rows))[:limit]

    async def dead_between(
        self, after: float, before: float, limit: int, exclude_source: str
    ) -> DeadJobs:
        window = " AND finished_at > $1::double precision AND finished_at < $2::double precision"
        counted = await self.fetch(
            f"SELECT source, COUNT(*) FROM jobs WHERE state = 'dead'{window} AND source <> $3"
            " GROUP BY source",
            after,
            before,
            exclude_source,
        )
        rows = await self.fetch(
            f"SELECT event_id, source, action, last_error FROM jobs WHERE state = 'dead'{window}"
            " AND source <> $3 ORDER BY finished_at DESC, seq DESC LIMIT $4",
            after,
            before,
            exclude_source,
            limit,
        )
        return DeadJobs(
            {r[0]: int(r[1]) for r in counted}, [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]
        )

    async def expired_events(self, *, keep_done_s: float, keep_dead_s: float) -> int:
        """How many events ``prune`` with these windows would delete now (for a progress bar)."""
        now = self.clock.time()
        done_before, dead_before = now - keep_done_s, now - keep_dead_s
        rows = await self.fetch(
            "SELECT count(*) FROM events e WHERE e.received_at < $1 AND NOT EXISTS (SELECT 1"
            " FROM jobs j WHERE j.event_id = e.id AND (j.state IN ('queued', 'running') OR"
            " (j.state IN ('done', 'cancelled') AND j.finished_at > $1) OR"
            " (j.state = 'dead' AND j.finished_at > $2)))",
            done_before,
            dead_before,
        )
        return int(rows[0][0])

    async def series(
        self, *, now: float, minutes: int, source: str | None = None, step_s: int = 60
    ) -> Series:
        """As the SQLite journal's ``series``: accepted, done and dead per step and the backlog at
        each step's end, from three bounded reads (``events_received``, ``jobs_finished``, and
        the unfinished jobs now), counted back from the backlog now."""
        end = (int(now // step_s) + 1) * step_s
        start = float(end - minutes * step_s)
        last = minutes - 1

        def step(value: Any) -> int:
            return min(max(int(value), 0), last)

        accepted, created, done, dead, ended = ([0] * minutes for _ in range(5))
        for at, events, jobs in await self.fetch(
            "SELECT floor((received_at - $1) / $2)::integer AS step, count(*),"
            " sum((SELECT count(*) FROM jobs j WHERE j.event_id = e.id))"
            " FROM events e WHERE received_at >= $1 AND ($3::text IS NULL OR source = $3)"
            " GROUP BY step",
            start,
            float(step_s),
            source,
        ):
            accepted[step(at)] += events
            created[step(at)] += int(jobs or 0)
        for state, at, n in await self.fetch(
            "SELECT state, floor((finished_at - $1) / $2)::integer AS step, count(*) FROM jobs"
            " WHERE state IN ('done', 'dead', 'cancelled') AND finished_at >= $1"
            " AND ($3::text IS NULL OR source = $3) GROUP BY state, step",
            start,
            float(step_s),
            source,
        ):
            ended[step(at)] += n
            if state == "done":
                done[step(at)] += n
            elif state == "dead":
                dead[step(at)] += n
        rows = await self.fetch(
            "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
            " AND ($1::text IS NULL OR source = $1)",
            source,
        )
        unfinished = int(rows[0][0])
        backlog = [0] * minutes
        for i in range(last, -1, -1):
            backlog[i] = max(unfinished, 0)
            unfinished += ended[i] - created[i]
        return Series(start, step_s, tuple(accepted), tuple(done), tuple(dead), tuple(backlog))
