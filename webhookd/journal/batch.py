"""One group commit's work: the queued operations and the SQL that writes a batch of them.

Runs on the writer's thread, inside the transaction the journal opened; nothing here commits.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring_ascii
from typing import Any, ClassVar

from webhookd.journal.records import (
    Cap,
    CapClaim,
    Claimed,
    Finished,
    Ingested,
    NewEvent,
    NewJob,
    Ready,
    Starter,
)
from webhookd.journal.schema import (
    BEHIND_AT_INSERT,
    EVENT_COLUMNS,
    HEAD_OF_KEY,
    JOB_COLUMNS,
    attempt_row,
    claimed_from_row,
    dump,
    fetch_rows,
    key_digest,
    leaving_running,
)
from webhookd.models import Event, Job, JobState

# One compact encoder made once: ``json.dumps(..., separators=...)`` builds a new encoder on
# every call, which costs as much as the encoding itself on the ingest path.
_compact = json.JSONEncoder(separators=(",", ":")).encode
_quote = encode_basestring_ascii


def headers_json(headers: Sequence[tuple[str, str]]) -> str:
    """``headers`` as compact ASCII JSON, the text ``_compact`` makes, built from quoted
    strings directly: the encoder's setup per call cost twice the quoting of a few headers."""
    try:
        return "[" + ",".join(["[" + _quote(k) + "," + _quote(v) + "]" for k, v in headers]) + "]"
    except (TypeError, ValueError):  # not pairs of strings (a hand-built event): the encoder
        return _compact(headers)


@dataclass(slots=True)
class Op:
    future: asyncio.Future[Any]
    # Whether the commit that writes it must be fsync'd before its waiter hears of it. A group
    # made only of operations that need not is committed without a sync of its own.
    synced: ClassVar[bool] = True


@dataclass(slots=True)
class IngestOp(Op):
    item: NewEvent


@dataclass(slots=True)
class ClaimOp(Op):
    job_ids: Sequence[str]
    boot_id: str
    now: float
    caps: Mapping[str, Sequence[Cap]] | None = None  # by job id; None: a plain claim
    # A claim needs no fsync of its own: its frames are in the WAL, in the kernel's hands, so it
    # outlives a crash of the daemon (what the poison-pill rule counts), and the next fsync'd
    # commit or checkpoint makes it durable. Only a power cut before then can lose it, and the
    # job then runs again, as at-least-once allows. The job starts one fsync sooner.
    synced: ClassVar[bool] = False


@dataclass(slots=True)
class FinishOp(Op):
    results: Sequence[Finished]
    # PostgreSQL: the claim token each outcome answers, one per result (None: no claim held),
    # bound when the outcome first reached the journal. SQLite leaves it empty.
    claims: Sequence[str | None] = ()


@dataclass(slots=True)
class CallOp(Op):
    """Any other write: runs alone in its own transaction."""

    fn: Any  # (sqlite3.Connection) -> result, run on the writer's thread
    transaction: bool = True  # False for PRAGMAs that cannot run inside one (checkpoints)


# Turns of the event loop a group waits for more operations before its commit (``OpQueue.take``).
# Under load, the connections a commit answered send their next webhooks a few turns later
# (answer written, request read, handler run): without the wait they came too late for the next
# group and the groups settled at half the connections each, two alternating halves. A commit
# has a cost of its own whatever its size (SQLite: the last page of every index written to the
# WAL, the sync; PostgreSQL: a round trip and the server's WAL flush). Measured with 64
# connections and the server on one core, the policy switched every 0.3 s inside one process
# (so a slow spell hits both): groups of 64 instead of 32; on SQLite (4 runs) 3-12 % more
# webhooks/s and 6-15 % less CPU per webhook, on PostgreSQL (2 runs, the server on the same
# machine) 14 % more and 12 % less. Alone, a turn is a poll of the sockets.
GATHER_PASSES = 4


