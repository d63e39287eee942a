"""A SQLite journal copied into an empty PostgreSQL one (``webhookd copy``), for the move from
one box to several nodes without losing history, queued work or dedup.

The SQLite journal is read in one transaction holding its write lock, with no daemon on it
(its serve lock is held throughout, so none can start, and a CLI verb's change waits); the
rows go in by ``COPY``, in one PostgreSQL transaction
that commits all of them or none, and keep their sequence numbers (the queue's and ordered
keys' order). The SQLite file is left as it was.

- Jobs that were running when the SQLite daemon was killed go in running with no node: the
  first node to lead re-queues them as it would a dead node's (an ``interrupted`` attempt,
  one more recovery).
- Nodes already running on the PostgreSQL journal (started on it empty) are notified at the
  commit, pauses first, as the CLI's pause and replay notify them.
- What an older webhookd wrote that PostgreSQL cannot hold goes in as the journal and the
  receiver write it now: a NUL in text escaped, a key over ``MOST_KEY_CHARS`` as its digest.
- Dedup keys: SQLite keeps only a digest of each key, PostgreSQL the key itself, which an
  event's row holds. So the key of every event still in the journal moves, with its time, and
  so does a signed body's second key (``verify.dedup_body``), made again from the event's
  body (and signed timestamp) and checked against the digest; a key whose event retention
  already deleted, and a second key of something else signed, do not. Both are counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from webhookd.errors import JournalError, JournalNewer
from webhookd.journal.files import copied_marker, copied_to
from webhookd.journal.locks import _take_serve_lock, opened_elsewhere
from webhookd.journal.moved import new_private, sync
from webhookd.journal.postgres.db import DB_ERRORS, db_error, redact_url
from webhookd.journal.postgres.nodes import CHANNEL, PAUSE_CHANNEL
from webhookd.journal.postgres.schema import migrate
from webhookd.journal.schema import MIGRATIONS as SQLITE_MIGRATIONS
from webhookd.journal.schema import key_digest
from webhookd.models import kept_long, sha256_key, signed_key, storable_text

# Rows read from SQLite and sent in one COPY: 2,000 at most, and no more than BATCH_BYTES of
# their values (a body may be up to max_body_bytes: 2,000 of 1 MiB were 2 GiB in memory).
BATCH_ROWS = 2_000
BATCH_BYTES = 16 << 20

_EVENT_COLUMNS = (
    "seq",
    "id",
    "source",
    "received_at",
    "dedup_key",
    "tenant",
    "priority",
    "headers",
    "body",
    "verified",
    "filtered",
    "query",
)
# The columns both journals' jobs share; ``caps`` (JSON text in SQLite, an array here) follows.
_JOB_COLUMNS = (
    "seq",
    "id",
    "event_id",
    "source",
    "action",
    "type",
    "state",
    "priority",
    "tenant",
    "order_key",
    "run_at",
    "attempts",
    "max_attempts",
    "recoveries",
    "waits",
    "claimed_at",
    "finished_at",
    "last_error",
    "result",
    "cancel_requested_at",
    "behind",
    "dismissed_at",
)
_ATTEMPT_COLUMNS = (
    "seq",
    "job_id",
    "n",
    "started_at",
    "finished_at",
    "outcome",
    "error",
    "detail",
)
_TABLES = ("events", "jobs", "attempts", "dedup", "paused_sources")
# What a journal nodes took webhooks into keeps, each table by what it holds: the copy goes
# into one holding none (events and jobs pruned leave dedup keys, pauses, lanes' calls).
_DEPLOYMENT_STATE = {
    "events": "events",
    "jobs": "jobs",
    "attempts": "attempts",
    "dedup": "dedup keys",
    "paused_sources": "paused sources",
    "lanes": "lanes' state",
}


@dataclass(frozen=True)
class Copied:
    """What ``copy_journal`` put into the PostgreSQL journal, and what it could not."""

    events: int
    jobs: dict[str, int]  # by state, as copied (running: to be re-queued by the first leader)
    attempts: int
    dedup_keys: int
    # Dedup keys that did not move: of events retention deleted, and second keys of what was
    # signed that cannot be made again from the event (not its body).
    keys_of_pruned: int
    body_keys: int
    paused: tuple[str, ...]
    seconds: float
    # Queued and running jobs by (source, action), which the nodes' config must have.
    unfinished: dict[tuple[str, str], int]


def _rows(
    conn: sqlite3.Connection, sql: str, large: Sequence[int] = ()
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows ``sql`` reads, in batches of ``BATCH_ROWS`` or of ``BATCH_BYTES`` of the
    values at the ``large`` indexes (a body, an error), whichever comes first; read one at a
    time, so a row larger than that is a batch of its own."""
    batch: list[tuple[Any, ...]] = []
    size = 0
    for row in conn.execute(sql):
        batch.append(row)
        for i in large:
            if row[i] is not None:
                size += len(row[i])
        if len(batch) >= BATCH_ROWS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _large(columns: Sequence[str], *names: str) -> tuple[int, ...]:
    """Where the values that can be large (a body, a result) are in a row of ``columns``."""
    return tuple(columns.index(name) for name in names)


