"""The journal: sole owner of SQLite — schema, group-commit writer, claims, outcomes, queries.

Hazards worth knowing before editing:

* Every write goes through one writer task that takes whatever is waiting and commits it as one
  ``BEGIN IMMEDIATE`` transaction (group commit). One fsync per batch, not per webhook, is what
  makes durable intake fast; never add a write path that bypasses the writer.
* Writes run on one thread of their own with a plain ``sqlite3`` connection, a whole batch per
  hop (aiosqlite would make every statement its own hop, and each hop waits for the event
  loop). Reads go through aiosqlite on a second connection; WAL lets them run beside writes.
  Nothing awaits network I/O inside a transaction.
* The file is shared with CLI processes (``webhookd replay`` while the daemon runs): WAL mode
  lets readers run beside the writer, and ``busy_timeout`` makes writers queue for the lock.
* All SQL lives in this module, so that another journal (PostgreSQL) can replace it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.errors import JournalError, JournalUnavailable, NotFound
from webhookd.models import Attempt, Event, Job, JobState, Priority, event_state

log = logging.getLogger("webhookd.journal")

MAX_BATCH = 512
_BUSY_TIMEOUT_MS = 5000
_PRAGMAS = (
    f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}",
    # auto_vacuum only takes effect on a new file, before the first table is created.
    "PRAGMA auto_vacuum = INCREMENTAL",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA temp_store = MEMORY",
)
_T = TypeVar("_T")

# Forward migrations: index i brings the schema from version i to i + 1. Never edit one that has
# shipped; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        id          TEXT NOT NULL UNIQUE,
        source      TEXT NOT NULL,
        received_at REAL NOT NULL,
        dedup_key   TEXT NOT NULL,
        tenant      TEXT NOT NULL DEFAULT '',
        priority    INTEGER NOT NULL,
        headers     TEXT NOT NULL,
        body        BLOB NOT NULL,
        verified    TEXT
    );
    CREATE INDEX events_source ON events(source, seq);
    CREATE TABLE dedup (
        key        TEXT PRIMARY KEY,
        event_id   TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX dedup_created ON dedup(created_at);
    CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        event_id     TEXT NOT NULL,
        source       TEXT NOT NULL,
        action       TEXT NOT NULL,
        type         TEXT NOT NULL,
        state        TEXT NOT NULL,
        priority     INTEGER NOT NULL,
        tenant       TEXT NOT NULL DEFAULT '',
        order_key    TEXT,
        run_at       REAL NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        recoveries   INTEGER NOT NULL DEFAULT 0,
        waits        INTEGER NOT NULL DEFAULT 0,
        boot_id      TEXT,
        claimed_at   REAL,
        finished_at  REAL,
        last_error   TEXT,
        result       TEXT
    );
    CREATE INDEX jobs_event ON jobs(event_id);
    CREATE INDEX jobs_queued ON jobs(priority, seq) WHERE state = 'queued';
    CREATE INDEX jobs_running ON jobs(boot_id) WHERE state = 'running';
    CREATE INDEX jobs_finished ON jobs(state, finished_at)
        WHERE state IN ('done', 'dead', 'cancelled');
    CREATE TABLE attempts (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id      TEXT NOT NULL,
        n           INTEGER NOT NULL,
        started_at  REAL NOT NULL,
        finished_at REAL,
        outcome     TEXT NOT NULL,
        error       TEXT,
        detail      TEXT
    );
    CREATE INDEX attempts_job ON attempts(job_id, seq);
    """,
    # 1 → 2: sources an operator has paused (``webhookd pause``): still accepted, not processed.
    """
    CREATE TABLE paused_sources (
        source    TEXT PRIMARY KEY,
        paused_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 2 → 3: the scheduler's lanes and ordered delivery. ``jobs_lane`` serves the per-tenant refill
    # (oldest due jobs of one priority × source × tenant, ``run_at`` read from the index) and
    # the walk over the lanes that have queued work; it replaces ``jobs_queued``.
    # ``jobs_order`` holds only unfinished jobs that have an order key, so "is an older job of
    # this key still unfinished?" is one short index probe however long the key's history is.
    """
    DROP INDEX jobs_queued;
    CREATE INDEX jobs_lane ON jobs(priority, source, tenant, seq, run_at)
        WHERE state = 'queued';
    CREATE INDEX jobs_order ON jobs(source, action, order_key, seq)
        WHERE order_key IS NOT NULL AND state IN ('queued', 'running');
    """,
)

# A job may start only when no older job of its (source, action, order key) is unfinished: the
# head of each key runs, the rest wait. Dead, done and cancelled jobs do not hold their key.
# (The partial index above is used only when its WHERE terms appear here verbatim.)
_HEAD_OF_KEY = (
    "(j.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.source = j.source"
    " AND o.action = j.action AND o.order_key = j.order_key AND o.seq < j.seq"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running')))"
)


def _next_lane(p: str, s: str, t: str) -> str:
    """SQL for the first queued job's seq in the lane after (p, s, t): three index seeks (same
    source, next source, next priority). A row-value comparison reads nicer, but SQLite does not
    seek on one whose right side comes from the recursive row."""
    seeks = (
        f"priority = {p} AND source = {s} AND tenant > {t}",
        f"priority = {p} AND source > {s}",
        f"priority > {p}",
    )
    firsts = (
        f"(SELECT seq FROM jobs WHERE state = 'queued' AND {cond}"
        " ORDER BY priority, source, tenant LIMIT 1)"
        for cond in seeks
    )
    return f"COALESCE({', '.join(firsts)})"


_READY_COLUMNS = "j.id, j.source, j.action, j.priority, j.tenant, j.order_key, j.seq"
_LANES_PER_QUERY = 200  # parts of one UNION ALL (SQLite allows 500)

# The lanes (priority, source, tenant) that hold queued jobs, in index order from a cursor.
_LANES_SQL = (
    "WITH RECURSIVE lane(p, s, t) AS ("
    f" SELECT priority, source, tenant FROM jobs WHERE seq = {_next_lane(':p', ':s', ':t')}"
    " UNION ALL SELECT j.priority, j.source, j.tenant FROM lane, jobs j"
    f" WHERE j.seq = {_next_lane('lane.p', 'lane.s', 'lane.t')} LIMIT :n)"
    " SELECT p, s, t FROM lane"
)


# ---------------------------------------------------------------------------------------------
# Records that cross the journal's boundary


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    action: str
    type: str
    max_attempts: int
    order_key: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An accepted webhook and its jobs, ready to be journaled."""

    event: Event
    jobs: tuple[NewJob, ...]