class OpQueue:
    """Operations waiting for a journal's one writer task, taken a batch at a time.

    A list and a wake-up future: ``asyncio.Queue`` keeps unfinished-task counts and waiter
    queues for many consumers, which cost ~1 µs per webhook on each of ``put`` and ``get`` for a
    queue with one consumer that takes everything waiting at once. After ``close()`` the writer
    still takes what is queued, then ``take`` answers ``[]``.
    """

    __slots__ = ("_ops", "_wakeup", "body_bytes", "closed", "ingests")

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._wakeup: asyncio.Future[None] | None = None
        self.closed = False
        # The ingests queued, not yet taken by the writer, and their webhook bodies: what a
        # writer that hangs (a stalled disk, a database gone silent) keeps in memory. Each
        # holds its headers too (up to 32 KB): bodies alone let empty ones pile up unbounded.
        self.ingests = 0
        self.body_bytes = 0

    def __len__(self) -> int:
        return len(self._ops)

    def put(self, op: Op) -> None:
        if type(op) is IngestOp:
            self.ingests += 1
            self.body_bytes += len(op.item.event.body)
        self._ops.append(op)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self, limit: int, passes: int = 0) -> list[Op]:
        """Up to ``limit`` operations, oldest first, waiting for one if none is queued.

        With ``passes``, the event loop then gets up to that many turns to queue more before
        the batch is handed over; the first turn that queues any ends the wait (a group of
        connections answered together sends its next requests together). A turn with nothing
        ready to run costs a poll of the sockets, a few microseconds.
        """
        while not self._ops:
            if self.closed:
                return []
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        batch = self._take_now(limit)
        for _ in range(passes):
            if len(batch) >= limit or self.closed:
                break
            await asyncio.sleep(0)
            if self._ops:
                batch += self._take_now(limit - len(batch))
                break
        return batch

    def _take_now(self, limit: int) -> list[Op]:
        ops = self._ops
        if len(ops) <= limit:
            self._ops = []
            batch = ops
        else:
            batch = ops[:limit]
            del ops[:limit]
        bodies = [len(op.item.event.body) for op in batch if type(op) is IngestOp]
        self.ingests -= len(bodies)
        self.body_bytes -= sum(bodies)
        return batch

    def drain(self) -> list[Op]:
        """Everything still queued (to fail it when the writer is gone)."""
        ops, self._ops = self._ops, []
        return ops


@dataclass(frozen=True, slots=True)
class Starts:
    """New jobs of a group to write as claimed (``Starter``), and by whom."""

    job_ids: frozenset[str]
    boot_id: str


NO_STARTS = Starts(frozenset(), "")


@dataclass(slots=True)
class Group:
    """One batch on its way through the writer's thread, and what became of it.

    ``ops`` (ingests, finishes, claims) are written in one transaction; should a value in one of
    them fail it (a string SQLite cannot encode, say), they are written again one by one, so
    ``results`` and ``errors`` are kept per operation, keyed by ``id(op)``.
    """

    ops: list[Op]
    calls: list[CallOp]
    now: float
    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    called: list[tuple[Any, BaseException | None]] = field(default_factory=list)
    commits: int = 0
    error: Exception | None = None  # the group failed as a whole: nothing of it was written
    checkpoint_tail: bool = False  # copy the WAL's last frames back before writing (journal)
    starts: Starts = NO_STARTS  # new jobs to write claimed (``reserve_starts``)
    started: list[Claimed] = field(default_factory=list)  # and those that were
    # Wall time of a synced group's transactions on the writer's thread (``on_commit_seconds``).
    write_s: float = 0.0


class WriteFailed(Exception):
    """A call's transaction failed in SQLite (as opposed to the operation raising)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def reserve_starts(starter: Starter | None, ops: Sequence[Op]) -> Starts:
    """Offer a group's new jobs to ``starter`` if all of them could start now (for either
    backend). All or none: when some must wait, the scheduler picks which go first."""
    if starter is None:
        return NO_STARTS
    room = starter.room_at_commit()
    if room <= 0:
        return NO_STARTS
    ingests = [op.item for op in ops if isinstance(op, IngestOp)]
    if not 0 < sum(len(item.jobs) for item in ingests) <= room:
        return NO_STARTS
    taken = starter.reserve(ingests)
    return Starts(taken, starter.boot_id) if taken else NO_STARTS


def write_ops(
    conn: sqlite3.Connection, ops: Sequence[Op], now: float, starts: Starts = NO_STARTS
) -> dict[int, Any]:
    """Write ingests, then finishes, then claims; returns each one's result by ``id(op)``."""
    results: dict[int, Any] = {}
    ingests = [op for op in ops if isinstance(op, IngestOp)]
    if ingests:
        written = write_ingests(conn, ingests, now, starts)
        for iop, ingested in zip(ingests, written, strict=True):
            results[id(iop)] = ingested
    # A group's outcomes in one go: one job per op mostly (each job's task records its own),
    # and the statements cost per call more than per row.
    finishes = [op for op in ops if isinstance(op, FinishOp)]
    if finishes:
        cancelled = write_finishes(conn, [f for fop in finishes for f in fop.results])
        for fop in finishes:
            results[id(fop)] = cancelled.intersection(f.job_id for f in fop.results)
    for op in ops:
        if isinstance(op, ClaimOp):
            results[id(op)] = write_claim(conn, op)
    return results