# What names a row PostgreSQL refused, by table: the error says its line in the batch.
_ROW_NAMES: dict[str, Callable[[tuple[Any, ...]], str]] = {
    "events": lambda row: f"event {row[1]}",
    "jobs": lambda row: f"job {row[1]}",
    "attempts": lambda row: f"attempt {row[2]} of job {row[1]}",
    "dedup": lambda row: f"the dedup key of event {row[1]}",
}


async def _copy(
    pg: Any,
    table: str,
    columns: Sequence[str],
    batches: Iterator[list[tuple[Any, ...]]],
    on_rows: Callable[[int], None],
) -> int:
    done = 0
    try:
        for batch in batches:
            try:
                await pg.copy_records_to_table(table, records=batch, columns=list(columns))
            except asyncpg.PostgresError as exc:
                # A value PostgreSQL cannot hold, which a copy again would meet again: named.
                line = re.match(r"COPY \S+, line (\d+)", getattr(exc, "context", None) or "")
                if line is None or not 0 < int(line[1]) <= len(batch):
                    raise
                raise JournalError(
                    f"{_ROW_NAMES[table](batch[int(line[1]) - 1])} cannot be copied:"
                    f" {getattr(exc, 'message', exc)}; nothing was copied, and a copy again"
                    " fails the same until that row is changed (`webhookd purge` deletes an"
                    " event)"
                ) from exc
            done += len(batch)
            on_rows(len(batch))
    except (ValueError, TypeError, OverflowError) as exc:  # a damaged file?
        raise JournalError(f"a row of {table} cannot be copied ({exc}): nothing was") from exc
    return done


def _storable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with a NUL in its text escaped, as the journal writes text now (an older
    webhookd wrote an error's NUL as it was, and PostgreSQL's text holds none)."""
    if any(isinstance(v, str) and "\x00" in v for v in row):
        return tuple(storable_text(v) if isinstance(v, str) else v for v in row)
    return row


def _kept(value: str | None) -> str | None:
    """A tenant or an order key as the receiver keeps it now: one over ``MOST_KEY_CHARS``
    (which an older webhookd kept whole, and PostgreSQL cannot index) as its digest."""
    return None if value is None else kept_long(value)


def _kept_key(source: str, key: str) -> str:
    """A dedup key (``<source>:<value>``) as the receiver makes it now: a value over
    ``MOST_KEY_CHARS`` as its digest, so that a provider's retry still finds it."""
    value = key.removeprefix(f"{source}:")
    return f"{source}:{kept_long(value)}" if value != key else key


def _event_rows(batches: Iterator[list[tuple[Any, ...]]]) -> Iterator[list[tuple[Any, ...]]]:
    for batch in batches:
        yield [
            _storable((*row[:4], _kept_key(row[2], row[4]), _kept(row[5]), *row[6:]))
            for row in batch
        ]


def _job_rows(batches: Iterator[list[tuple[Any, ...]]]) -> Iterator[list[tuple[Any, ...]]]:
    for batch in batches:
        rows = []
        for row in batch:
            caps = json.loads(row[-1]) if row[-1] else None
            rows.append(_storable((*row[:8], _kept(row[8]), _kept(row[9]), *row[10:-1], caps)))
        yield rows


def _attempt_rows(batches: Iterator[list[tuple[Any, ...]]]) -> Iterator[list[tuple[Any, ...]]]:
    for batch in batches:
        yield [_storable(row) for row in batch]