@dataclass(frozen=True, slots=True)
class Ingested:
    event_id: str
    duplicate: bool


# Where the scheduler queues a job: (priority, source, tenant). Tenants take turns per class.
Lane = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class LaneBacklog:
    """Queued jobs of one lane, for ``/stats``."""

    lane: Lane
    queued: int
    oldest_received_at: float | None


@dataclass(frozen=True, slots=True)
class Ready:
    """A queued job that is due: what the scheduler needs to pick it, and no more."""

    id: str
    source: str
    action: str
    priority: int
    tenant: str
    order_key: str | None
    seq: int

    @property
    def lane(self) -> Lane:
        return (self.priority, self.source, self.tenant)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job claimed for one attempt, with its event: everything a worker needs."""

    job: Job
    event: Event
    waits: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome of one attempt, as the worker reports it."""

    job_id: str
    attempt: int
    state: JobState  # queued (retry or wait), done, dead
    started_at: float
    finished_at: float
    outcome: str  # done | retry | dead | wait | interrupted
    run_at: float | None = None
    error: str | None = None
    result: Any = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventSummary:
    id: str
    source: str
    received_at: float
    tenant: str
    priority: str
    state: str
    jobs: int


@dataclass(frozen=True, slots=True)
class EventDetail:
    event: Event
    state: str
    jobs: tuple[Job, ...]

    def as_dict(self) -> dict[str, Any]:
        """The one JSON shape of ``GET /events/<id>`` and ``webhookd show --json`` (contract)."""
        e = self.event
        return {
            "id": e.id,
            "source": e.source,
            "received_at": e.received_at,
            "dedup_key": e.dedup_key,
            "tenant": e.tenant or None,
            "priority": e.priority.label,
            "verified": dict(e.verified) if e.verified else None,
            "state": self.state,
            "content_type": e.content_type,
            "body_bytes": len(e.body),
            "jobs": [_job_dict(j) for j in self.jobs],
        }


def _job_dict(j: Job) -> dict[str, Any]:
    return {
        "id": j.id,
        "action": j.action,
        "type": j.type,
        "state": str(j.state),
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "run_at": j.run_at,
        "result": j.result,
        "last_error": j.last_error,
        "errors": [
            {
                "attempt": a.n,
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "outcome": a.outcome,
                "error": a.error,
                "detail": dict(a.detail) if a.detail else None,
            }
            for a in j.history
        ],
    }


@dataclass(frozen=True, slots=True)
class Recovery:
    requeued: int
    dead: int


@dataclass(frozen=True, slots=True)
class Counts:
    jobs_by_state: Mapping[str, int]
    jobs_by_source: Mapping[str, Mapping[str, int]]
    oldest_queued_at: float | None
    events: int


@dataclass(frozen=True, slots=True)
class Pruned:
    events: int
    jobs: int
    dedup: int


@dataclass(frozen=True, slots=True)
class Activity:
    """What happened in the last ``window_s`` seconds (for ``webhookd stats``)."""

    window_s: float
    received: int
    attempts_by_outcome: Mapping[str, int]


# ---------------------------------------------------------------------------------------------
# The group-commit writer's work items


@dataclass(slots=True)
class _Op:
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _IngestOp(_Op):
    item: NewEvent


@dataclass(slots=True)
class _ClaimOp(_Op):
    job_ids: Sequence[str]
    boot_id: str
    now: float


@dataclass(slots=True)
class _FinishOp(_Op):
    results: Sequence[Finished]


