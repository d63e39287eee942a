"""The journal's schema: forward migrations, the SQL shared by reads and writes, row converters."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import aiosqlite

from webhookd.errors import JournalError
from webhookd.journal.records import EventDetail, Finished
from webhookd.models import Attempt, Event, Job, JobState, Priority, event_state

KEY_DIGEST_SQL = "webhookd_key_digest"


def key_digest(key: str) -> bytes:
    """What the SQLite journal indexes a dedup key by: 16 bytes of BLAKE2b (a collision among
    even 10^12 keys has odds of ~10^-15). Any text is taken, lone surrogates too."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def add_functions(conn: sqlite3.Connection) -> None:
    """The SQL functions the migrations call (on the connection that runs them)."""
    conn.create_function(KEY_DIGEST_SQL, 1, key_digest, deterministic=True)


# Whether an older job of a job's order key is unfinished (the migration that adds ``behind``
# marks the jobs queued behind one). ``jobs_order`` is used only when its WHERE terms appear
# verbatim.
_HAS_OLDER = (
    "EXISTS (SELECT 1 FROM jobs o WHERE o.source = jobs.source AND o.action = jobs.action"
    " AND o.order_key = jobs.order_key AND o.seq < jobs.seq"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running'))"
)
# The first unfinished job of the order key of the job a trigger saw leave (its seq).
_KEY_HEAD = (
    "(SELECT o.seq FROM jobs o WHERE o.source = OLD.source AND o.action = OLD.action"
    " AND o.order_key = OLD.order_key"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running') ORDER BY o.seq LIMIT 1)"
)
# What a new job of an order key is marked (``behind``): 1 when a job of its key is unfinished
# (all are older), else NULL. Parameters: its source, action and order key.
BEHIND_AT_INSERT = (
    "(SELECT 1 FROM jobs o WHERE o.source = ? AND o.action = ? AND o.order_key = ?"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running') LIMIT 1)"
)

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
    # 3 → 4: the actions an event's ``when`` filters left without a job, as a JSON array;
    # NULL when none was filtered (most events), so the common ingest writes nothing more.
    """
    ALTER TABLE events ADD COLUMN filtered TEXT;
    """,
    # 4 → 5: events by receive time, for the dashboard's per-minute series (``Reads.series``)
    # and ``--since``; without it each of those reads scans the whole events table. ``source``
    # rides along so one source's series is read from the index alone.
    """
    CREATE INDEX events_received ON events(received_at, source);
    """,
    # 5 → 6: the keys of the caps a running job holds (a JSON array; NULL for most jobs), so a
    # claim by any process counts a cap's running jobs (``jobs_running`` finds them).
    """
    ALTER TABLE jobs ADD COLUMN caps TEXT;
    """,
    # 6 → 7: jobs waiting out a retry's backoff sit first in their lane (oldest seq) but are not
    # due: ordered by seq, a refill walked past all of them to reach the due jobs behind, and
    # ``next_run_at`` read every queued job for the earliest run_at (23 ms each at 100,000 jobs
    # in backoff, 200 ms at 1,000,000, every sweep). A lane's due jobs are now read by run_at,
    # then seq, and ``jobs_due`` (as in PostgreSQL) holds the earliest run_at first.
    """
    DROP INDEX jobs_lane;
    CREATE INDEX jobs_lane ON jobs(priority, source, tenant, run_at, seq) WHERE state = 'queued';
    CREATE INDEX jobs_due ON jobs(run_at, source) WHERE state = 'queued';
    """,
    # 7 → 8: dedup keys were the primary key of a WITHOUT ROWID table (80-character text, with
    # the event id and time beside it in the leaves) plus ``dedup_created`` for pruning: two
    # B-trees per key, one of them random and wide. Now the rows go in arrival order (a rowid
    # table: appends) and only a 16-byte digest of the key (``key_digest``) is indexed; pruning
    # reads the oldest rows by rowid. Measured with raw sqlite3 (one key and one event per
    # webhook, 64 per commit, into a journal of 200,000): 62 µs of CPU and 1.84 WAL frames per
    # webhook against 82 and 2.40.
    f"""
    CREATE TABLE dedup_keys (
        n          INTEGER PRIMARY KEY,
        digest     BLOB NOT NULL UNIQUE,
        event_id   TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    INSERT INTO dedup_keys (digest, event_id, created_at)
        SELECT {KEY_DIGEST_SQL}(key), event_id, created_at FROM dedup ORDER BY created_at;
    DROP TABLE dedup;
    ALTER TABLE dedup_keys RENAME TO dedup;
    """,
    # 8 → 9: when a running job was cancelled (``cancel``): its attempt ends as it ends, but a
    # retry, a wait, a drain or a recovery that would queue it again cancels it instead. NULL
    # for every other job; adding it rewrites nothing.
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested_at REAL;
    """,
    # 9 → 10: ``behind`` marks a queued job of an order key that an older unfinished job of
    # the key holds back, and ``jobs_lane`` leaves marked jobs out of a lane's due range. Before,
    # a refill read every due job of its lane and asked each whether it was its key's head: 105
    # ms at 100,000 jobs queued behind one head waiting out a backoff, at every refill. The
    # insert sets a mark (``write_ingests``: only jobs with an order key pay for it); these
    # triggers clear them, the leaving job's own and its key's next, whatever statement ends a
    # job. A trigger costs every row its statement touches, so it fires on ``finished_at``,
    # which every statement that ends a job sets (retention prunes by it) and a claim does not.
    # ``HEAD_OF_KEY`` still decides: a mark only spares a refill the reading.
    f"""
    ALTER TABLE jobs ADD COLUMN behind INTEGER;
    UPDATE jobs SET behind = 1 WHERE state = 'queued' AND {_HAS_OLDER};
    DROP INDEX jobs_lane;
    CREATE INDEX jobs_lane ON jobs(priority, source, tenant, behind, run_at, seq)
        WHERE state = 'queued';
    CREATE TRIGGER jobs_key_moves_on AFTER UPDATE OF finished_at ON jobs
        WHEN OLD.order_key IS NOT NULL AND OLD.state IN ('queued', 'running')
        AND NEW.state NOT IN ('queued', 'running')
    BEGIN
        UPDATE jobs SET behind = NULL WHERE seq = NEW.seq AND behind IS NOT NULL;
        UPDATE jobs SET behind = NULL WHERE seq = {_KEY_HEAD} AND behind IS NOT NULL;
    END;
    CREATE TRIGGER jobs_key_deleted AFTER DELETE ON jobs
        WHEN OLD.order_key IS NOT NULL AND OLD.state IN ('queued', 'running')
    BEGIN
        UPDATE jobs SET behind = NULL WHERE seq = {_KEY_HEAD} AND behind IS NOT NULL;
    END;
    """,
    # 10 → 11: when a dead job was dismissed (``cancel --dead``): it is ``cancelled`` like a job
    # cancelled before it ran, and this tells the two apart, so that ``replay --dismissed``
    # can undo a dismissal alone. NULL for every other job; adding it rewrites nothing.
    """
    ALTER TABLE jobs ADD COLUMN dismissed_at REAL;
    """,
    # 11 → 12: the URL's query as received (``Event.query``), '' when there was none: the
    # events of a journal from before read as having none. A constant default rewrites nothing.
    """
    ALTER TABLE events ADD COLUMN query TEXT NOT NULL DEFAULT '';
    """,
)


def replayed_jobs(
    dead_only: bool, dismissed_only: bool, done_only: bool = False, cancelled_only: bool = False
) -> str:
    """The WHERE clause of the jobs a replay re-queues: every finished job, or the dead ones
    alone, or the dead ones dismissed (cancelled with ``dismissed_at``) alone, or the done ones
    alone (a delivery made again: a target that answered 2xx and lost it), or the cancelled ones
    not dismissed alone (``cancel`` undone)."""
    if dead_only + dismissed_only + done_only + cancelled_only > 1:
        raise ValueError("replay dead, dismissed, done or cancelled jobs, one of them")
    if dismissed_only:
        return "state = 'cancelled' AND dismissed_at IS NOT NULL"
    if cancelled_only:
        return "state = 'cancelled' AND dismissed_at IS NULL"
    if done_only:
        return "state = 'done'"
    return "state = 'dead'" if dead_only else "state NOT IN ('queued', 'running')"


def action_clause(action: str | None, placeholder: str) -> tuple[str, tuple[str, ...]]:
    """A replay's or a cancel's ``AND action = ?`` for the jobs of one action, with its
    argument; nothing for all of an event's jobs."""
    if action is None:
        return "", ()
    return f" AND action = {placeholder}", (action,)