# What one ingest came to: its answer, its new queued jobs (for the window), and its new jobs
# written as claimed (to start now).
IngestResult = tuple[Ingested, list[Ready], list[Claimed]]


@dataclass(slots=True)
class SortedIngests:
    """A group's ingests split by who owns their dedup keys (``sort_ingests``)."""

    results: list[IngestResult] = field(default_factory=list)
    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    job_rows: list[tuple[Any, ...]] = field(default_factory=list)  # queued
    start_rows: list[tuple[Any, ...]] = field(default_factory=list)  # claimed (same columns)
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (key, event id) to delete


def sort_ingests(
    ops: Sequence[IngestOp],
    owners: Mapping[str, str],
    start: frozenset[str] = frozenset(),
    claim: str = "",
) -> SortedIngests:
    """Split a group's ingests by who owns their dedup keys (``owners``: key → event id, for the
    keys another event holds), for either backend: each one's answer, the event and job rows
    to insert (the jobs in ``start`` apart, to be written claimed), and the (key, event id)
    rows of duplicates to take back out. ``claim`` names the claim the jobs in ``start`` are
    written under (``Claimed.claim``).

    An event is a duplicate when either of its keys names another event; then one of its two
    keys may have gone in, naming an event that will never exist, so both are orphans. A key
    that names an earlier event of this group which is itself a duplicate (a signed body sent
    again under a fresh delivery id, several times at once: the first copy took the new id)
    names that event's owner: the answer's id is an event that exists.
    """
    out = SortedIngests()
    results, event_rows, job_rows, orphans = out.results, out.event_rows, out.job_rows, out.orphans
    became: dict[str, str] = {}  # an event of this group found a duplicate → the one it is of
    for op in ops:
        e = op.item.event
        body_key = op.item.body_key
        owner = owners.get(e.dedup_key, e.id)
        if owner == e.id and body_key is not None:
            owner = owners.get(body_key, e.id)
        owner = became.get(owner, owner)
        if owner != e.id:
            became[e.id] = owner
            results.append((Ingested(owner, duplicate=True), [], []))
            if body_key is not None:
                orphans += [(e.dedup_key, e.id), (body_key, e.id)]
            continue
        verified = json.dumps(e.verified) if e.verified is not None else None
        event_rows.append(
            (
                e.id,
                e.source,
                e.received_at,
                e.dedup_key,
                e.tenant,
                int(e.priority),
                headers_json(e.headers),
                e.body,
                verified,
                json.dumps(op.item.filtered) if op.item.filtered else None,
                e.query,
            )
        )
        ready = []
        started: list[Claimed] = []
        for j in op.item.jobs:
            if j.id in start:
                out.start_rows.append(job_row(e, j))
                started.append(claimed_at_ingest(e, j, verified, claim))
                continue
            job_rows.append(job_row(e, j))
            ready.append(Ready(j.id, e.source, j.action, int(e.priority), e.tenant, j.order_key, 0))
        results.append((Ingested(e.id, duplicate=False), ready, started))
    return out


def job_row(e: Event, j: NewJob) -> tuple[Any, ...]:
    """A new job's row: (id, event id, source, action, type, priority, tenant, order key,
    run at, max attempts)."""
    return (
        j.id,
        e.id,
        e.source,
        j.action,
        j.type,
        int(e.priority),
        e.tenant,
        j.order_key,
        e.received_at,
        j.max_attempts,
    )


def claimed_at_ingest(e: Event, j: NewJob, verified: str | None, claim: str = "") -> Claimed:
    """A job written claimed by its event's commit, as a claim would read it back: first
    attempt, due at receipt, the event's ``verified`` through JSON like the stored copy."""
    job = Job(
        id=j.id,
        event_id=e.id,
        action=j.action,
        type=j.type,
        state=JobState.RUNNING,
        attempts=1,
        max_attempts=j.max_attempts,
        run_at=e.received_at,
    )
    if verified is not None:
        e = replace(e, verified=json.loads(verified))
    return Claimed(job, e, 0, claim)


# Rows per INSERT statement at most; ``insert_rows`` takes 64, 32, … 1 at a time, so a table
# has at most seven statements to cache, each binding at most 64 × 11 values: under the 999
# that older SQLite builds allow.
_ROWS_PER_INSERT = 64
_INSERTS: dict[tuple[str, int], str] = {}