def _body_key(digest: bytes, source: str, body: bytes, verified: str | None) -> str | None:
    """The second dedup key of an event whose digest is ``digest``, made again as the receiver
    made it (``verify.dedup_body``): of its body (what most schemes without a timestamp sign),
    or of its signed timestamp and body. None for another (a Twilio form's parameters, a
    Mailgun token), which no row keeps."""
    keys = [f"{source}:{sha256_key(body)}"]
    with contextlib.suppress(ValueError, AttributeError):
        stamp = json.loads(verified).get("timestamp") if verified else None
        if stamp is not None:
            keys.append(f"{source}:{signed_key(stamp, body)}")
    return next((k for k in keys if key_digest(k) == digest), None)


def _dedup_rows(
    batches: Iterator[list[tuple[Any, ...]]],
    body_keys: list[int],
    event: Callable[[str], tuple[bytes, str | None]],
) -> Iterator[list[tuple[Any, ...]]]:
    """(key, event id, created) of each dedup row: its event's key, or a signed body's key made
    again from the event (``event``: its body and verdict by id); those that cannot be are
    counted in ``body_keys``."""
    for batch in batches:
        rows = []
        for digest, src, k, ev, at in batch:
            key = k if key_digest(k) == digest else _body_key(digest, src, *event(ev))
            if key is None:
                body_keys[0] += 1
            else:
                rows.append(_storable((_kept_key(src, key), ev, at)))
        if rows:
            yield rows


def _refused(exc: BaseException) -> bool:
    """Whether the server answered ``exc`` to a COMMIT, which then did not land (a lost
    connection, or a server going down, leaves that unknown)."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError)
    )


def _mark_copied(path: Path, where: str, *, committing: bool = False) -> None:
    """Leave ``copied_marker`` beside the journal, synced: a daemon started on the file again
    (a reboot of the old box, its unit still enabled) would run its queued jobs a second
    time. ``committing``: written before the COMMIT, saying the copy may have landed, and
    how to tell. Written as a new 0600 file, the journal's owner's, and renamed into place:
    never through a symlink planted under the marker's name."""
    marker = copied_marker(path)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    said = f"copied into {where} at {when}"
    if committing:
        said = (
            f"being copied into {where} at {when} (a copy that did not finish was committed"
            " if that journal holds events: if it holds none, delete this marker and copy"
            " again)"
        )
    partial = marker.with_name(f".{marker.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    fd = os.open(new_private(partial), os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, f"{said}\n".encode())
        owner = os.stat(path)
        if os.geteuid() == 0:  # a root copy for a daemon of its own user, who must read it
            os.fchown(fd, owner.st_uid, owner.st_gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, marker)
    sync(marker.parent)


def _open_sqlite(path: Path) -> tuple[int, sqlite3.Connection]:
    """The journal at ``path`` held: its serve lock's descriptor (no daemon can start on it),
    and a connection in a transaction holding its write lock (one snapshot for every table,
    and no change by a CLI verb meanwhile)."""
    if not path.is_file():
        raise JournalError(f"no journal at {path}")
    try:
        lock = _take_serve_lock(path, "stop it before a copy", "copy")
    except OSError as exc:  # a symlink planted as its lock file, say
        raise JournalError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    try:
        if (said := copied_to(path)) is not None:  # asked under the lock: no copy in between
            raise JournalError(
                f"{path} was {said}: a second copy would run its queued jobs twice (delete"
                f" {copied_marker(path)} to copy it all the same)"
            )
        if (holder := opened_elsewhere(path)) is not None:
            raise JournalError(f"{holder} has {path} open: stop it before a copy")
        conn = sqlite3.connect(path, isolation_level=None)
    except BaseException:
        os.close(lock)
        raise
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(SQLITE_MIGRATIONS):  # no serve of this webhookd brings it here
            raise JournalNewer(
                f"{path} has schema version {version}, newer than this webhookd understands"
                f" ({len(SQLITE_MIGRATIONS)}): copy it with the webhookd that upgraded it"
            )
        if version != len(SQLITE_MIGRATIONS):
            raise JournalError(
                f"{path} has schema version {version}, this webhookd's is"
                f" {len(SQLITE_MIGRATIONS)}: start and stop `webhookd serve` of this webhookd"
                " on it (it upgrades the journal as it starts), then copy it"
            )
        # The write lock, never used: a CLI verb's change (a pause, a replay) meanwhile would
        # be in neither journal. It waits, then says the journal is locked.
        conn.execute("BEGIN IMMEDIATE")
    except BaseException as exc:
        conn.close()
        os.close(lock)
        if isinstance(exc, sqlite3.Error):
            raise JournalError(f"cannot read {path}: {exc}") from exc
        raise
    return lock, conn


async def _wake_nodes(pg: Any, paused: Sequence[str], queued: bool) -> None:
    """Tell nodes already running on the journal (started before the copy, on an empty
    journal) what it brought, in its transaction (the notifications go out at its commit), as
    the CLI's pause and replay do: else they take the copied pauses and queued jobs only at
    their next sweep (``workers.sweep_interval_s``). The pauses first: a node woken for the
    jobs reads them with the pauses it knows, and would start those of a paused source."""
    for source in paused:
        await pg.execute("SELECT pg_notify($1, $2)", PAUSE_CHANNEL, source)
    if queued:
        await pg.execute("SELECT pg_notify($1, $2)", CHANNEL, "copy")


async def copy_journal(
    path: Path,
    url: str,
    *,
    statement_cache_size: int = 100,
    on_rows: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int], None] = lambda n: None,
) -> Copied:
    """Copy the SQLite journal at ``path``, with no daemon on it, into the PostgreSQL journal
    at ``url``, which holds nothing yet: no events, jobs, dedup keys, pauses (its schema is
    made if it has none).
    ``on_total`` is told how many rows there are to copy, ``on_rows`` each batch's."""
    started = time.monotonic()
    where = redact_url(url)
    lock, lite = _open_sqlite(path)
    try:
        # The file is marked under the lock: no daemon can have started on it in between.
        return await _into_postgres(
            path, lite, url, where, statement_cache_size, on_rows, on_total, started
        )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read {path}: {exc}") from exc
    finally:
        lite.close()
        os.close(lock)