def leaving_running(state: str, finished_at: str, now: str, j: str = "") -> str:
    """The SET clauses for a job that leaves ``running`` for ``state`` (an SQL expression)
    with ``finished_at``, ``now`` being the time it leaves: a job cancelled while it ran
    (``j`` + ``cancel_requested_at`` set) goes to ``cancelled`` instead of back to
    ``queued``. ``j``: the table's alias and a dot, where the statement has one."""
    cancelled = f"{j}cancel_requested_at IS NOT NULL AND {state} = 'queued'"
    return (
        f"state = CASE WHEN {cancelled} THEN 'cancelled' ELSE {state} END,"
        f" finished_at = CASE WHEN {cancelled} THEN {now} ELSE {finished_at} END,"
        " cancel_requested_at = NULL"
    )


# A job may start only when no older job of its (source, action, order key) is queued and no
# job of the key runs: the head of each key runs, the rest wait. A running job holds its key
# whatever its age: an older one replayed (it was dead) must not start beside a newer one
# running. Dead, done and cancelled jobs do not hold their key. (The partial index above is
# used only when its WHERE terms appear here verbatim.)
HEAD_OF_KEY = (
    "(j.order_key IS NULL OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.source = j.source"
    " AND o.action = j.action AND o.order_key = j.order_key"
    " AND (o.seq < j.seq OR o.state = 'running')"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running')))"
)


