"""The journal's queries: everything that only reads, on the aiosqlite reader connection.

WAL lets these run beside the writer (and beside other processes' writes) without blocking it.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from webhookd.clock import Clock
from webhookd.config.sections import CATCH_ALL
from webhookd.errors import JournalError, JournalNewer, NotFound
from webhookd.journal.files import foreign, not_a_journal
from webhookd.journal.moved import FileIds
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
    Peeked,
    Ready,
    Series,
    by_action,
    calls_by_lane,
    kept_sources,
)
from webhookd.journal.schema import (
    BACKLOG_SQL,
    EVENT_COLUMNS,
    EXPIRED,
    HEAD_OF_KEY,
    LANES_PER_QUERY,
    LANES_SQL,
    MIGRATIONS,
    READY_COLUMNS,
    STATE_FILTERS,
    STATE_JOBS,
    event_detail,
    fetch,
    few_jobs_sql,
    job_history_sql,
    key_digest,
)
from webhookd.models import Priority, event_state, tenant_forms

# Queued or running jobs by (source, action), each state through its partial index: an IN on the
# table scans every job kept.
UNFINISHED_BY_ACTION_SQL = (
    "SELECT source, action, COUNT(*) FROM (SELECT source, action FROM jobs"
    " WHERE state = 'queued' UNION ALL SELECT source, action FROM jobs"
    " WHERE state = 'running') GROUP BY source, action"
)


def peek(path: Path) -> Peeked:
    """``Peeked`` of the SQLite journal at ``path``, read through a read-only connection of
    its own: no schema upgrade, no file created, nothing written, beside a running daemon or
    none (``check``). Nothing when there is no journal yet; ``JournalError`` when it cannot be
    read (another user's file, a schema newer than this webhookd's, another program's
    database); nothing either for an empty one (a ``touch``), where ``serve`` makes it."""
    if not path.exists():
        return Peeked({}, 0)
    # Read-only, SQLite still creates a WAL journal's -wal and -shm files when they are not
    # there, as the user reading (root, say), which a daemon of another user could then not
    # open. Without a -wal file (no daemon has it open: the last to close removed it) every
    # commit is in the file itself, which is then read as it is, with no lock and no file of
    # its own; with one, the daemon's -wal and -shm are read beside it.
    wal, shm = (path.with_name(path.name + end) for end in ("-wal", "-shm"))
    if wal.exists() != shm.exists():
        raise JournalError(f"{path}: its -wal or -shm file is missing: not read")
    how = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{how}", uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: {exc}") from None
    try:
        if foreign(conn):
            raise JournalError(not_a_journal(path))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if not version:  # no table at all, or foreign() would have said so
            return Peeked({}, 0)
        if version > len(MIGRATIONS):
            raise JournalNewer(
                f"{path} has schema version {version}, newer than this webhookd understands"
                f" ({len(MIGRATIONS)})"
            )
        rows = conn.execute(UNFINISHED_BY_ACTION_SQL).fetchall()
        events = None
        if 0 < version < len(MIGRATIONS):  # what the upgrade will go through, for its note
            events = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: {exc}") from None
    finally:
        conn.close()
    return Peeked(by_action(rows), version, events)


# How much earlier than the attempt appended before it an attempt may have ended (``activity``):
# an outcome the journal could not take is tried again until it can, and later ones may be
# committed first meanwhile; one held back by an outage longer than this may go uncounted.
_ENDED_BEFORE_APPENDED_S = 600.0

# The lane counts ``ready_in_lanes`` pads a statement to (the last is ``LANES_PER_QUERY``).
_LANES_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, LANES_PER_QUERY)


class Reads:
    """The read half of ``Journal``; it needs ``reader``, ``clock``, ``path``, ``node_id``,
    ``opened_at`` and ``_opened_as``."""

    path: Path
    clock: Clock
    node_id: str
    opened_at: float
    _opened_as: FileIds | None  # what the path named at open (None: not open, or no file)

    @property
    def reader(self) -> aiosqlite.Connection:
        raise NotImplementedError

    async def ready(
        self, now: float, limit: int, exclude: Iterable[str] = (), paused: Iterable[str] = ()
    ) -> list[Ready]:
        """Due queued jobs that may start, highest priority and oldest first, skipping
        ``exclude`` and the jobs of ``paused`` sources.

        A job whose (source, action, order key) has an older unfinished job is not returned: it
        waits for that one to be done or dead, whichever process or boot is running it.
        """
        skip = set(exclude)
        held = sorted(paused)
        not_paused = f" AND j.source NOT IN ({','.join('?' * len(held))})" if held else ""
        rows = await fetch(
            self.reader,
            f"SELECT {READY_COLUMNS} FROM jobs j WHERE j.state = 'queued' AND j.run_at <= ?"
            f"{not_paused} AND j.behind IS NULL AND {HEAD_OF_KEY}"
            " ORDER BY j.priority, j.seq LIMIT ?",
            (now, *held, limit + len(skip)),
        )
        out = [Ready(*r) for r in rows if r[0] not in skip]
        return out[:limit]

    async def ready_in_lanes(self, now: float, wants: Sequence[tuple[Lane, int]]) -> list[Ready]:
        """For each (lane, n): up to n of the lane's due jobs that may start (as ``ready``),
        the longest due first. One statement per ``LANES_PER_QUERY`` lanes, each part a seek
        into ``jobs_lane`` that reads only due jobs: those waiting out a backoff come after."""
        part = (
            f"SELECT * FROM (SELECT {READY_COLUMNS} FROM jobs j WHERE j.state = 'queued'"
            " AND j.priority = ? AND j.source = ? AND j.tenant = ? AND j.behind IS NULL"
            f" AND j.run_at <= ? AND {HEAD_OF_KEY} ORDER BY j.run_at, j.seq LIMIT ?)"
        )
        out: list[Ready] = []
        for start in range(0, len(wants), LANES_PER_QUERY):
            chunk = list(wants[start : start + LANES_PER_QUERY])
            # Padded to one of a few sizes with parts that read nothing (LIMIT 0): each size is
            # a statement of its own in the connection's cache, and one per lane count kept up
            # to 128 statements of up to 200 parts compiled (88 MB more RSS after one of each
            # count from 1 to 200, against 5 MB padded).
            size = next(s for s in _LANES_SIZES if s >= len(chunk))
            chunk += [(chunk[-1][0], 0)] * (size - len(chunk))
            args = [arg for lane, n in chunk for arg in (*lane, now, n)]
            rows = await fetch(self.reader, " UNION ALL ".join([part] * size), args)
            out.extend(Ready(*r) for r in rows)
        return out

    async def queued_lanes(self, after: Lane | None, limit: int) -> list[Lane]:
        """Lanes holding queued jobs (due or not), in (priority, source, tenant) order, starting
        after ``after`` (from the first when ``None``); at most ``limit``."""
        p, s, t = after if after is not None else (-1, "", "")  # -1: before every priority
        rows = await fetch(self.reader, LANES_SQL, {"p": p, "s": s, "t": t, "n": limit})
        return [(int(r[0]), r[1], r[2]) for r in rows]

    async def lane_backlog(self) -> list[LaneBacklog]:
        """Queued jobs per lane with when the one due longest fell due, biggest lanes first."""
        rows = await fetch(
            self.reader,
            "SELECT priority, source, tenant, COUNT(*), MIN(CASE WHEN run_at <= ? THEN run_at END)"
            " FROM jobs WHERE state = 'queued'"
            " GROUP BY priority, source, tenant ORDER BY COUNT(*) DESC, priority",
            (self.clock.time(),),
        )
        return [LaneBacklog((int(r[0]), r[1], r[2]), int(r[3]), r[4]) for r in rows]

    async def next_run_at(
        self, paused: Iterable[str] = (), after: float | None = None
    ) -> float | None:
        """When the earliest queued job (of a source not paused) becomes due; ``None`` if none.
        With ``after``, the earliest falling due later than that (jobs due now but waiting
        behind an older job of their order key would otherwise always be "next")."""
        held = sorted(paused)
        sql = "SELECT MIN(run_at) FROM jobs WHERE state = 'queued'"
        if held:
            sql += f" AND source NOT IN ({','.join('?' * len(held))})"
        args: list[Any] = list(held)
        if after is not None:
            sql += " AND run_at > ?"
            args.append(after)
        rows = await fetch(self.reader, sql, args)
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def backlog(self) -> int:
        """Jobs not yet finished (queued or running)."""
        rows = await fetch(self.reader, BACKLOG_SQL)
        return int(rows[0][0])

    async def oldest_queued_event_ids(self, limit: int, exclude_source: str) -> list[str]:
        """The events of the queued jobs due longest (of any source but ``exclude_source``),
        longest first, at most ``limit`` of them: what a backlog alert names."""
        rows = await fetch(
            self.reader,
            "SELECT event_id FROM jobs WHERE state = 'queued' AND run_at <= ? AND source != ?"
            " ORDER BY run_at, seq LIMIT ?",
            (self.clock.time(), exclude_source, limit * 4),  # an event may hold several jobs
        )
        return list(dict.fromkeys(r[0] for r in rows))[:limit]

    async def dead_between(
        self, after: float, before: float, limit: int, exclude_source: str
    ) -> DeadJobs:
        window = (after, before, exclude_source)
        # Through jobs_finished, which holds the dead jobs by finished_at.
        counted = await fetch(
            self.reader,
            "SELECT source, COUNT(*) FROM jobs WHERE state = 'dead' AND finished_at > ?"
            " AND finished_at < ? AND source != ? GROUP BY source",
            window,
        )
        rows = await fetch(
            self.reader,
            "SELECT event_id, source, action, last_error FROM jobs WHERE state = 'dead'"
            " AND finished_at > ? AND finished_at < ? AND source != ?"
            " ORDER BY finished_at DESC, seq DESC LIMIT ?",
            (*window, limit),
        )
        return DeadJobs(
            {r[0]: int(r[1]) for r in counted}, [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]
        )

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
        # Read from the index that holds the jobs in that state, whose WHERE the state's fixed
        # clause states (``state`` is the jobs' column: events have none). Left to itself, the
        # planner walked every job in ``jobs_event`` order to skip a sort.
        if state == "unfinished":  # queued or running: one read from each one's index
            found: set[str] = set()
            for index, jobs_in in (
                ("jobs_due", STATE_JOBS["queued"]),
                ("jobs_running", STATE_JOBS["running"]),
            ):
                found.update(
                    await self._event_ids_in(
                        index, jobs_in, source, since, limit, after, tenant, action, until
                    )
                )
            return sorted(found)[:limit]
        index = "jobs_due" if state == "queued" else "jobs_finished"
        if state == "dismissed":
            jobs_in = f"{STATE_JOBS['cancelled']} AND j.dismissed_at IS NOT NULL"
        elif state == "cancelled":
            jobs_in = f"{STATE_JOBS['cancelled']} AND j.dismissed_at IS NULL"
        elif state == "done":  # not in STATE_JOBS: a done event may have no job at all
            jobs_in = "state = 'done' AND state IN ('done', 'dead', 'cancelled')"
        else:
            jobs_in = STATE_JOBS[state]
        return await self._event_ids_in(
            index, jobs_in, source, since, limit, after, tenant, action, until
        )

    async def _event_ids_in(
        self,
        index: str,
        jobs_in: str,
        source: str | None,
        since: float | None,
        limit: int,
        after: str | None,
        tenant: str | None,
        action: str | None,
        until: float | None,
    ) -> list[str]:
        sql = (
            f"SELECT DISTINCT j.event_id FROM jobs j INDEXED BY {index}"
            f" JOIN events e ON e.id = j.event_id WHERE {jobs_in}"
        )
        args: list[Any] = []
        if source is not None:
            sql += " AND e.source = ?"
            args.append(source)
        if since is not None:
            sql += " AND e.received_at >= ?"
            args.append(since)
        if until is not None:
            sql += " AND e.received_at < ?"
            args.append(until)
        if tenant is not None:
            sql += " AND e.tenant IN (?, ?)"
            args.extend(tenant_forms(tenant))
        if action is not None:
            sql += " AND j.action = ?"
            args.append(action)
        if after is not None:
            sql += " AND j.event_id > ?"
            args.append(after)
        sql += " ORDER BY j.event_id LIMIT ?"
        args.append(limit)
        rows = await fetch(self.reader, sql, args)
        return [r[0] for r in rows]

    async def expired_events(self, *, keep_done_s: float, keep_dead_s: float) -> int:
        """How many events ``prune`` with these windows would delete now (for a progress bar:
        a range of ``events_received``, each event's jobs probed through ``jobs_event``)."""
        now = self.clock.time()
        done_before, dead_before = now - keep_done_s, now - keep_dead_s
        rows = await fetch(
            self.reader,
            f"SELECT COUNT(*) FROM events e WHERE e.received_at < ? AND {EXPIRED}",
            (done_before, done_before, dead_before),
        )
        return int(rows[0][0])

    async def key_owner(self, dedup_key: str) -> tuple[str, float] | None:
        rows = await fetch(
            self.reader,
            "SELECT event_id, created_at FROM dedup WHERE digest = ?",
            (key_digest(dedup_key),),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def get_event(self, event_id: str) -> EventDetail:
        # The jobs first (see BaseJournal.get_event): a prune between the two reads is NotFound.
        jobs = await fetch(self.reader, job_history_sql("?"), (event_id,))
        rows = await fetch(
            self.reader,
            f"SELECT {EVENT_COLUMNS}, e.filtered FROM events e WHERE e.id = ?",
            (event_id,),
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
        """Newest first. ``state`` filters on the derived event state."""
        where: list[str] = []
        args: list[Any] = []
        if source is not None:
            where.append("e.source = ?")
            args.append(source)
        if tenant is not None:
            where.append("e.tenant IN (?, ?)")
            args.extend(tenant_forms(tenant))
        if before is not None:  # by insert order, as the listing goes (see BaseJournal)
            found = await fetch(self.reader, "SELECT seq FROM events WHERE id = ?", (before,))
            where.append("e.seq < ?" if found else "e.id < ?")
            args.append(found[0][0] if found else before)
        if since is not None:
            where.append("e.received_at >= ?")
            args.append(since)
        if positions is not None:  # a seek of the rowid (or of events_source, with a source)
            where.append("e.seq > ? AND e.seq <= ?")
            args.extend(positions)
        if contains is not None:  # instr() on two BLOBs compares bytes
            where.append("instr(e.body, ?) > 0")
            args.append(contains)
        if state is not None:
            jobs_in = STATE_JOBS.get(state)
            if jobs_in is not None and (await fetch(self.reader, few_jobs_sql(jobs_in)))[0][0]:
                where.append(f"e.id IN (SELECT event_id FROM jobs WHERE {jobs_in})")
            where.append(STATE_FILTERS[state])
        sql = (
            "SELECT e.id, e.source, e.received_at, e.tenant, e.priority,"
            " (SELECT group_concat(state) FROM jobs WHERE event_id = e.id) AS states,"
            " (SELECT COUNT(*) FROM jobs WHERE event_id = e.id) AS njobs FROM events e"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.seq DESC LIMIT ?"
        args.append(limit)
        rows = await fetch(self.reader, sql, args)
        return [
            EventSummary(
                id=r[0],
                source=r[1],
                received_at=r[2],
                tenant=r[3],
                priority=Priority(r[4]).label,
                state=event_state(r[5].split(",") if r[5] else []),
                jobs=r[6],
            )
            for r in rows
        ]

    async def position(self) -> int:
        rows = await fetch(self.reader, "SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(rows[0][0])

    async def counts(self, keep: Collection[str] = (), most: int = CATCH_ALL_SHOWN) -> Counts:
        # Plain SQL any SQLite with CTEs runs (no MATERIALIZED, no JSON functions); from 3.35
        # a CTE used twice is counted once. The kept names are named parameters, each used
        # twice (named, not numbered: Python 3.12.0-3.12.3 warn of numbered ones bound by
        # position); an empty list is SQLite's ``IN ()``.
        names = kept_sources(keep)
        kept = ", ".join(f":k{i}" for i in range(len(names)))
        rows = await fetch(
            self.reader,
            "WITH c AS (SELECT source, state, COUNT(*) AS n FROM jobs GROUP BY source, state),"
            f" shown AS (SELECT source FROM c WHERE source NOT IN ({kept})"
            " GROUP BY source ORDER BY SUM(n) DESC, source LIMIT :most)"
            f" SELECT CASE WHEN source IN ({kept}) OR source IN (SELECT source FROM shown)"
            " THEN source ELSE :rest END AS name, state, SUM(n) FROM c GROUP BY name, state",
            {"most": most, "rest": CATCH_ALL, **{f"k{i}": n for i, n in enumerate(names)}},
        )
        oldest = await fetch(
            self.reader,
            "SELECT MIN(run_at) FROM jobs WHERE state = 'queued' AND run_at <= ?",
            (self.clock.time(),),
        )
        events = await fetch(self.reader, "SELECT COUNT(*) FROM events")
        return Counts.of(rows, oldest[0][0], int(events[0][0]))

    async def dead_causes(
        self,
        limit: int = 10,
        names: Collection[str] | None = None,
        other: str = "*",
        other_actions: Collection[str] | None = None,
    ) -> list[DeadCause]:
        named = "source"
        args: tuple[Any, ...] = (limit,)
        if names is not None:
            kept = "source IN (SELECT value FROM json_each(?))"
            args = (json.dumps(sorted(names)), other, limit)
            if other_actions is not None:
                kept += " OR action NOT IN (SELECT value FROM json_each(?))"
                args = (args[0], json.dumps(sorted(other_actions)), *args[1:])
            named = f"CASE WHEN {kept} THEN source ELSE ? END"
        # The dead jobs through ``jobs_finished``, whose WHERE ``STATE_JOBS`` repeats: read
        # from the table, 6,000 among 500,000 jobs took 115 ms, and 30-50 this way; 494,000
        # jobs in one state took 1.4 s either way.
        rows = await fetch(
            self.reader,
            f"SELECT {named} AS named, action, substr(last_error, 1, {CAUSE_CHARS}) AS cause,"
            f" COUNT(*), MAX(finished_at) FROM jobs WHERE {STATE_JOBS['dead']}"
            " GROUP BY named, action, cause ORDER BY COUNT(*) DESC, MAX(finished_at) DESC"
            " LIMIT ?",
            args,
        )
        return [DeadCause(r[0], r[1], r[2], int(r[3]), float(r[4] or 0)) for r in rows]

    async def unfinished_by_action(self) -> dict[tuple[str, str], int]:
        rows = await fetch(self.reader, UNFINISHED_BY_ACTION_SQL)
        return by_action(rows)

    async def size_bytes(self) -> int:
        """The journal's size on disk: the main file plus its WAL."""
        return sum(self.file_bytes().values())

    async def identity(self) -> str:
        """The (device, inode) of the file this journal opened, recorded then (``FileIds``):
        not what the path names now, which a removal or a file put there changes (the daemon
        sees that within a second, ``watch``). Read from the path only when nothing was
        recorded (not open); ``JournalError`` when that finds no file."""
        opened = self._opened_as
        if opened is not None:
            device, inode = opened.db
            return f"sqlite:{device}:{inode}"
        try:
            found = os.stat(self.path)
        except OSError as exc:
            raise JournalError(f"journal {self.path}: {exc.strerror or exc}") from None
        return f"sqlite:{found.st_dev}:{found.st_ino}"

    def file_bytes(self) -> dict[str, int]:
        sizes = {}
        for name, path in (
            ("db", self.path),
            ("wal", self.path.with_name(self.path.name + "-wal")),
        ):
            try:
                sizes[name] = path.stat().st_size
            except FileNotFoundError:  # a WAL is there only while a connection is open
                sizes[name] = 0
        return sizes

    async def nodes(self, limit: int = 64) -> list[NodeInfo]:
        """This process, the file's only node: its running jobs are every running job (those of
        an earlier boot are re-queued at start)."""
        if limit < 1:
            return []
        rows = await fetch(self.reader, "SELECT COUNT(*) FROM jobs WHERE state = 'running'")
        now = self.clock.time()
        return [
            NodeInfo(
                self.node_id,
                socket.gethostname(),
                os.getpid(),
                self.opened_at,
                now,
                int(rows[0][0]),
                this=True,
                stale=False,
            )
        ]

    async def paused_sources(self) -> frozenset[str]:
        rows = await fetch(self.reader, "SELECT source FROM paused_sources")
        return frozenset(r[0] for r in rows)

    async def activity(self, window_s: float) -> Activity:
        """Events received and attempts by outcome over the last ``window_s`` seconds."""
        since = self.clock.time() - window_s
        received = await fetch(
            self.reader, "SELECT COUNT(*) FROM events WHERE received_at >= ?", (since,)
        )
        first = await self._attempts_from(since - _ENDED_BEFORE_APPENDED_S)
        rows = await fetch(
            self.reader,
            "SELECT outcome, COUNT(*) FROM attempts WHERE seq >= ? AND finished_at >= ?"
            " GROUP BY outcome",
            (first, since),
        )
        return Activity(window_s, int(received[0][0]), {r[0]: int(r[1]) for r in rows})

    async def lane_calls(
        self, actions: Sequence[LaneAction], since: float, named: Collection[str] = ()
    ) -> dict[str, list[LaneCall]]:
        """The calls ``actions`` made through their lanes whose attempts ended after ``since``,
        by lane, oldest first, the latest ``most`` of each (see ``BaseJournal``).

        ``finished_at`` has no index here (see ``_attempts_from``), and none is added: the
        attempts of the window are those from the ``seq`` found by halving (with the same
        allowance for outcomes written late as ``activity``), read in rowid order, each one's
        job by its id, and the answers of the calls kept only. Measured on a journal of 100,000
        attempts, one in five a lane's: 0.7-1.3 ms when they span a day, 5-8 ms an hour, 19-27
        ms when all are of the last ten minutes (every one read, 10,000 in the window)."""
        if not actions:
            return {}
        wanted = ", ".join("(?, ?, ?, ?, ?)" for _ in actions)
        rows_of = [(a.source, a.action, a.lane, a.most, a.tokens) for a in actions]
        first = await self._attempts_from(since - _ENDED_BEFORE_APPENDED_S)
        rows = await fetch(
            self.reader,
            f"WITH wanted(source, action, lane, most, tokens) AS (VALUES {wanted}),"
            # CROSS JOIN keeps this order: the window's attempts by rowid, then each one's
            # job by its id (no index has jobs by action).
            " called AS (SELECT w.lane, w.most, w.tokens, a.seq, a.job_id,"
            " ROW_NUMBER() OVER (PARTITION BY w.lane ORDER BY a.seq DESC) AS nth"
            " FROM attempts a CROSS JOIN jobs j CROSS JOIN wanted w"
            " WHERE a.seq >= ? AND a.finished_at > ? AND j.id = a.job_id"
            " AND w.action = j.action AND (w.source = j.source OR (w.source = ?"
            " AND j.source NOT IN (SELECT value FROM json_each(?)))))"
            # The rows and answers of the calls kept only (an answer is up to 64 KiB).
            " SELECT c.lane, a.started_at, a.finished_at, a.outcome, a.detail,"
            " CASE WHEN a.outcome = 'done' THEN j.result END, c.tokens"
            " FROM called c CROSS JOIN attempts a CROSS JOIN jobs j"
            " WHERE c.nth <= c.most AND a.seq = c.seq AND j.id = c.job_id",
            (
                *(v for row in rows_of for v in row),
                first,
                since,
                CATCH_ALL,
                json.dumps(sorted(named)),
            ),
        )
        return calls_by_lane(rows)

    async def _attempts_from(self, since: float) -> int:
        """The ``seq`` from which on the attempts ended at ``since`` or later, found by halving
        the ``seq`` range: the daemon appends an attempt as it ends, so ``finished_at`` grows
        with ``seq``. ``finished_at`` has no index (one would cost every attempt's write), and
        ``WHERE finished_at >= ?`` read every attempt kept: 75-110 ms for 610,000 of them, for
        each of ``stats``' two windows, against 2.5 ms this way for the last 5 minutes."""
        # Each its own SELECT: MIN and MAX in one read every row.
        rows = await fetch(
            self.reader, "SELECT (SELECT MIN(seq) FROM attempts), (SELECT MAX(seq) FROM attempts)"
        )
        low, high = rows[0]
        if low is None:
            return 0
        high += 1
        while low < high:
            middle = (low + high) // 2
            found = await fetch(
                self.reader,
                "SELECT seq, finished_at FROM attempts WHERE seq >= ? ORDER BY seq LIMIT 1",
                (middle,),
            )
            # None: pruned since the range was read, or no time kept; either is counted from.
            if not found or found[0][1] is None or found[0][1] >= since:
                high = middle
            else:
                low = found[0][0] + 1
        return int(low)

    async def series(
        self, *, now: float, minutes: int, source: str | None = None, step_s: int = 60
    ) -> Series:
        """Accepted events, jobs done and jobs dead per step, and the backlog at each step's
        end, for the ``minutes`` steps ending with the one holding ``now`` (of ``source``, or
        of all sources).

        Three bounded reads: events received in the window (``events_received``, each event's
        job count from ``jobs_event``), jobs finished in it (``jobs_finished``), and the jobs
        unfinished now (``jobs_lane`` and ``jobs_running``). The backlog at a step's end is the
        jobs created before it minus the jobs finished before it; counted back from the backlog
        now, that is: now, less the jobs created since, plus the jobs finished since. Only jobs
        still in the journal count: pruned rows fell out long before (retention keeps finished
        work 24 h by default, the dashboard shows one hour). A replayed job has lost its finish
        time, so it reads as unfinished since its event arrived: an approximation for a chart.
        """
        end = (int(now // step_s) + 1) * step_s
        start = float(end - minutes * step_s)
        only = " AND source = ?" if source is not None else ""
        extra: tuple[Any, ...] = (source,) if source is not None else ()
        last = minutes - 1

        def step(value: Any) -> int:
            return min(max(int(value), 0), last)

        accepted, created, done, dead, ended = ([0] * minutes for _ in range(5))
        rows = await fetch(
            self.reader,
            "SELECT CAST((received_at - ?) / ? AS INTEGER) AS step, COUNT(*),"
            " SUM((SELECT COUNT(*) FROM jobs j WHERE j.event_id = e.id))"
            # Named: with a source, the planner would otherwise walk that source's whole
            # history in ``events_source`` rather than the window's rows.
            " FROM events e INDEXED BY events_received"
            f" WHERE received_at >= ?{only} GROUP BY step",
            (start, step_s, start, *extra),
        )
        for at, events, jobs in rows:
            accepted[step(at)] += events
            created[step(at)] += jobs or 0
        rows = await fetch(
            self.reader,
            "SELECT state, CAST((finished_at - ?) / ? AS INTEGER) AS step, COUNT(*) FROM jobs"
            " WHERE state IN ('done', 'dead', 'cancelled') AND finished_at >= ?"
            f"{only} GROUP BY state, step",
            (start, step_s, start, *extra),
        )
        for state, at, n in rows:
            ended[step(at)] += n
            if state == "done":
                done[step(at)] += n
            elif state == "dead":
                dead[step(at)] += n
        rows = await fetch(
            self.reader,
            "SELECT (SELECT COUNT(*) FROM jobs WHERE state = 'queued'"
            f"{only}) + (SELECT COUNT(*) FROM jobs WHERE state = 'running'{only})",
            (*extra, *extra),
        )
        unfinished = int(rows[0][0])
        backlog = [0] * minutes
        for i in range(last, -1, -1):
            backlog[i] = max(unfinished, 0)
            unfinished += ended[i] - created[i]
        return Series(start, step_s, tuple(accepted), tuple(done), tuple(dead), tuple(backlog))