_JOB_COLUMNS = "id, event_id, source, action, type, state, priority, tenant, order_key, run_at"
_INSERT_JOBS = (
    f"INSERT INTO jobs({_JOB_COLUMNS}, max_attempts)"
    " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)"
)
_INSERT_KEYED_JOBS = (
    f"INSERT INTO jobs({_JOB_COLUMNS}, max_attempts, behind)"
    f" VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, {BEHIND_AT_INSERT})"
)


def insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """What ``conn.executemany(sql, rows)`` does for an ``INSERT … VALUES (…)``, with many rows
    per statement; returns how many rows went in.

    ``executemany`` steps its statement once per row, and the sqlite3 module hands the GIL
    over and takes it back around every step. Measured on one core (a dedup key and an event
    row per webhook, groups of 28, 8 alternated runs, three times): 59-61 µs of CPU per
    webhook against 67.6.
    """
    inserted = 0
    done = 0
    while done < len(rows):
        n = _ROWS_PER_INSERT
        while n > len(rows) - done:
            n //= 2
        many = _INSERTS.get((sql, n))
        if many is None:
            head, _, one = sql.rpartition(" VALUES ")
            many = _INSERTS[(sql, n)] = f"{head} VALUES {', '.join([one] * n)}"
        args = list(itertools.chain.from_iterable(rows[done : done + n]))
        inserted += conn.execute(many, args).rowcount
        done += n
    return inserted


def write_ingests(
    conn: sqlite3.Connection, ops: list[IngestOp], now: float, starts: Starts = NO_STARTS
) -> list[IngestResult]:
    texts: list[str] = []  # each key, beside its row in ``keys``
    keys = []
    for op in ops:
        e = op.item.event
        texts.append(e.dedup_key)
        keys.append((key_digest(e.dedup_key), e.id, now))
        if op.item.body_key is not None:
            texts.append(op.item.body_key)
            keys.append((key_digest(op.item.body_key), e.id, now))
    inserted = insert_rows(
        conn, "INSERT OR IGNORE INTO dedup(digest, event_id, created_at) VALUES (?, ?, ?)", keys
    )
    owners: dict[str, str] = {}
    # Every key went in (the usual case): each event owns its own keys, nothing to read back.
    if inserted != len(keys):
        by_digest = {k[0]: text for k, text in zip(keys, texts, strict=True)}
        digests = list(by_digest)
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = fetch_rows(
                conn, f"SELECT digest, event_id FROM dedup WHERE digest IN ({marks})", chunk
            )
            owners.update({by_digest[row[0]]: row[1] for row in rows})
    out = sort_ingests(ops, owners, starts.job_ids)
    if out.orphans:
        conn.executemany(
            "DELETE FROM dedup WHERE digest = ? AND event_id = ?",
            [(key_digest(key), event_id) for key, event_id in out.orphans],
        )
    if out.event_rows:
        insert_rows(
            conn,
            "INSERT INTO events(id, source, received_at, dedup_key, tenant, priority, headers,"
            " body, verified, filtered, query) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            out.event_rows,
        )
    # In arrival order (seq), runs of jobs without an order key many rows per statement; one
    # with a key alone, marked ``behind`` when a job of its key is unfinished, the jobs just
    # written before it included.
    for keyed, run in itertools.groupby(out.job_rows, key=lambda row: row[7] is not None):
        if not keyed:
            insert_rows(conn, _INSERT_JOBS, list(run))
            continue
        conn.executemany(_INSERT_KEYED_JOBS, [(*row, row[2], row[3], row[7]) for row in run])
    if out.start_rows:
        # Claimed as ``write_claim`` would: one attempt, this boot's, from now.
        insert_rows(
            conn,
            "INSERT INTO jobs(id, event_id, source, action, type, state, priority, tenant,"
            " order_key, run_at, max_attempts, attempts, boot_id, claimed_at)"
            " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, 1, ?, ?)",
            [(*row, starts.boot_id, now) for row in out.start_rows],
        )
    return out.results


def admit(
    job_ids: Sequence[str],
    claimable: Iterable[str],
    caps: Mapping[str, Sequence[Cap]],
    running: Mapping[str, int],
) -> tuple[list[str], frozenset[str]]:
    """Which of the claimable jobs fit their caps (``running``: jobs running per cap key), taken
    in the order of ``job_ids``, each admitted one counting against the next; and the keys of
    the caps that kept a job back. For both backends."""
    can = set(claimable)
    held = Counter(running)
    admitted: list[str] = []
    full: set[str] = set()
    for job_id in job_ids:
        if job_id not in can:
            continue
        mine = caps.get(job_id, ())
        over = [c.key for c in mine if held[c.key] >= c.limit]
        if over:
            full.update(over)
            continue
        for c in mine:
            held[c.key] += 1
        admitted.append(job_id)
    return admitted, frozenset(full)