def next_lane(p: str, s: str, t: str) -> str:
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


# An event expires when none of its jobs is unfinished or finished recently enough to keep:
# done/cancelled after keep_done_s, dead after keep_dead_s. Parameters: (done before, dead before).
EXPIRED = (
    "NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id AND (j.state IN"
    " ('queued', 'running') OR (j.state IN ('done', 'cancelled') AND j.finished_at > ?)"
    " OR (j.state = 'dead' AND j.finished_at > ?)))"
)

# Jobs queued or running, counted in the two partial indexes that hold exactly those rows: an
# ``IN ('queued', 'running')`` on the table scans every job ever kept (27 ms at 300,000 jobs,
# against 0.2 ms this way), and retention asks after every round.
BACKLOG_SQL = (
    "SELECT (SELECT COUNT(*) FROM jobs WHERE state = 'queued')"
    " + (SELECT COUNT(*) FROM jobs WHERE state = 'running')"
)

READY_COLUMNS = "j.id, j.source, j.action, j.priority, j.tenant, j.order_key, j.seq"
LANES_PER_QUERY = 200  # parts of one UNION ALL (SQLite allows 500)

# The lanes (priority, source, tenant) that hold queued jobs, in index order from a cursor.
LANES_SQL = (
    "WITH RECURSIVE lane(p, s, t) AS ("
    f" SELECT priority, source, tenant FROM jobs WHERE seq = {next_lane(':p', ':s', ':t')}"
    " UNION ALL SELECT j.priority, j.source, j.tenant FROM lane, jobs j"
    f" WHERE j.seq = {next_lane('lane.p', 'lane.s', 'lane.t')} LIMIT :n)"
    " SELECT p, s, t FROM lane"
)


def fetch_rows(
    conn: sqlite3.Connection, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()
) -> list[sqlite3.Row]:
    return conn.execute(sql, args).fetchall()


async def fetch(
    conn: aiosqlite.Connection,
    sql: str,
    args: Sequence[Any] | tuple[Any, ...] | Mapping[str, Any] = (),
) -> list[sqlite3.Row]:
    """A read on the reader connection; one that fails (a page that reads back as garbage from
    a failing disk, a table gone) is a ``JournalError``: the admin API answers it 503 with
    Retry-After and ``/metrics`` says ``webhookd_journal_up 0``, as for a PostgreSQL outage.
    Not ``JournalUnavailable``, which the dispatcher waits out: a file that cannot be read
    does not heal by itself, and a dispatcher that cannot read it ends the daemon."""
    try:
        return list(await conn.execute_fetchall(sql, args))
    except sqlite3.Error as exc:
        raise JournalError(f"journal read failed: {exc}") from exc