@dataclass(slots=True)
class _CallOp(_Op):
    """Any other write: runs alone in its own transaction."""

    fn: Any  # (sqlite3.Connection) -> result, run on the writer's thread
    transaction: bool = True  # False for PRAGMAs that cannot run inside one (checkpoints)


@dataclass(slots=True)
class _Group:
    """One batch on its way through the writer's thread, and what became of it."""

    ingests: list[_IngestOp]
    finishes: list[_FinishOp]
    claims: list[_ClaimOp]
    calls: list[_CallOp]
    now: float
    ingested: list[tuple[Ingested, list[Ready]]] = field(default_factory=list)
    claimed: list[list[Claimed]] = field(default_factory=list)
    called: list[tuple[Any, BaseException | None]] = field(default_factory=list)
    error: BaseException | None = None


class _WriteFailed(Exception):
    """A call's transaction failed in SQLite (as opposed to the operation raising)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Journal:
    """The durable store. Use as ``async with Journal(path) as journal:``."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_commit: Any = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        # Called (synchronously, on the loop) with the jobs each committed ingest batch created.
        self.on_commit = on_commit
        self._writer: sqlite3.Connection | None = None  # used only on self._thread
        self._thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.last_write_error: str | None = None
        self.commits = 0
        self.batched_ops = 0
        # Jobs queued or running, kept in step by this process's writes and re-counted by
        # ``refresh_backlog`` (other processes may replay). The receiver's backpressure reads it.
        self.backlog_jobs = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="webhookd-journal")
        try:
            self._writer = await self._in_thread(self._open_writer)
            self._reader = await self._connect()
        except sqlite3.Error as exc:
            await self._close_connections()
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        self.backlog_jobs = await self.backlog()
        self._task = asyncio.create_task(self._write_loop(), name="journal-writer")

    async def close(self) -> None:
        """Flush what is queued, checkpoint the WAL into the main file, close."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._in_thread(self._writer.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        await self._close_connections()

    async def _close_connections(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            await self._in_thread(self._writer.close)
        self._reader = self._writer = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the writer's own thread (the only thread that touches its connection)."""
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            await conn.execute(pragma)
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        # check_same_thread stays on: only the writer's thread ever uses this connection.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in _PRAGMAS:
                conn.execute(pragma)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise JournalError(
                f"{self.path} has schema version {version}, newer than this webhookd "
                f"understands ({len(MIGRATIONS)}); upgrade webhookd"
            )
        for target in range(version, len(MIGRATIONS)):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # executescript would commit our transaction; run statement by statement.
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise JournalError("journal is not open")
        return self._reader

    # -- the writer --------------------------------------------------------------------------

    def _enqueue(self, op: _Op) -> None:
        if self._task is None or self._task.done():
            raise JournalUnavailable("journal writer is not running")
        self._queue.put_nowait(op)

    async def _submit(self, op: _Op) -> Any:
        self._enqueue(op)
        return await op.future

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch: list[_Op] = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                op = self._queue.get_nowait()
                if op is None:
                    stopping = True
                    break
                batch.append(op)
            # The whole batch is one hop to the writer's thread: the group transaction, then
            # each other write in its own. Futures are resolved back here, on the loop.
            group = _Group(
                ingests=[op for op in batch if isinstance(op, _IngestOp)],
                finishes=[op for op in batch if isinstance(op, _FinishOp)],
                claims=[op for op in batch if isinstance(op, _ClaimOp)],
                calls=[op for op in batch if isinstance(op, _CallOp)],
                now=self.clock.time(),
            )
            await self._in_thread(self._write_batch, group)
            self._resolve(group)

    def _write_batch(self, group: _Group) -> None:
        """On the writer's thread: commit the group, then each call; record what happened."""
        conn = self._writer
        assert conn is not None
        if group.ingests or group.finishes or group.claims:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    group.ingested = self._write_ingests(conn, group.ingests, group.now)
                    for fop in group.finishes:
                        self._write_finishes(conn, fop.results)
                    group.claimed = [self._write_claim(conn, op) for op in group.claims]
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, OSError) as exc:
                group.error = exc
        for call in group.calls:
            group.called.append(self._write_call(conn, call))

    @staticmethod
    def _write_call(conn: sqlite3.Connection, op: _CallOp) -> tuple[Any, BaseException | None]:
        if not op.transaction:
            try:
                return op.fn(conn), None
            except (sqlite3.Error, OSError) as exc:
                return None, JournalUnavailable(f"journal maintenance failed: {exc}")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = op.fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            return None, _WriteFailed(exc)
        except Exception as exc:  # an error of the operation itself (NotFound …): pass it on
            return None, exc
        return result, None

    def _resolve(self, group: _Group) -> None:
        """On the loop: hand each waiter its result, keep the counters, announce new jobs."""
        grouped: list[_Op] = [*group.ingests, *group.finishes, *group.claims]
        if group.error is not None:
            self.last_write_error = str(group.error)
            log.error("journal write failed: %s", group.error)
            error = JournalUnavailable(f"journal write failed: {group.error}")
            for op in grouped:
                if not op.future.done():
                    op.future.set_exception(error)
        elif grouped:
            self.last_write_error = None
            self.commits += 1
            self.batched_ops += len(grouped)
            created: list[Ready] = []
            for iop, (result, ready) in zip(group.ingests, group.ingested, strict=True):
                created.extend(ready)
                if not iop.future.done():
                    iop.future.set_result(result)
            for fop in group.finishes:
                if not fop.future.done():
                    fop.future.set_result(None)
                self.backlog_jobs -= sum(1 for f in fop.results if f.state != JobState.QUEUED)
            for cop, claimed in zip(group.claims, group.claimed, strict=True):
                if not cop.future.done():
                    cop.future.set_result(claimed)
            self.backlog_jobs += len(created)
            if created and self.on_commit is not None:
                self.on_commit(created)
        for call, (result, exc) in zip(group.calls, group.called, strict=True):
            if isinstance(exc, _WriteFailed):
                self.last_write_error = str(exc.cause)
                exc = JournalUnavailable(f"journal write failed: {exc.cause}")
            elif exc is None and call.transaction:
                self.last_write_error = None
                self.commits += 1
            if call.future.done():
                continue
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

    def _write_ingests(
        self, conn: sqlite3.Connection, ops: list[_IngestOp], now: float
    ) -> list[tuple[Ingested, list[Ready]]]:
        keys = [op.item.event.dedup_key for op in ops]
        conn.executemany(
            "INSERT OR IGNORE INTO dedup(key, event_id, created_at) VALUES (?, ?, ?)",
            [(op.item.event.dedup_key, op.item.event.id, now) for op in ops],
        )
        owners: dict[str, str] = {}
        unique_keys = list(dict.fromkeys(keys))
        for start in range(0, len(unique_keys), 500):
            chunk = unique_keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = _rows(conn, f"SELECT key, event_id FROM dedup WHERE key IN ({marks})", chunk)
            owners.update({row[0]: row[1] for row in rows})
        results: list[tuple[Ingested, list[Ready]]] = []
        event_rows: list[tuple[Any, ...]] = []
        job_rows: list[tuple[Any, ...]] = []
        for op in ops:
            e = op.item.event
            owner = owners.get(e.dedup_key, e.id)
            if owner != e.id:
                results.append((Ingested(owner, duplicate=True), []))
                continue
            event_rows.append(
                (
                    e.id,
                    e.source,
                    e.received_at,
                    e.dedup_key,
                    e.tenant,
                    int(e.priority),
                    json.dumps(e.headers, separators=(",", ":")),
                    e.body,
                    json.dumps(e.verified) if e.verified is not None else None,
                )
            )
            ready = []
            for j in op.item.jobs:
                job_rows.append(
                    (
                        j.id,
                        e.id,
                        e.source,
                        j.action,
                        j.type,
                        JobState.QUEUED,
                        int(e.priority),
                        e.tenant,
                        j.order_key,
                        e.received_at,
                        j.max_attempts,
                    )
                )
                ready.append(
                    Ready(j.id, e.source, j.action, int(e.priority), e.tenant, j.order_key, 0)
                )
            results.append((Ingested(e.id, duplicate=False), ready))
        if event_rows:
            conn.executemany(
                "INSERT INTO events(id, source, received_at, dedup_key, tenant, priority, headers,"
                " body, verified) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                event_rows,
            )
        if job_rows:
            conn.executemany(
                "INSERT INTO jobs(id, event_id, source, action, type, state, priority, tenant,"
                " order_key, run_at, max_attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                job_rows,
            )
        return results

    def _write_claim(self, conn: sqlite3.Connection, op: _ClaimOp) -> list[Claimed]:
        if not op.job_ids:
            return []
        marks = ",".join("?" * len(op.job_ids))
        conn.execute(
            f"UPDATE jobs SET state = 'running', attempts = attempts + 1, boot_id = ?,"
            f" claimed_at = ? WHERE id IN ({marks}) AND state = 'queued'",
            (op.boot_id, op.now, *op.job_ids),
        )
        rows = _rows(
            conn,
            f"SELECT {_JOB_COLUMNS}, {_EVENT_COLUMNS} FROM jobs j JOIN events e"
            f" ON e.id = j.event_id WHERE j.id IN ({marks}) AND j.state = 'running'"
            f" AND j.boot_id = ? AND j.claimed_at = ?",
            (*op.job_ids, op.boot_id, op.now),
        )
        return [Claimed(_job_from_row(r), _event_from_row(r), int(r["waits"])) for r in rows]

    def _write_finishes(self, conn: sqlite3.Connection, results: Sequence[Finished]) -> None:
        updates = []
        attempts = []
        for f in results:
            wait = f.outcome == "wait"
            updates.append(
                (
                    str(f.state),
                    f.run_at if f.run_at is not None else f.finished_at,
                    _dump(f.result) if f.state == JobState.DONE else None,
                    f.error,
                    f.finished_at if f.state in (JobState.DONE, JobState.DEAD) else None,
                    1 if wait else 0,
                    1 if wait else 0,
                    f.job_id,
                )
            )
            if not wait:
                attempts.append(
                    (
                        f.job_id,
                        f.attempt,
                        f.started_at,
                        f.finished_at,
                        f.outcome,
                        f.error,
                        _dump(dict(f.detail)) if f.detail else None,
                    )
                )
        conn.executemany(
            "UPDATE jobs SET state = ?, run_at = ?, result = ?, last_error = ?, finished_at = ?,"
            " boot_id = NULL, attempts = attempts - ?, waits = waits + ? WHERE id = ?",
            updates,
        )
        if attempts:
            conn.executemany(
                "INSERT INTO attempts(job_id, n, started_at, finished_at, outcome, error, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                attempts,
            )

    async def _call(self, fn: Any, *, transaction: bool = True) -> Any:
        return await self._submit(_CallOp(self._new_future(), fn, transaction))

    # -- intake, dispatch, outcomes -----------------------------------------------------------

    async def ingest(self, item: NewEvent) -> Ingested:
        """Journal an event and its jobs; returns once committed (or raises JournalUnavailable)."""
        return await self.submit_ingest(item)

    def submit_ingest(self, item: NewEvent) -> asyncio.Future[Ingested]:
        """Queue an event for the next group commit; the future resolves once it is committed.

        The write happens whether or not anyone still waits: cancelling the future only stops
        the waiting. Raises ``JournalUnavailable`` at once when the writer is not running.
        """
        future: asyncio.Future[Ingested] = self._new_future()
        self._enqueue(_IngestOp(future, item))
        return future

    async def claim(self, job_ids: Sequence[str], boot_id: str) -> list[Claimed]:
        """Mark queued jobs running (one more attempt each); returns those actually claimed."""
        op = _ClaimOp(self._new_future(), list(job_ids), boot_id, self.clock.time())
        return await self._submit(op)  # type: ignore[no-any-return]

    async def finish(self, results: Sequence[Finished]) -> None:
        """Record attempts' outcomes (batched with whatever else is being committed)."""
        if results:
            await self._submit(_FinishOp(self._new_future(), list(results)))

    async def unclaim(self, job_ids: Sequence[str]) -> None:
        """Put interrupted jobs back to ``queued`` without counting the attempt (drain)."""
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), run_at = ?,"
                " boot_id = NULL WHERE id = ? AND state = 'running'",
                [(now, job_id) for job_id in job_ids],
            )

        if job_ids:
            await self._call(fn)

    async def recover(self, boot_id: str, max_recoveries: int) -> Recovery:
        """Re-queue jobs an earlier boot left ``running``; poison pills go to ``dead``."""
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> Recovery:
            rows = _rows(
                conn,
                "SELECT id, attempts, recoveries, claimed_at FROM jobs"
                " WHERE state = 'running' AND (boot_id IS NULL OR boot_id != ?)",
                (boot_id,),
            )
            requeue, dead, attempts = [], [], []
            for r in rows:
                started = r["claimed_at"] or now
                if r["recoveries"] + 1 >= max_recoveries:
                    reason = (
                        f"poison pill: interrupted by a crash or restart "
                        f"{r['recoveries'] + 1} times"
                    )
                    dead.append((now, reason, now, r["id"]))
                    attempts.append((r["id"], r["attempts"], started, now, "interrupted", reason))
                else:
                    requeue.append((now, r["id"]))
                    attempts.append(
                        (
                            r["id"],
                            r["attempts"],
                            started,
                            now,
                            "interrupted",
                            "interrupted by a crash or restart",
                        )
                    )
            conn.executemany(
                "UPDATE jobs SET state = 'queued', recoveries = recoveries + 1, run_at = ?,"
                " boot_id = NULL WHERE id = ?",
                requeue,
            )
            conn.executemany(
                "UPDATE jobs SET state = 'dead', recoveries = recoveries + 1, run_at = ?,"
                " last_error = ?, finished_at = ?, boot_id = NULL WHERE id = ?",
                dead,
            )
            conn.executemany(
                "INSERT INTO attempts(job_id, n, started_at, finished_at, outcome, error)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                attempts,
            )
            return Recovery(requeued=len(requeue), dead=len(dead))

        return await self._call(fn)  # type: ignore[no-any-return]

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
        rows = await _fetch(
            self.reader,
            f"SELECT {_READY_COLUMNS} FROM jobs j WHERE j.state = 'queued' AND j.run_at <= ?"
            f"{not_paused} AND {_HEAD_OF_KEY} ORDER BY j.priority, j.seq LIMIT ?",
            (now, *held, limit + len(skip)),
        )
        out = [Ready(*r) for r in rows if r[0] not in skip]
        return out[:limit]

    async def ready_in_lanes(self, now: float, wants: Sequence[tuple[Lane, int]]) -> list[Ready]:
        """For each (lane, n): up to n of the lane's due jobs that may start (as ``ready``),
        oldest first. One statement per ``_LANES_PER_QUERY`` lanes, each part an index seek."""
        part = (
            f"SELECT * FROM (SELECT {_READY_COLUMNS} FROM jobs j WHERE j.state = 'queued'"
            " AND j.priority = ? AND j.source = ? AND j.tenant = ? AND j.run_at <= ?"
            f" AND {_HEAD_OF_KEY} ORDER BY j.seq LIMIT ?)"
        )
        out: list[Ready] = []
        for start in range(0, len(wants), _LANES_PER_QUERY):
            chunk = wants[start : start + _LANES_PER_QUERY]
            args = [arg for lane, n in chunk for arg in (*lane, now, n)]
            rows = await _fetch(self.reader, " UNION ALL ".join([part] * len(chunk)), args)
            out.extend(Ready(*r) for r in rows)
        return out

    async def queued_lanes(self, after: Lane | None, limit: int) -> list[Lane]:
        """Lanes holding queued jobs (due or not), in (priority, source, tenant) order, starting
        after ``after`` (from the first when ``None``); at most ``limit``."""
        p, s, t = after if after is not None else (-1, "", "")  # -1: before every priority
        rows = await _fetch(self.reader, _LANES_SQL, {"p": p, "s": s, "t": t, "n": limit})
        return [(int(r[0]), r[1], r[2]) for r in rows]

    async def lane_backlog(self) -> list[LaneBacklog]:
        """Queued jobs per lane with the oldest one's receive time, biggest lanes first."""
        rows = await _fetch(
            self.reader,
            "SELECT priority, source, tenant, COUNT(*), MIN(seq) FROM jobs WHERE state = 'queued'"
            " GROUP BY priority, source, tenant ORDER BY COUNT(*) DESC, priority",
        )
        oldest: dict[int, float] = {}
        seqs = [r[4] for r in rows]
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found = await _fetch(
                self.reader,
                "SELECT j.seq, e.received_at FROM jobs j JOIN events e ON e.id = j.event_id"
                f" WHERE j.seq IN ({marks})",
                chunk,
            )
            oldest.update({f[0]: f[1] for f in found})
        return [LaneBacklog((int(r[0]), r[1], r[2]), int(r[3]), oldest.get(r[4])) for r in rows]

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
        rows = await _fetch(self.reader, sql, args)
        value = rows[0][0] if rows else None
        return float(value) if value is not None else None

    async def refresh_backlog(self) -> int:
        self.backlog_jobs = await self.backlog()
        return self.backlog_jobs

    async def backlog(self) -> int:
        """Jobs not yet finished (queued or running)."""
        rows = await _fetch(
            self.reader, "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
        )
        return int(rows[0][0])

    # -- operator actions --------------------------------------------------------------------

    async def replay(self, event_ids: Sequence[str]) -> dict[str, int]:
        """Re-queue each event's jobs that are not queued or running, with fresh attempts.

        Returns ``{event_id: jobs re-queued}``; raises ``NotFound`` for an unknown id.
        """
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for event_id in event_ids:
                rows = _rows(conn, "SELECT 1 FROM events WHERE id = ?", (event_id,))
                if not rows:
                    raise NotFound(event_id)
                cur = conn.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, recoveries = 0, waits = 0,"
                    " run_at = ?, finished_at = NULL, boot_id = NULL"
                    " WHERE event_id = ? AND state NOT IN ('queued', 'running')",
                    (now, event_id),
                )
                out[event_id] = cur.rowcount
            return out

        return await self._call(fn)  # type: ignore[no-any-return]

    async def dead_event_ids(
        self, source: str | None = None, since: float | None = None, limit: int = 100_000
    ) -> list[str]:
        sql = (
            "SELECT DISTINCT j.event_id FROM jobs j JOIN events e ON e.id = j.event_id"
            " WHERE j.state = 'dead'"
        )
        args: list[Any] = []
        if source is not None:
            sql += " AND e.source = ?"
            args.append(source)
        if since is not None:
            sql += " AND e.received_at >= ?"
            args.append(since)
        sql += " ORDER BY j.event_id LIMIT ?"
        args.append(limit)
        rows = await _fetch(self.reader, sql, args)
        return [r[0] for r in rows]

    # -- queries -----------------------------------------------------------------------------

    async def get_event(self, event_id: str) -> EventDetail:
        rows = await _fetch(
            self.reader, f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.id = ?", (event_id,)
        )
        if not rows:
            raise NotFound(event_id)
        event = _event_from_row(rows[0])
        job_rows = await _fetch(
            self.reader,
            f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE j.event_id = ? ORDER BY j.seq",
            (event_id,),
        )
        attempt_rows = await _fetch(
            self.reader,
            "SELECT a.job_id, a.n, a.started_at, a.finished_at, a.outcome, a.error, a.detail"
            " FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.event_id = ?"
            " ORDER BY a.seq",
            (event_id,),
        )
        history: dict[str, list[Attempt]] = {}
        for a in attempt_rows:
            history.setdefault(a[0], []).append(
                Attempt(
                    n=a[1],
                    started_at=a[2],
                    finished_at=a[3],
                    outcome=a[4],
                    error=a[5],
                    detail=json.loads(a[6]) if a[6] else None,
                )
            )
        jobs = []
        for r in job_rows:
            job = _job_from_row(r)
            jobs.append(Job(**{**_slots(job), "history": tuple(history.get(job.id, ()))}))
        return EventDetail(event, event_state([str(j.state) for j in jobs]), tuple(jobs))

    async def list_events(
        self,
        *,
        state: str | None = None,
        source: str | None = None,
        limit: int = 50,
        before: str | None = None,
        since: float | None = None,
    ) -> list[EventSummary]:
        """Newest first. ``state`` filters on the derived event state."""
        where: list[str] = []
        args: list[Any] = []
        if source is not None:
            where.append("e.source = ?")
            args.append(source)
        if before is not None:
            where.append("e.id < ?")
            args.append(before)
        if since is not None:
            where.append("e.received_at >= ?")
            args.append(since)
        if state is not None:
            where.append(_STATE_FILTERS[state])
        sql = (
            "SELECT e.id, e.source, e.received_at, e.tenant, e.priority,"
            " (SELECT group_concat(state) FROM jobs WHERE event_id = e.id) AS states,"
            " (SELECT COUNT(*) FROM jobs WHERE event_id = e.id) AS njobs FROM events e"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY e.seq DESC LIMIT ?"
        args.append(limit)
        rows = await _fetch(self.reader, sql, args)
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

    async def counts(self) -> Counts:
        rows = await _fetch(
            self.reader, "SELECT source, state, COUNT(*) FROM jobs GROUP BY source, state"
        )
        by_state: dict[str, int] = {s.value: 0 for s in JobState}
        by_source: dict[str, dict[str, int]] = {}
        for source, state, n in rows:
            by_state[state] = by_state.get(state, 0) + n
            by_source.setdefault(source, {})[state] = n
        oldest = await _fetch(
            self.reader,
            "SELECT MIN(e.received_at) FROM jobs j JOIN events e ON e.id = j.event_id"
            " WHERE j.state = 'queued'",
        )
        events = await _fetch(self.reader, "SELECT COUNT(*) FROM events")
        return Counts(by_state, by_source, oldest[0][0], int(events[0][0]))

    # -- retention ---------------------------------------------------------------------------

    async def prune(
        self, *, keep_done_s: float, keep_dead_s: float, keep_dedup_s: float, batch: int = 500
    ) -> Pruned:
        """Delete one small batch of expired rows of each kind; call until it returns zeros.

        The candidates are found on the reader connection (a scan that may take a while on a big
        file, but WAL lets it run beside the writer); the write transaction then deletes at most
        ``batch`` of them, re-checking each, so the write lock is held for milliseconds and an
        ingest commit never waits long behind retention.
        """
        now = self.clock.time()
        done_before, dead_before = now - keep_done_s, now - keep_dead_s
        # An event goes when none of its jobs is unfinished or finished recently enough to keep:
        # done/cancelled after keep_done_s, dead after keep_dead_s.
        keep = (
            "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND (j.state IN"
            " ('queued', 'running') OR (j.state IN ('done', 'cancelled') AND j.finished_at > ?)"
            " OR (j.state = 'dead' AND j.finished_at > ?)))"
        )
        rows = await _fetch(
            self.reader,
            f"SELECT e.id FROM events e WHERE e.received_at < ? AND {keep} ORDER BY e.seq LIMIT ?",
            (done_before, done_before, dead_before, batch),
        )
        candidates = [r[0] for r in rows]

        def fn(conn: sqlite3.Connection) -> Pruned:
            ids: list[tuple[str]] = []
            for start in range(0, len(candidates), 250):
                chunk = candidates[start : start + 250]
                marks = ",".join("?" * len(chunk))
                still = _rows(  # a replay may have re-queued one since the scan
                    conn,
                    f"SELECT e.id FROM events e WHERE e.id IN ({marks}) AND {keep}",
                    (*chunk, done_before, dead_before),
                )
                ids.extend((r[0],) for r in still)
            conn.executemany(
                "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = ?)",
                ids,
            )
            cur = conn.executemany("DELETE FROM jobs WHERE event_id = ?", ids)
            jobs = cur.rowcount
            conn.executemany("DELETE FROM events WHERE id = ?", ids)
            cur = conn.execute(
                "DELETE FROM dedup WHERE key IN (SELECT key FROM dedup WHERE created_at < ?"
                " LIMIT ?)",
                (now - keep_dedup_s, batch),
            )
            return Pruned(events=len(ids), jobs=max(jobs, 0), dedup=max(cur.rowcount, 0))

        result: Pruned = await self._call(fn)
        return result

    async def compact(self, pages: int = 1000) -> tuple[int, int]:
        """Hand free pages back to the file system and checkpoint the WAL without waiting.

        ``PRAGMA incremental_vacuum`` moves at most ``pages`` free pages per call (short, like
        a prune batch); ``wal_checkpoint(PASSIVE)`` copies what no reader still needs into the
        main file so the WAL is reused instead of growing. Returns (freelist pages left,
        WAL frames not yet checkpointed).
        """

        def vacuum(conn: sqlite3.Connection) -> int:
            # Each step of this PRAGMA frees one page, and Python's execute() steps a statement
            # without result columns only once; executescript steps it to the end. It runs in
            # autocommit, as its own short transaction.
            conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
            rows = _rows(conn, "PRAGMA freelist_count")
            return int(rows[0][0])

        def checkpoint(conn: sqlite3.Connection) -> int:
            # (busy, frames in the WAL, frames checkpointed); it cannot run inside a transaction.
            rows = _rows(conn, "PRAGMA wal_checkpoint(PASSIVE)")
            busy, log_frames, done = rows[0]
            return 0 if busy or log_frames < 0 else int(log_frames) - int(done)

        free: int = await self._call(vacuum, transaction=False)
        behind: int = await self._call(checkpoint, transaction=False)
        return free, behind

    async def size_bytes(self) -> int:
        """The journal's size on disk: the main file plus its WAL."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    # -- pausing -----------------------------------------------------------------------------

    async def pause(self, source: str) -> bool:
        """Hold processing of ``source``'s jobs (intake goes on); ``False`` if already paused."""
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO paused_sources(source, paused_at) VALUES (?, ?)",
                (source, now),
            )
            return cur.rowcount > 0

        return await self._call(fn)  # type: ignore[no-any-return]

    async def resume(self, source: str) -> bool:
        """Let ``source``'s jobs run again; ``False`` if it was not paused."""

        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM paused_sources WHERE source = ?", (source,))
            return cur.rowcount > 0

        return await self._call(fn)  # type: ignore[no-any-return]

    async def paused_sources(self) -> frozenset[str]:
        rows = await _fetch(self.reader, "SELECT source FROM paused_sources")
        return frozenset(r[0] for r in rows)

    async def activity(self, window_s: float) -> Activity:
        """Events received and attempts by outcome over the last ``window_s`` seconds."""
        since = self.clock.time() - window_s
        received = await _fetch(
            self.reader, "SELECT COUNT(*) FROM events WHERE received_at >= ?", (since,)
        )
        rows = await _fetch(
            self.reader,
            "SELECT outcome, COUNT(*) FROM attempts WHERE finished_at >= ? GROUP BY outcome",
            (since,),
        )
        return Activity(window_s, int(received[0][0]), {r[0]: int(r[1]) for r in rows})