async def _into_postgres(
    path: Path,
    lite: sqlite3.Connection,
    url: str,
    where: str,
    statement_cache_size: int,
    on_rows: Callable[[int], None],
    on_total: Callable[[int], None],
    started: float,
) -> Copied:
    try:
        pg = await asyncpg.connect(
            url,
            timeout=10,
            statement_cache_size=statement_cache_size,
            server_settings={"application_name": "webhookd copy"},
        )
    except ValueError as exc:
        raise JournalError(f"cannot open journal {where}: its URL cannot be read") from exc
    except DB_ERRORS as exc:
        raise JournalError(f"cannot open journal {where}: {db_error(exc)}") from exc
    committing = False
    try:
        fresh = await pg.fetchval("SELECT to_regclass('webhookd_schema') IS NULL")
        # A journal of an older schema belongs to nodes of an older webhookd: not upgraded here.
        await migrate(pg, where, upgrade=bool(fresh))
        async with pg.transaction():
            # Held to the commit: a second copy, or a node taking webhooks meanwhile, waits
            # and then finds the events, rather than mixing its rows with these.
            await pg.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            held = await pg.fetchrow(
                "SELECT "
                + ", ".join(f"EXISTS (SELECT 1 FROM {t}) AS {t}" for t in _DEPLOYMENT_STATE)
            )
            if what := [words for t, words in _DEPLOYMENT_STATE.items() if held and held[t]]:
                raise JournalError(
                    f"{where} already holds {what[0]}: a copy goes into a journal no node has"
                    " taken webhooks into, even if retention deleted them since (a new"
                    " database)"
                )
            totals = [
                int(lite.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in _TABLES
            ]
            on_total(sum(totals))
            events = await _copy(
                pg,
                "events",
                _EVENT_COLUMNS,
                _event_rows(
                    _rows(
                        lite,
                        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM events ORDER BY seq",
                        _large(_EVENT_COLUMNS, "headers", "body", "verified"),
                    )
                ),
                on_rows,
            )
            jobs = await _copy(
                pg,
                "jobs",
                (*_JOB_COLUMNS, "caps"),
                _job_rows(
                    _rows(
                        lite,
                        f"SELECT {', '.join(_JOB_COLUMNS)}, caps FROM jobs ORDER BY seq",
                        _large(_JOB_COLUMNS, "last_error", "result"),
                    )
                ),
                on_rows,
            )
            attempts = await _copy(
                pg,
                "attempts",
                _ATTEMPT_COLUMNS,
                _attempt_rows(
                    _rows(
                        lite,
                        f"SELECT {', '.join(_ATTEMPT_COLUMNS)} FROM attempts ORDER BY seq",
                        _large(_ATTEMPT_COLUMNS, "error", "detail"),
                    )
                ),
                on_rows,
            )
            body_keys = [0]
            keys = await _copy(
                pg,
                "dedup",
                ("key", "event_id", "created_at"),
                _dedup_rows(
                    _rows(
                        lite,
                        "SELECT d.digest, e.source, e.dedup_key, d.event_id, d.created_at"
                        " FROM dedup d"
                        " JOIN events e ON e.id = d.event_id ORDER BY d.n",
                    ),
                    body_keys,
                    lambda event_id: lite.execute(
                        "SELECT body, verified FROM events WHERE id = ?", (event_id,)
                    ).fetchone(),
                ),
                on_rows,
            )
            paused = lite.execute("SELECT source, paused_at FROM paused_sources").fetchall()
            await pg.executemany(
                "INSERT INTO paused_sources (source, paused_at) VALUES ($1, $2)"
                " ON CONFLICT (source) DO NOTHING",
                paused,
            )
            on_rows(len(paused))
            # New rows are numbered after the copied ones.
            for table in ("events", "jobs", "attempts"):
                await pg.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'),"
                    f" (SELECT max(seq) FROM {table}))"
                    f" WHERE EXISTS (SELECT 1 FROM {table})"
                )
            states = {
                r[0]: int(r[1])
                for r in await pg.fetch("SELECT state, count(*) FROM jobs GROUP BY state")
            }
            unfinished = {
                (r[0], r[1]): int(r[2])
                for r in await pg.fetch(
                    "SELECT source, action, count(*) FROM jobs"
                    " WHERE state IN ('queued', 'running') GROUP BY source, action"
                )
            }
            if (events, jobs, attempts) != tuple(totals[:3]):
                raise JournalError(
                    f"the copy read {totals[:3]} events, jobs and attempts but wrote"
                    f" {[events, jobs, attempts]}: nothing was committed"
                )
            await _wake_nodes(pg, [r[0] for r in paused], "queued" in states)
            # Marked before the COMMIT: a copy cut short from here on (Ctrl-C, kill -9, a lost
            # connection) may have committed, and a daemon on the file would run its jobs again.
            try:
                _mark_copied(path, where, committing=True)
            except OSError as exc:
                raise JournalError(
                    f"{copied_marker(path)} could not be written ({exc.strerror or exc}):"
                    " nothing was copied"
                ) from exc
            committing = True
        try:
            _mark_copied(path, where)
        except OSError as exc:
            raise JournalError(
                f"the copy is committed, but {copied_marker(path)} could not say so"
                f" ({exc.strerror or exc}): start no daemon on {path} again"
            ) from exc
        # The planner's statistics, which autovacuum would gather only later: the nodes' first
        # claims and reads are planned on them. After the marker: ANALYZE may wait behind a
        # VACUUM, and the copy is in already.
        with contextlib.suppress(*DB_ERRORS):  # committed: a failure here loses nothing
            await pg.execute("ANALYZE events, jobs, attempts, dedup")
    except DB_ERRORS as exc:
        # A connection lost mid-copy surfaces as the transaction's failure to end: say the loss.
        cause = exc.__context__ if isinstance(exc.__context__, DB_ERRORS) else exc
        if committing and not _refused(exc):
            # The COMMIT was sent and its answer lost: it may have landed. The marker stays.
            raise JournalError(
                f"cannot tell whether the copy into {where} was committed: {db_error(cause)};"
                f" {copied_marker(path)} stays: if that journal holds events, it was; if it"
                " holds none, delete the marker and copy again"
            ) from exc
        if committing:  # refused: nothing landed, and the file is not copied
            with contextlib.suppress(OSError):
                copied_marker(path).unlink()
                sync(copied_marker(path).parent)
        raise JournalError(
            f"cannot copy into {where}: {db_error(cause)}; a copy commits all or nothing: run"
            " it again (it refuses a journal a copy already filled)"
        ) from exc
    finally:
        await pg.close()
    return Copied(
        events=events,
        jobs=states,
        attempts=attempts,
        dedup_keys=keys,
        keys_of_pruned=totals[3] - keys - body_keys[0],
        body_keys=body_keys[0],
        paused=tuple(sorted(r[0] for r in paused)),
        seconds=time.monotonic() - started,
        unfinished=unfinished,
    )