def write_claim(conn: sqlite3.Connection, op: ClaimOp) -> CapClaim:
    if not op.job_ids:
        return CapClaim([], frozenset())
    marks = ",".join("?" * len(op.job_ids))
    # Which are still queued, read inside the write transaction: only those are claimed and
    # returned (a job this boot already runs is not handed out twice, whatever the clock says),
    # and only when due and at the head of its order key, as ``ready`` would have found it (a
    # copy read before the job ran and was queued again for a retry does not skip its backoff).
    queued = [
        r[0]
        for r in fetch_rows(
            conn,
            f"SELECT j.id FROM jobs j WHERE j.id IN ({marks}) AND j.state = 'queued'"
            f" AND j.run_at <= ? AND {HEAD_OF_KEY}",
            (*op.job_ids, op.now),
        )
    ]
    full: frozenset[str] = frozenset()
    if op.caps is not None and queued:
        # Another process on this file (or this one's own jobs) may hold the caps' slots: the
        # running jobs say which keys they carry. Few jobs run at once, so this read is short.
        running: Counter[str] = Counter()
        for (keys,) in conn.execute(
            "SELECT caps FROM jobs WHERE state = 'running' AND caps IS NOT NULL"
        ):
            running.update(json.loads(keys))
        queued, full = admit(op.job_ids, queued, op.caps, running)
    if not queued:
        return CapClaim([], full)
    # One UPDATE per set of caps the jobs hold (one in all for a plain claim): jobs of one
    # action mostly share theirs.
    by_caps: dict[str | None, list[str]] = {}
    for job_id in queued:
        mine = op.caps.get(job_id) if op.caps else None
        by_caps.setdefault(json.dumps([c.key for c in mine]) if mine else None, []).append(job_id)
    for caps, ids in by_caps.items():
        conn.execute(
            f"UPDATE jobs SET state = 'running', attempts = attempts + 1, boot_id = ?,"
            f" claimed_at = ?, caps = ? WHERE id IN ({','.join('?' * len(ids))})",
            (op.boot_id, op.now, caps, *ids),
        )
    marks = ",".join("?" * len(queued))
    rows = fetch_rows(
        conn,
        f"SELECT {JOB_COLUMNS}, {EVENT_COLUMNS} FROM jobs j JOIN events e"
        f" ON e.id = j.event_id WHERE j.id IN ({marks})",
        queued,
    )
    claimed = [Claimed(*claimed_from_row(r)) for r in rows]
    return CapClaim(claimed, full)


def write_finishes(conn: sqlite3.Connection, results: Sequence[Finished]) -> frozenset[str]:
    """Record outcomes; returns the ids of jobs a cancel kept from being queued again (they
    ended ``cancelled``: see ``leaving_running``). Only outcomes that re-queue can be such, and
    they are the rare ones: an outcome that ends a job costs no read."""
    updates = []
    attempts = []
    for f in results:
        wait = f.outcome == "wait"
        updates.append(
            {
                "state": str(f.state),
                "run_at": f.run_at if f.run_at is not None else f.finished_at,
                # Kept on a retry too when the attempt left one (work done before it failed).
                "result": dump(f.result) if f.result is not None else None,
                "error": f.error,
                "finished": f.finished_at if f.state in (JobState.DONE, JobState.DEAD) else None,
                "wait": 1 if wait else 0,
                "counted": 1 if f.counted_wait else 0,
                "id": f.job_id,
                "now": f.finished_at,
            }
        )
        if not wait:
            attempts.append(attempt_row(f))
    conn.executemany(
        # Named, not numbered (?1): Python 3.12.0-3.12.3 warn of numbered ones bound by
        # position, and 3.14 was to refuse them.
        f"UPDATE jobs SET {leaving_running(':state', ':finished', ':now')}, run_at = :run_at,"
        " result = :result, last_error = :error, boot_id = NULL, attempts = attempts - :wait,"
        " waits = waits + :counted WHERE id = :id",
        updates,
    )
    if attempts:
        insert_rows(
            conn,
            "INSERT INTO attempts(job_id, n, started_at, finished_at, outcome, error, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            attempts,
        )
    requeued = [f.job_id for f in results if f.state == JobState.QUEUED]
    if not requeued:
        return frozenset()
    marks = ",".join("?" * len(requeued))
    rows = conn.execute(
        f"SELECT id FROM jobs WHERE state = 'cancelled' AND id IN ({marks})", requeued
    ).fetchall()
    return frozenset(r[0] for r in rows)