def _rows(
    conn: sqlite3.Connection, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()
) -> list[sqlite3.Row]:
    return conn.execute(sql, args).fetchall()


async def _fetch(
    conn: aiosqlite.Connection,
    sql: str,
    args: Sequence[Any] | tuple[Any, ...] | Mapping[str, Any] = (),
) -> list[sqlite3.Row]:
    return list(await conn.execute_fetchall(sql, args))


def _slots(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


_STATE_FILTERS = {
    "dead": "EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state = 'dead')",
    "running": "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state = 'dead')"
    " AND EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state = 'running')",
    "queued": "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id"
    " AND j.state IN ('dead', 'running'))"
    " AND EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state = 'queued')",
    "done": "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id"
    " AND j.state IN ('dead', 'running', 'queued'))"
    " AND (NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id)"
    " OR EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state = 'done'))",
    "cancelled": "EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id) AND NOT EXISTS"
    " (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND j.state != 'cancelled')",
}
EVENT_STATES = tuple(_STATE_FILTERS)

_EVENT_COLUMNS = (
    "e.id AS e_id, e.source AS e_source, e.received_at AS e_received_at,"
    " e.dedup_key AS e_dedup_key, e.tenant AS e_tenant, e.priority AS e_priority,"
    " e.headers AS e_headers, e.body AS e_body, e.verified AS e_verified"
)
_JOB_COLUMNS = (
    "j.id, j.event_id, j.action, j.type, j.state, j.attempts, j.max_attempts, j.run_at,"
    " j.recoveries, j.result, j.last_error, j.waits"
)


def _event_from_row(r: sqlite3.Row) -> Event:
    return Event(
        id=r["e_id"],
        source=r["e_source"],
        received_at=r["e_received_at"],
        dedup_key=r["e_dedup_key"],
        tenant=r["e_tenant"],
        priority=Priority(r["e_priority"]),
        headers=tuple((k, v) for k, v in json.loads(r["e_headers"])),
        body=bytes(r["e_body"]),
        verified=json.loads(r["e_verified"]) if r["e_verified"] else None,
    )


def _job_from_row(r: sqlite3.Row) -> Job:
    return Job(
        id=r["id"],
        event_id=r["event_id"],
        action=r["action"],
        type=r["type"],
        state=JobState(r["state"]),
        attempts=r["attempts"],
        max_attempts=r["max_attempts"],
        run_at=r["run_at"],
        recoveries=r["recoveries"],
        result=json.loads(r["result"]) if r["result"] is not None else None,
        last_error=r["last_error"],
    )


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, default=str, separators=(",", ":"))
