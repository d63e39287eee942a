"""The SQL of the PostgreSQL journal's writes; each function runs inside a transaction its
caller opened on one asyncpg connection, and nothing here commits.

Rows go in with ``unnest`` over arrays: one round trip per table however many webhooks a group
commit carries (COPY would be faster but cannot say ``ON CONFLICT``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from webhookd.journal.batch import IngestOp, IngestResult, admit, sort_ingests
from webhookd.journal.records import (
    Cap,
    CapClaim,
    Claimed,
    Finished,
    Poisoned,
    Recovery,
)
from webhookd.journal.schema import (
    EVENT_COLUMNS,
    HEAD_OF_KEY,
    JOB_COLUMNS,
    attempt_row,
    dump,
    event_from_row,
    job_from_row,
    leaving_running,
)
from webhookd.models import JobState


async def write_ingests(
    conn: Any,
    ops: Sequence[IngestOp],
    now: float,
    start: frozenset[str] = frozenset(),
    claim: tuple[str, str, float] = ("", "", 0.0),
    hold_taken: bool = False,
) -> list[IngestResult]:
    """Dedup keys, then events and jobs; a key already held (by a committed event, another
    node's included, or an earlier one in this batch) makes its event a duplicate. The jobs in
    ``start`` are written claimed, as ``write_claim`` would, by ``claim``: (node id, token,
    lease in seconds). ``hold_taken`` (a database with synchronous standbys): the keys found
    taken are locked, so that the commit waits for the standbys (see below)."""
    claims: dict[str, str] = {}  # key → the first event in this batch that brings it
    for op in ops:
        e = op.item.event
        for key in (e.dedup_key, op.item.body_key):
            if key is not None:
                claims.setdefault(key, e.id)
    # Sorted, so two nodes' batches sharing keys take their row locks in one order (no deadlock).
    keys = sorted(claims)
    status = await conn.execute(
        "INSERT INTO dedup (key, event_id, created_at)"
        " SELECT k, ev, $3 FROM unnest($1::text[], $2::text[]) AS u(k, ev) ORDER BY k"
        " ON CONFLICT (key) DO NOTHING",
        keys,
        [claims[k] for k in keys],
        now,
    )
    owners: dict[str, str] = dict(claims)
    if int(status.rsplit(" ", 1)[-1]) != len(keys):
        # A duplicate is answered as the event that holds its key, which may be on the primary
        # alone: a commit whose wait for the synchronous standbys was cancelled (cut at its
        # deadline, a restart) stands there. With standbys, the keys found taken are therefore
        # locked (the weakest lock, which only a delete waits for): a row lock is written to
        # the WAL, so this batch's commit waits for the standbys as a new event's does, and
        # they confirm it only once they have every commit before it. Else a batch of
        # duplicates alone wrote nothing, did not wait, and a provider's retry of a webhook
        # answered 503 was answered 2xx while no standby had it. Without standbys the holder's
        # commit is as durable as any, and the lock would only cost a flush.
        rows = await conn.fetch(
            "SELECT key, event_id FROM dedup WHERE key = ANY($1::text[])"
            + (" FOR KEY SHARE" if hold_taken else ""),
            keys,
        )
        owners.update({r[0]: r[1] for r in rows})
    out = sort_ingests(ops, owners, start, claim[1])
    events, jobs, orphans = out.event_rows, out.job_rows, out.orphans
    if orphans:
        await conn.execute(
            "DELETE FROM dedup d USING unnest($1::text[], $2::text[]) AS u(k, ev)"
            " WHERE d.key = u.k AND d.event_id = u.ev",
            [k for k, _ in orphans],
            [ev for _, ev in orphans],
        )
    if events:
        await conn.execute(
            "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority, headers,"
            " body, verified, filtered, query) SELECT * FROM unnest($1::text[], $2::text[],"
            " $3::double precision[], $4::text[], $5::text[], $6::integer[], $7::text[],"
            " $8::bytea[], $9::text[], $10::text[], $11::text[])",
            *_columns(events, 11),
        )
    if jobs:
        await conn.execute(
            "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
            " order_key, run_at, max_attempts) SELECT u.id, u.ev, u.src, u.act, u.typ, 'queued',"
            " u.pri, u.ten, u.ok, u.run, u.max FROM unnest($1::text[], $2::text[], $3::text[],"
            " $4::text[], $5::text[], $6::integer[], $7::text[], $8::text[],"
            " $9::double precision[], $10::integer[])"
            " AS u(id, ev, src, act, typ, pri, ten, ok, run, max)",
            *_columns(jobs, 10),
        )
    if out.start_rows:
        node_id, token, lease_s = claim
        await conn.execute(
            "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
            " order_key, run_at, max_attempts, attempts, node_id, claim_token, claimed_at,"
            " lease_until) SELECT u.id, u.ev, u.src, u.act, u.typ, 'running', u.pri, u.ten, u.ok,"
            " u.run, u.max, 1, $11, $12, $13::double precision,"
            " $13::double precision + $14::double precision FROM unnest($1::text[], $2::text[],"
            " $3::text[], $4::text[], $5::text[], $6::integer[], $7::text[], $8::text[],"
            " $9::double precision[], $10::integer[])"
            " AS u(id, ev, src, act, typ, pri, ten, ok, run, max)",
            *_columns(out.start_rows, 10),
            node_id,
            token,
            now,
            lease_s,
        )
    return out.results


# The events ``prune`` may delete: older than ``keep_done`` ($1) and not older than where the
# walk starts ($4), no job queued, running, or finished within its window ($1 for done and
# cancelled, $2 for dead), oldest first, at most $3.
# Walked by ``received_at`` (``events_received``) from the oldest, each one's jobs looked up
# by ``jobs_event``; the subquery's ``LIMIT 1`` keeps the planner from making it an anti-join,
# which read every job of the last ``keep_done_h`` into a hash at each round (80 ms at 100,000
# such jobs, and growing with them) to rule out the few thousand old events kept for their dead
# jobs (27 ms this way, growing only with those).
_NO_KEPT_JOB = (
    "(SELECT 1 FROM jobs j WHERE j.event_id = e.id AND (j.state IN ('queued', 'running')"
    " OR (j.state IN ('done', 'cancelled') AND j.finished_at > $1)"
    " OR (j.state = 'dead' AND j.finished_at > $2)) LIMIT 1) IS NULL"
)
PRUNE_SQL = (
    "SELECT e.id, e.received_at FROM events e WHERE e.received_at < $1 AND e.received_at >= $4 AND"
    f" {_NO_KEPT_JOB} ORDER BY e.received_at LIMIT $3 FOR UPDATE SKIP LOCKED"
)
# Of the candidates ``PRUNE_SQL`` locked ($3), those still expired, asked again once the locks
# are held. The candidates' jobs were judged on the snapshot taken as that statement began, and
# its row locks come later: a replay that committed in between (its own lock on the event
# already released, so SKIP LOCKED did not skip it) has re-queued jobs the snapshot cannot see.
# Under READ COMMITTED this statement's snapshot sees that commit, and no replay can commit on
# these events any more (its lock waits for ours), so what passes here may be deleted.
PRUNE_RECHECK_SQL = f"SELECT e.id FROM events e WHERE e.id = ANY($3::text[]) AND {_NO_KEPT_JOB}"


def _columns(rows: list[tuple[Any, ...]], n: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(n)]


async def write_group(
    conn: Any,
    ingests: Sequence[IngestOp],
    results: Sequence[Finished],
    tokens: Sequence[str | None],
    now: float,
    start: frozenset[str],
    claim: tuple[str, str, float],
    hold_taken: bool = False,
) -> tuple[list[IngestResult], tuple[set[int], frozenset[str], set[int]]]:
    """One group commit: outcomes (``write_finishes``), then ingests (``write_ingests``, with
    ``hold_taken``).

    In this order: outcomes lock the jobs they end, and an ingest behind a job of its key
    share-locks that job last of all (the ``behind`` mark's lock, skipping a job being
    written), then waits on nothing. Ingests first, two nodes each ingesting behind a job the
    other was ending each held what the other waited for: a deadlock."""
    finished = (
        await write_finishes(conn, results, tokens) if results else (set(), frozenset(), set())
    )
    ingested = await write_ingests(conn, ingests, now, start, claim, hold_taken) if ingests else []
    return ingested, finished


async def write_unclaims(
    conn: Any, held: Mapping[str, str], cut: Sequence[Finished], now: float
) -> None:
    """Give back claimed jobs (job id → claim token) without counting their attempt, first
    recording each attempt a drain cut off (``cut``) of those this claim still holds, and the
    result it kept (an openai answer), as a failed attempt's is."""
    kept = {f.job_id: dump(f.result) for f in cut if f.result is not None}
    rows = [(*attempt_row(f), held[f.job_id]) for f in cut if f.job_id in held]
    if rows:
        await conn.execute(
            "INSERT INTO attempts (job_id, n, started_at, finished_at, outcome, error, detail)"
            " SELECT u.id, u.n, u.started, u.finished, u.outcome, u.error, u.detail"
            " FROM unnest($1::text[], $2::integer[], $3::double precision[],"
            " $4::double precision[], $5::text[], $6::text[], $7::text[], $8::text[])"
            " AS u(id, n, started, finished, outcome, error, detail, tok)"
            " JOIN jobs j ON j.id = u.id AND j.state = 'running' AND j.claim_token = u.tok",
            *_columns(rows, 8),
        )
    await conn.execute(
        "UPDATE jobs j SET attempts = GREATEST(j.attempts - 1, 0), run_at = $3,"
        " node_id = NULL, claim_token = NULL, lease_until = NULL,"
        " result = COALESCE(u.res, j.result), "
        + leaving_running("'queued'", "j.finished_at", "$3::double precision", "j.")
        + " FROM unnest($1::text[], $2::text[], $4::text[]) AS u(id, tok, res)"
        " WHERE j.id = u.id AND j.state = 'running' AND j.claim_token = u.tok",
        list(held),
        list(held.values()),
        now,
        [kept.get(job_id) for job_id in held],
    )


async def write_claim(
    conn: Any, job_ids: Sequence[str], node_id: str, token: str, now: float, lease_s: float
) -> list[Claimed]:
    """Claim those of ``job_ids`` still queued, due at ``now`` (a copy read before the job ran
    and was queued again for a retry does not skip its backoff) and at the head of their order
    key. Rows another node is claiming this instant are skipped, not waited for (``SKIP
    LOCKED``)."""
    rows = await conn.fetch(
        "WITH picked AS MATERIALIZED (SELECT j.id FROM jobs j WHERE j.id = ANY($1::text[])"
        " AND j.state = 'queued' AND j.run_at <= $4::double precision"
        f" AND {HEAD_OF_KEY} ORDER BY j.seq FOR UPDATE SKIP LOCKED)"
        " UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, node_id = $2,"
        " claim_token = $3, claimed_at = $4::double precision,"
        " lease_until = $4::double precision + $5::double precision, caps = NULL"
        " FROM picked, events e WHERE j.id = picked.id AND e.id = j.event_id"
        f" RETURNING {JOB_COLUMNS}, {EVENT_COLUMNS}",
        list(job_ids),
        node_id,
        token,
        now,
        lease_s,
    )
    return [Claimed(job_from_row(r), event_from_row(r), int(r["waits"]), token) for r in rows]


# The first half of the two-int advisory lock key taken per cap: keeps caps' locks apart from
# any other advisory lock (migrations take a one-int key).
CAP_LOCK_CLASS = 0x63617073  # "caps"


def cap_lock_id(key: str) -> int:
    """A cap key's lock id: a stable 32-bit hash (two keys sharing one only wait on each other)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big", signed=True)


async def write_claim_capped(
    conn: Any,
    job_ids: Sequence[str],
    caps: Mapping[str, Sequence[Cap]],
    node_id: str,
    token: str,
    now: float,
    lease_s: float,
) -> CapClaim:
    """``write_claim`` within caps counted over the running jobs of every node.

    Each cap key's advisory lock is held to the commit (taken in one order, so two claims
    cannot deadlock): claims sharing a key run one after another, and each counts what the one
    before committed. The count is a statement after the locks, so its snapshot sees them.
    Claims without caps take no lock and do not wait here.
    """
    keys = sorted({c.key for mine in caps.values() for c in mine})
    if keys:
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1::integer, k) FROM unnest($2::integer[]) AS k",
            CAP_LOCK_CLASS,
            sorted({cap_lock_id(k) for k in keys}),
        )
    rows = await conn.fetch(
        "WITH picked AS MATERIALIZED (SELECT j.id FROM jobs j WHERE j.id = ANY($1::text[])"
        " AND j.state = 'queued' AND j.run_at <= $3::double precision"
        f" AND {HEAD_OF_KEY} ORDER BY j.seq FOR UPDATE SKIP LOCKED),"
        " held AS (SELECT k, count(*) AS n FROM jobs r CROSS JOIN LATERAL unnest(r.caps) AS k"
        " WHERE r.state = 'running' AND r.caps IS NOT NULL AND k = ANY($2::text[]) GROUP BY k)"
        " SELECT id, NULL AS k, 0::bigint AS n FROM picked"
        " UNION ALL SELECT NULL, k, n FROM held",
        list(job_ids),
        keys,
        now,
    )
    claimable = [r["id"] for r in rows if r["id"] is not None]
    running = {r["k"]: int(r["n"]) for r in rows if r["id"] is None}
    admitted, full = admit(job_ids, claimable, caps, running)
    if not admitted:
        return CapClaim([], full)
    pairs: list[tuple[str, str | None]] = [
        (job_id, c.key) for job_id in admitted for c in caps.get(job_id, ())
    ]
    pairs += [(job_id, None) for job_id in admitted if not caps.get(job_id)]
    claimed = await conn.fetch(
        "WITH c AS (SELECT u.id, array_agg(u.k) FILTER (WHERE u.k IS NOT NULL) AS caps"
        " FROM unnest($1::text[], $2::text[]) AS u(id, k) GROUP BY u.id)"
        " UPDATE jobs j SET state = 'running', attempts = j.attempts + 1, node_id = $3,"
        " claim_token = $4, claimed_at = $5::double precision,"
        " lease_until = $5::double precision + $6::double precision, caps = c.caps"
        " FROM c, events e WHERE j.id = c.id AND j.state = 'queued' AND e.id = j.event_id"
        f" RETURNING {JOB_COLUMNS}, {EVENT_COLUMNS}",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        node_id,
        token,
        now,
        lease_s,
    )
    return CapClaim(
        [Claimed(job_from_row(r), event_from_row(r), int(r["waits"]), token) for r in claimed],
        full,
    )


async def write_finishes(
    conn: Any, results: Sequence[Finished], tokens: Sequence[str | None]
) -> tuple[set[int], frozenset[str], set[int]]:
    """Record outcomes whose claim token (``tokens``, one per result) still matches; returns
    the indexes in ``results`` of those recorded. A claim re-queued by lease recovery (and
    perhaps claimed again elsewhere) has a new token, so a late outcome from the node that lost
    it changes nothing; nor does a second copy of an outcome already recorded (its claim's
    token is gone). Two copies of one outcome in one batch are recorded once, with one attempt
    row: the job's row is updated once, and only the copy that updated it is returned. A copy
    whose earlier try committed unseen is returned apart, as the third item
    (``_recorded_earlier``), with no second row written. Also
    returns the ids of jobs a cancel kept from being queued again (``leaving_running``)."""
    rows = []
    for f, token in zip(results, tokens, strict=True):
        wait = f.outcome == "wait"
        rows.append(
            (
                f.job_id,
                token,
                str(f.state),
                f.run_at if f.run_at is not None else f.finished_at,
                dump(f.result) if f.result is not None else None,
                f.error,
                f.finished_at if f.state in (JobState.DONE, JobState.DEAD) else None,
                1 if wait else 0,
                f.finished_at,
                1 if f.counted_wait else 0,
            )
        )
    applied = await conn.fetch(
        f"UPDATE jobs j SET {leaving_running('u.state', 'u.fin', 'u.at', 'j.')},"
        " run_at = u.run, result = u.res, last_error = u.err,"
        " node_id = NULL, claim_token = NULL, lease_until = NULL,"
        " attempts = j.attempts - u.w, waits = j.waits + u.cw"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::double precision[], $5::text[],"
        " $6::text[], $7::double precision[], $8::integer[], $9::double precision[],"
        " $10::integer[])"
        " WITH ORDINALITY AS u(id, tok, state, run, res, err, fin, w, at, cw, n)"
        " WHERE j.id = u.id AND j.state = 'running' AND j.claim_token = u.tok"
        " RETURNING u.n, j.id, j.state, u.state AS wanted",
        *_columns(rows, 10),
    )
    recorded = {int(r[0]) - 1 for r in applied}
    cancelled = {r[1] for r in applied if r[2] == "cancelled" and r[3] == "queued"}
    attempts = [
        attempt_row(f) for i, f in enumerate(results) if f.outcome != "wait" and i in recorded
    ]
    if attempts:
        await conn.execute(
            "INSERT INTO attempts (job_id, n, started_at, finished_at, outcome, error, detail)"
            " SELECT * FROM unnest($1::text[], $2::integer[], $3::double precision[],"
            " $4::double precision[], $5::text[], $6::text[], $7::text[])",
            *_columns(attempts, 7),
        )
    earlier: set[int] = set()
    if len(recorded) < len(results):
        earlier, gone = await _recorded_earlier(conn, results, tokens, recorded)
        cancelled |= gone
    return recorded, frozenset(cancelled), earlier


async def _recorded_earlier(
    conn: Any, results: Sequence[Finished], tokens: Sequence[str | None], recorded: set[int]
) -> tuple[set[int], set[str]]:
    """Of the outcomes not recorded now, those an earlier try of this very outcome recorded:
    a commit the server made whose answer the node never had (the connection lost at that
    moment), tried again. Found by what that commit wrote: the attempt's row, with its own
    finish time, or for a wait (which writes none) the job queued again at the wait's time,
    no node's. Each claim's outcome is counted once. Without this they read as lost leases:
    a warning that another node took the job, and a worker that tells nothing of an outcome
    that stands (a dead letter neither logged nor alerted). Also returns the ids of those
    jobs a cancel ended instead of queueing them again."""
    answered = {(results[i].job_id, tokens[i]) for i in recorded}
    rows = []
    for i, (f, token) in enumerate(zip(results, tokens, strict=True)):
        if token is None or (f.job_id, token) in answered:
            continue
        answered.add((f.job_id, token))
        run_at = f.run_at if f.run_at is not None else f.finished_at
        rows.append((i, f.job_id, f.attempt, f.finished_at, f.outcome, run_at))
    if not rows:
        return set(), set()
    found = await conn.fetch(
        "SELECT u.i, j.id, j.state FROM unnest($1::integer[], $2::text[], $3::integer[],"
        " $4::double precision[], $5::text[], $6::double precision[])"
        " AS u(i, id, n, fin, outcome, run) JOIN jobs j ON j.id = u.id"
        " WHERE CASE WHEN u.outcome = 'wait'"
        " THEN j.state = 'queued' AND j.run_at = u.run AND j.claim_token IS NULL"
        " ELSE EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = u.id AND a.n = u.n"
        " AND a.finished_at = u.fin AND a.outcome = u.outcome) END",
        *_columns(rows, 6),
    )
    earlier = {int(r[0]) for r in found}
    gone = {
        r[1] for r in found if r[2] == "cancelled" and results[int(r[0])].state == JobState.QUEUED
    }
    return earlier, gone


_LOST_COLUMNS = (
    "SELECT j.id, j.claim_token, j.attempts, j.recoveries, j.claimed_at, j.source, j.action,"
    " j.event_id, j.cancel_requested_at, j.node_id FROM jobs j"
)


async def write_recovery(
    conn: Any, now: float, lease_s: float, max_recoveries: int, *, gone_only: bool = False
) -> Recovery:
    """Re-queue running jobs whose node has not heartbeat within its own lease (killed, host
    lost, cut off), ``lease_s`` for a node that did not say its own; the
    ``max_recoveries``-th recovery of a job sends it to ``dead``. ``gone_only``: only jobs
    whose node has no row in ``nodes`` or one marked stopped (or none: copied from SQLite)."""
    lost = await conn.fetch(
        _LOST_COLUMNS + " WHERE j.state = 'running' AND COALESCE(j.lease_until, 0) <"
        " $1::double precision AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id ="
        " j.node_id AND n.stopped_at IS NULL AND ($3::boolean OR n.heartbeat_at >="
        " $1::double precision - COALESCE(n.lease_s, $2::double precision)))"
        " ORDER BY j.seq FOR UPDATE SKIP LOCKED",
        now,
        lease_s,
        gone_only,
    )
    # The nodes still listed went silent (frozen, cut off, killed): each is named, in the
    # interrupted attempts and in the leader's log line. One marked stopped, or no longer
    # listed, stopped; or the jobs were copied from SQLite: those were interrupted by a crash
    # or restart, and the log line says whose they were.
    ids = sorted({r["node_id"] for r in lost if r["node_id"] is not None})
    listed = await conn.fetch(
        "SELECT node_id, host, pid, stopped_at IS NOT NULL FROM nodes"
        " WHERE node_id = ANY($1::text[])",
        ids,
    )
    named = {r[0]: f"{r[1] or '?'} pid {r[2]} ({r[0]})" for r in listed}
    silent = {r[0]: named[r[0]] for r in listed if not r[3]}
    recovery = await _requeue_lost(conn, lost, now, max_recoveries, silent)
    stopped = tuple(named.get(i, i) for i in ids if i not in silent)
    copied = sum(r["node_id"] is None for r in lost)
    return dataclasses.replace(recovery, stopped=stopped, copied=copied) if lost else recovery


async def write_forgotten(
    conn: Any,
    node_id: str,
    holds: Callable[[], tuple[Collection[tuple[str, str]], Collection[str]]],
    now: float,
    max_recoveries: int,
) -> Recovery:
    """Re-queue, as ``write_recovery`` does, the running jobs under ``node_id`` that it does not
    hold: ``holds()`` says which it does, asked once they are read (so that a claim committed
    before the read is known), as the (job, claim token) pairs ``held`` and the tokens
    ``in_flight`` of claims being written or in doubt. Such a job's outcome was written to a
    primary that failed over before its replica had the commit; the node's heartbeat keeps its
    lease, so no other node would ever take it."""
    rows = await conn.fetch(
        _LOST_COLUMNS
        + " WHERE j.state = 'running' AND j.node_id = $1 ORDER BY j.seq FOR UPDATE SKIP LOCKED",
        node_id,
    )
    held, in_flight = holds()
    lost = [
        r
        for r in rows
        if (r["id"], r["claim_token"]) not in held and r["claim_token"] not in in_flight
    ]
    return await _requeue_lost(conn, lost, now, max_recoveries, lost_as=FAILED_OVER)


# Why ``write_forgotten`` re-queues a job: not a crash of the node, which ran on.
FAILED_OVER = "its outcome was lost as the database failed over (the new primary lacked the commit)"


async def _requeue_lost(
    conn: Any,
    lost: Sequence[Any],
    now: float,
    max_recoveries: int,
    silent: Mapping[str, str] | None = None,
    lost_as: str | None = None,
) -> Recovery:
    """Each of ``lost`` (rows of ``_LOST_COLUMNS``) queued again with an ``interrupted``
    attempt, or sent to dead at its ``max_recoveries``-th recovery (a poison pill).
    ``silent``: the nodes, by id, whose lease passed, as their jobs' attempts name them;
    ``lost_as``: why every other job was lost (else: interrupted by a crash or restart)."""
    silent = silent or {}
    rows = []
    poisoned = []
    cancelled = 0
    for r in lost:
        # Cancelled while it ran: "queued" here, which ``leaving_running`` makes cancelled.
        dead = r["cancel_requested_at"] is None and r["recoveries"] + 1 >= max_recoveries
        cancelled += r["cancel_requested_at"] is not None
        if dead:
            poisoned.append(Poisoned(r["source"], r["action"], r["event_id"]))
        times = r["recoveries"] + 1
        node = silent.get(r["node_id"])
        if node is None and lost_as is None:
            reason = "interrupted by a crash or restart"
            reason = f"poison pill: {reason} {times} times" if dead else reason
        else:
            reason = lost_as or f"its node {node} went silent and its lease passed"
            reason = (
                f"poison pill: interrupted {times} times, the last as {reason}" if dead else reason
            )
        rows.append(
            (r["id"], "dead" if dead else "queued", reason, r["attempts"], r["claimed_at"] or now)
        )
    if not rows:
        return Recovery(requeued=0)
    ids, states, reasons, attempts, started = _columns(rows, 5)
    await conn.execute(
        "UPDATE jobs j SET recoveries = j.recoveries + 1, run_at = $4::double precision,"
        " node_id = NULL, claim_token = NULL, lease_until = NULL,"
        " last_error = CASE WHEN u.state = 'dead' THEN u.reason ELSE j.last_error END, "
        + leaving_running(
            "u.state",
            "CASE WHEN u.state = 'dead' THEN $4::double precision END",
            "$4::double precision",
            "j.",
        )
        + " FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, state, reason)"
        " WHERE j.id = u.id",
        ids,
        states,
        reasons,
        now,
    )
    await conn.execute(
        "INSERT INTO attempts (job_id, n, started_at, finished_at, outcome, error)"
        " SELECT u.id, u.n, u.started, $4::double precision, 'interrupted', u.reason"
        " FROM unnest($1::text[], $2::integer[], $3::double precision[], $5::text[])"
        " AS u(id, n, started, reason)",
        ids,
        attempts,
        started,
        now,
        reasons,
    )
    nodes = tuple(sorted({silent[r["node_id"]] for r in lost if r["node_id"] in silent}))
    return Recovery(len(rows) - len(poisoned) - cancelled, tuple(poisoned), cancelled, nodes)