STATE_FILTERS = {
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
EVENT_STATES = tuple(STATE_FILTERS)

# The jobs that can put an event in one of the states few events are in at a time (a job dead,
# running, queued or cancelled), each clause repeating the WHERE of the partial index that
# holds them (SQLite uses a partial index only for a query that states its WHERE). The filters
# above walk the events newest first and look at each one's jobs, which for a state that no
# recent event is in means every event in the journal (a second for 500,000, at each of the
# dashboard's polls); while at most ``FEW_STATE_JOBS`` jobs are in the state, a list starts
# from those jobs instead (measured with 500,000 events, the newest 200,000 without a dead
# job: 600 dead jobs listed in 6 ms against 390 for the walk, 6,000 in 50, 60,000 in 200
# against 320; about even at 120,000). Past that many the state is common, and the walk finds
# its page sooner. (SQLite only: PostgreSQL's planner finds the cheaper way by itself.)
STATE_JOBS = {
    "dead": "state = 'dead' AND state IN ('done', 'dead', 'cancelled')",
    "cancelled": "state = 'cancelled' AND state IN ('done', 'dead', 'cancelled')",
    "running": "state = 'running'",
    "queued": "state = 'queued'",
}
FEW_STATE_JOBS = 100_000


def few_jobs_sql(where: str) -> str:
    """SQL for whether at most ``FEW_STATE_JOBS`` jobs match ``where`` (one of the fixed
    clauses above), counting no further than one past it."""
    limit = FEW_STATE_JOBS
    return (
        f"SELECT COUNT(*) <= {limit} FROM (SELECT 1 FROM jobs WHERE {where} LIMIT {limit + 1})"
        " AS few"
    )


EVENT_COLUMNS = (
    "e.id AS e_id, e.source AS e_source, e.received_at AS e_received_at,"
    " e.dedup_key AS e_dedup_key, e.tenant AS e_tenant, e.priority AS e_priority,"
    " e.headers AS e_headers, e.body AS e_body, e.verified AS e_verified, e.query AS e_query"
)
JOB_COLUMNS = (
    "j.id, j.event_id, j.action, j.type, j.state, j.attempts, j.max_attempts, j.run_at,"
    " j.recoveries, j.result, j.last_error, j.waits"
)


_STATES = {str(s): s for s in JobState}
_PRIORITIES = {int(p): p for p in Priority}


def claimed_from_row(r: Any) -> tuple[Job, Event, int]:
    """A claimed job, its event and its waits from a row of ``JOB_COLUMNS, EVENT_COLUMNS``, by
    position: the claim converts a row per job started, and names and enum calls cost more
    there than the SQL does."""
    headers = json.loads(r[18])
    job = Job(
        id=r[0],
        event_id=r[1],
        action=r[2],
        type=r[3],
        state=_STATES[r[4]],
        attempts=r[5],
        max_attempts=r[6],
        run_at=r[7],
        recoveries=r[8],
        result=stored_json(r[9]) if r[9] is not None else None,
        last_error=r[10],
    )
    event = Event(
        id=r[12],
        source=r[13],
        received_at=r[14],
        dedup_key=r[15],
        tenant=r[16],
        priority=_PRIORITIES[r[17]],
        headers=tuple((k, v) for k, v in headers),
        body=bytes(r[19]),
        verified=json.loads(r[20]) if r[20] else None,
        query=r[21],
    )
    return job, event, int(r[11])


def event_from_row(r: sqlite3.Row) -> Event:
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
        query=r["e_query"],
    )


def job_from_row(r: sqlite3.Row, history: tuple[Attempt, ...] = ()) -> Job:
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
        result=stored_json(r["result"]) if r["result"] is not None else None,
        last_error=r["last_error"],
        history=history,
    )


def stored_json(text: str) -> Any:
    """A job's result or an attempt's detail as the journal holds it, read. One this process
    cannot read, an int past the 4,300 digits Python reads (written while a handler had lifted
    that limit for the whole daemon), is its text, saying why: an error here failed every read
    of its event, the events API's answer a 500 and ``show`` and ``replay`` a traceback, and
    its job's claim."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"<not read as JSON here: {exc}> {text}"


def _stored_detail(text: str) -> Mapping[str, Any]:
    """``stored_json`` for an attempt's detail, which its readers take as a mapping."""
    detail = stored_json(text)
    return detail if isinstance(detail, Mapping) else {"unread": detail}


def job_history_sql(param: str) -> str:
    """SQL for an event's jobs with their attempts, one row per attempt (a job without any: one
    row, its attempt columns NULL), jobs and attempts in order. ``param`` is the backend's
    placeholder for the event id. One statement, so one snapshot: read apart, a job could be
    seen still running beside its attempt already finished and requeued."""
    return (
        f"SELECT {JOB_COLUMNS}, a.n AS a_n, a.started_at AS a_started_at,"
        " a.finished_at AS a_finished_at, a.outcome AS a_outcome, a.error AS a_error,"
        " a.detail AS a_detail, j.cancel_requested_at IS NOT NULL AS cancel_requested,"
        f" j.finished_at AS j_finished_at, {WAITING_FOR} AS waiting_for,"
        " j.dismissed_at AS j_dismissed_at"
        f" FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id WHERE j.event_id = {param}"
        " ORDER BY j.seq, a.seq"
    )


# For a queued job of an order key that may not start (``HEAD_OF_KEY``), the job it waits
# for: one of its key running, else the key's oldest unfinished; NULL for any other job.
WAITING_FOR = (
    "CASE WHEN j.state = 'queued' AND j.order_key IS NOT NULL THEN (SELECT o.id FROM jobs o"
    " WHERE o.source = j.source AND o.action = j.action AND o.order_key = j.order_key"
    " AND (o.seq < j.seq OR o.state = 'running')"
    " AND o.order_key IS NOT NULL AND o.state IN ('queued', 'running')"
    " ORDER BY CASE WHEN o.state = 'running' THEN 0 ELSE 1 END, o.seq LIMIT 1) END"
)


def event_detail(event_row: Any, rows: Sequence[Any]) -> EventDetail:
    """One event with its jobs and their attempts, from the rows either backend reads: the
    event's columns plus ``filtered``, and ``job_history_sql``'s rows."""
    jobs = []
    for _, job_rows in itertools.groupby(rows, key=lambda r: r["id"]):
        group = list(job_rows)
        history = tuple(
            Attempt(
                n=r["a_n"],
                started_at=r["a_started_at"],
                finished_at=r["a_finished_at"],
                outcome=r["a_outcome"],
                error=r["a_error"],
                detail=_stored_detail(r["a_detail"]) if r["a_detail"] else None,
            )
            for r in group
            if r["a_n"] is not None
        )
        first = group[0]
        job = job_from_row(first, history)
        job = dataclasses.replace(
            job,
            cancel_requested=bool(first["cancel_requested"]),
            finished_at=first["j_finished_at"],
            waiting_for=first["waiting_for"],
            dismissed_at=first["j_dismissed_at"],
        )
        jobs.append(job)
    filtered = tuple(json.loads(event_row["filtered"])) if event_row["filtered"] else ()
    state = event_state([str(j.state) for j in jobs])  # no jobs (all filtered): done
    return EventDetail(event_from_row(event_row), state, tuple(jobs), filtered)


def dump(value: Any) -> str | None:
    """A result's or an attempt's detail as JSON text. Never an error: the outcomes are written
    in batches, and one the writer could not write would fail every batch it joined, holding
    up every other job's outcome; what cannot be JSON is kept as a note of what it was."""
    if value is None:
        return None
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        return json.dumps(f"<{type(value).__name__} that cannot be written as JSON: {exc}>")


def attempt_row(f: Finished) -> tuple[Any, ...]:
    """An attempt's row in ``attempts``: (job_id, n, started_at, finished_at, outcome, error,
    detail), in both journals."""
    detail = dump(dict(f.detail)) if f.detail else None
    return (f.job_id, f.attempt, f.started_at, f.finished_at, f.outcome, f.error, detail)
