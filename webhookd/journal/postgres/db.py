"""What every part of the PostgreSQL journal shares: which driver errors mean "not now", and
how a URL or a command status is read."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from webhookd.config.checks import credentials_unclear
from webhookd.journal.base import waiting_log

# What asyncpg raises when the server is gone, refuses, or errs: all mean "not now" to callers.
# InternalClientError too: on the stock event loop a connection the server has just terminated
# can raise it ("cannot switch to state ...") instead of a connection error.
DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class _QuietFloorRetries(logging.Filter):
    """asyncpg's pool logs a warning with a traceback on every retry to restore its connection
    floor while the server is down: a traceback a second for as long as an outage lasts. The
    journal says once that the database is gone and once that it is back; these retries go."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, DB_ERRORS) and "connection floor" in record.getMessage())


# What a pooler in transaction mode does to the statements asyncpg prepares and caches: each
# transaction may run on another server connection, which has never heard of them or holds
# another client's of the same name.
_LOST_STATEMENTS = (asyncpg.DuplicatePreparedStatementError, asyncpg.InvalidSQLStatementNameError)
STATEMENTS_LOST = (
    "a pooler in transaction mode (PgBouncer before 1.21, or without max_prepared_statements)"
    " keeps no prepared statement from one transaction to the next: set"
    " journal.statement_cache_size = 0 (docs/scaling.md, PgBouncer)"
)


def db_error(exc: BaseException) -> str:
    """What went wrong, for a log line or a 503: asyncpg's own words, or for a timeout (whose
    text is empty) that the database did not answer in time. asyncpg's words for a connection
    the server ended mid-use ("cannot switch to state 15; another operation (2) is in
    progress", "cannot call Transaction.__aexit__(): the underlying connection is closed")
    read like a bug of the daemon's, and its words for prepared statements a
    pooler lost name its own connection objects: both are said as what they mean."""
    if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc):
        return "connection to the database lost"
    if isinstance(exc, asyncpg.InterfaceError) and "underlying connection is closed" in str(exc):
        return "connection to the database lost"  # a transaction's end, its connection ended
    if isinstance(exc, _LOST_STATEMENTS):
        # asyncpg's hint, on lines of their own, speaks of its own connection objects.
        said = getattr(exc, "message", None) or str(exc).split("\n", 1)[0]
        return f"{said}: {STATEMENTS_LOST}"
    if str(exc):
        return str(exc)
    return "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__


def quiet_pool_retries() -> None:
    """Install the filter on asyncpg's pool logger (once, however many journals open)."""
    logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _QuietFloorRetries) for f in logger.filters):
        logger.addFilter(_QuietFloorRetries())


# Queued or running jobs by (source, action).
UNFINISHED_BY_ACTION_SQL = (
    "SELECT source, action, COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
    " GROUP BY source, action"
)


def redact_url(url: str) -> str:
    """Where ``url`` points, for log lines and errors: ``PostgreSQL user:***@host:port/db``.

    Never the URL itself: its password (in the user part or a ``?password=`` option) is left
    out with the rest of its options, and the log masks a secret's whole value, so a URL
    written out would show as ``***`` even without a password. A URL whose password may have
    been split into its host, path or options (``credentials_unclear``), or that cannot be read
    at all, is only ``PostgreSQL ***``: what its parts hold is not sure."""
    if credentials_unclear(url):
        return "PostgreSQL ***"
    try:
        parts = urlsplit(url)
    except ValueError:  # "postgresql://[bad": what it says would quote the URL
        return "PostgreSQL ***"
    user, at, host = parts.netloc.rpartition("@")
    if parts.password is not None:
        user = user.split(":", 1)[0] + ":***"
    if not host:  # a Unix socket: postgresql:///db?host=/run/postgresql
        host = dict(parse_qsl(parts.query)).get("host", "")
    return f"PostgreSQL {user}{at}{host}{parts.path}"


def rowcount(status: str) -> int:
    """The row count at the end of an asyncpg command status (``UPDATE 3``, ``INSERT 0 1``)."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, AttributeError):
        return 0


# TCP keepalive on every connection: a path to the server that goes silent (a failover to a
# new address, a NAT or firewall dropping the flow) ends the connection after about
# KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S of silence, or after
# TCP_USER_TIMEOUT_MS with data unacknowledged; else a query waits on it for ever. The
# server's kernel answers the probes while a long query runs.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 15_000


def keep_alive(conn: Any) -> None:
    """Turn TCP keepalive on for ``conn``'s socket (asyncpg has no option for it; a Unix
    socket or a platform without the options is left as it is)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


# How long one use of a pooled connection (a transaction, a query, and giving the connection
# back) may take before the connection is cut. Keepalive cannot see a peer that keeps the TCP
# connection up and stops answering, such as a hung PgBouncer: without a bound each call
# waited on it for ever, and the node, its writer stuck, still said it was ready. Every write
# here is short (lock waits end at the journal's lock_timeout, bulk changes go 200 events to a
# transaction, prune 500) and the reads are single queries, so a minute is far past a healthy
# answer. REINDEX, which can legitimately take longer, goes around it (``BoundedPool.raw``).
ANSWER_DEADLINE_S = 60.0
# A use cut at its deadline first has what it runs cancelled, as asyncpg cancels a statement
# at its own timeout: a cancel request (on a connection of its own) ends the server's wait,
# whatever it waits for, the statement answers, and the connection goes back to the pool. Only
# a connection whose statement still has not answered this long after is terminated (a hung
# pooler, a silent path). Terminating it at once left its backend waiting on the server: one
# waiting for a lock or for a synchronous standby does not notice that its client has gone.
# While a synchronous standby was away, two nodes under load so left 14 more backends in 100 s
# (heartbeats queued behind the first one's row lock, commits in SyncRep), more the longer it
# lasted, up to max_connections: each node's pool opened new connections all along.
CANCEL_GRACE_S = 2.0
# What PostgreSQL says (a WARNING) as a cancel request ends a commit's wait for its synchronous
# standbys; the commit stands then, made on the primary alone. In the server's lc_messages:
# another language than English leaves the cut said as no answer.
SYNC_REP_CANCELLED = "canceling wait for synchronous replication"


class Cut(TimeoutError):
    """A use of a connection that had no answer by its deadline. A write cut so may have
    committed, as one whose connection dropped may: callers treat both alike."""


class ReplicationStall(Cut):
    """A commit cut while it waited for the synchronous standbys (``synchronous_standby_names``)
    to confirm it: the cancel ended the wait, and the commit stands on the primary alone until
    a standby has it. Not a network fault: the database answers, its standbys do not."""


class BoundedPool:
    """The journal's asyncpg pool, each use of a connection cut after ``ANSWER_DEADLINE_S``:
    what it runs is cancelled, and whatever waits on it fails with ``Cut`` (``ReplicationStall``
    when the server said that a commit waited for its synchronous standbys); a connection that
    does not answer the cancel within ``CANCEL_GRACE_S`` is terminated (its socket closed), and
    the pool opens a fresh one for the next use.

    ``waiting_s`` (the CLI's): a use still waiting after that long says so once, and why as far
    as the server tells, on ``waiting_log``: a command that would otherwise sit silent."""

    def __init__(self, raw: Any, waiting_s: float | None = None) -> None:
        self.raw = raw
        self.waiting_s = waiting_s

    @contextlib.asynccontextmanager
    async def acquire(self, deadline_s: float | None = None) -> AsyncIterator[Any]:
        """A connection for one use, cut after ``ANSWER_DEADLINE_S``, or ``deadline_s`` if that
        is shorter (the heartbeat's)."""
        limit = ANSWER_DEADLINE_S
        deadline_s = limit if deadline_s is None else min(deadline_s, limit)
        started = time.monotonic()
        try:  # a free connection, or a new one: connecting is the part that can hang here
            conn = await self.raw.acquire(timeout=deadline_s)
        except TimeoutError as exc:
            # The pool's own connect timeout may have ended it first: the time it really took.
            took = time.monotonic() - started
            raise TimeoutError(f"no answer from the database in {took:.0f} s") from exc
        loop = asyncio.get_running_loop()
        cut = _Cutter(conn, deadline_s)
        timer = loop.call_later(deadline_s, cut.begin)
        waiting = None
        if self.waiting_s is not None and self.waiting_s < deadline_s:
            waiting = loop.call_later(self.waiting_s, self._say_waiting, cut)
        failed: BaseException | None = None
        try:
            yield conn
        except DB_ERRORS as exc:
            if not cut.began:
                raise
            failed = exc
        finally:
            if waiting is not None:
                waiting.cancel()
            try:
                await cut.settle()
                # Still under the timer: it may talk to the server. After a cut, what it says
                # (a reset that the give-up ended, say) adds nothing to the cut.
                with contextlib.suppress(*(DB_ERRORS if cut.began else ())):
                    await self.raw.release(conn)
            finally:
                timer.cancel()
                cut.close()
        if cut.began:  # the body may have ended well after the deadline: its answer came late
            raise cut.error() from failed

    def _say_waiting(self, cut: _Cutter) -> None:
        task = asyncio.get_running_loop().create_task(self._waiting(cut))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _waiting(self, cut: _Cutter) -> None:
        """Say that ``cut``'s use waits, and for what if another connection can see it in
        ``pg_stat_activity`` (not behind a pooler: the process id it gives is its own)."""
        if cut.conn.is_closed():
            return
        why = "no answer yet"
        pid = cut.conn.get_server_pid()
        with contextlib.suppress(*DB_ERRORS):
            async with asyncio.timeout(5.0):
                async with self.raw.acquire() as other:
                    row = await other.fetchrow(
                        "SELECT wait_event_type, wait_event,"
                        " current_setting('synchronous_standby_names') FROM pg_stat_activity"
                        " WHERE pid = $1",
                        pid,
                    )
            if row is not None and row[1] == "SyncRep":
                why = (
                    "its commit waits for synchronous replication: the standbys named in"
                    f" synchronous_standby_names ({row[2]!r}) have not confirmed it"
                )
            elif row is not None and row[0] == "Lock":
                why = "it waits for a lock another session holds"
        if not cut.releasing:  # still waiting
            waiting_log.warning(
                "waiting for the database (%s); giving up after %g s",
                why,
                round(cut.deadline_s, 1),
            )

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            return list(await conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any, deadline_s: float | None = None) -> str:
        async with self.acquire(deadline_s) as conn:
            return str(await conn.execute(sql, *args))


# Tasks started from timer callbacks, kept referenced until they end.
_background: set[asyncio.Task[None]] = set()


class _Cutter:
    """The cut of one use of ``conn`` at its deadline (``begin``): a cancel request first,
    and the connection terminated if no answer comes within ``CANCEL_GRACE_S``."""

    def __init__(self, conn: Any, deadline_s: float) -> None:
        # The connection itself, not the pool's proxy of it: the proxy refuses every call once
        # a terminate has handed the connection back.
        self.conn = getattr(conn, "_con", conn)
        self.deadline_s = deadline_s
        self.began = False
        self.releasing = False  # past the use: the connection is being given back
        self.sync_rep = False  # the server said the cancel ended a wait for synchronous standbys
        self.standbys: str | None = None
        self._sent: asyncio.Future[None] | None = None
        self._give_up: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        conn = self.conn
        if conn.is_closed():
            return
        if self.releasing:
            # A cancel sent now could reach the connection's next user: only a hung reset
            # ends here, and it ends as before, with the connection.
            conn.terminate()
            return
        self.began = True
        loop = asyncio.get_running_loop()
        conn.add_log_listener(self._heard)
        # asyncpg's own cancel request, as it sends one at a statement's timeout: the future is
        # done once the server has taken it (or asyncpg gave the connection up).
        self._sent = loop.create_future()
        conn._cancel_current_command(self._sent)
        self._give_up = loop.call_later(CANCEL_GRACE_S, conn.terminate)

    def _heard(self, _conn: Any, message: Any) -> None:
        if str(getattr(message, "message", "")).startswith(SYNC_REP_CANCELLED):
            self.sync_rep = True

    async def settle(self) -> None:
        """After the use: let the cancel request be taken before the connection goes back (a
        late one would cancel its next user's statement), and, when a commit waited for
        synchronous standbys, read which ones it waited for."""
        self.releasing = True
        if not self.began:
            return
        if self._sent is not None:
            await asyncio.wait({self._sent})  # ended by the give-up's terminate at the latest
            if not self._sent.cancelled():
                self._sent.exception()  # asyncpg 0.29 sets a failed cancel's error here
        self.conn.remove_log_listener(self._heard)  # asyncpg warns of one left at release
        if self.sync_rep and not self.conn.is_closed():
            with contextlib.suppress(*DB_ERRORS):
                self.standbys = await self.conn.fetchval("SHOW synchronous_standby_names")

    def close(self) -> None:
        if self._give_up is not None:
            self._give_up.cancel()

    def error(self) -> Cut:
        """What the cut use raises: what the server said, or that it said nothing in time."""
        took = f"{round(self.deadline_s, 1):g} s"
        if self.sync_rep:
            return ReplicationStall(
                "waiting for synchronous replication: the standbys named in"
                f" synchronous_standby_names ({self.standbys or '?'!r}) did not confirm a commit"
                f" in {took}"
            )
        return Cut(f"no answer from the database in {took}")


def what_became(exc: BaseException) -> str:
    """What a write that failed with ``exc`` left in the journal, for a command that made it
    (the CLI): a cut one may have been made, and one cut in its wait for the synchronous
    standbys was. Nothing for any other error: its transaction was rolled back."""
    if isinstance(exc, ReplicationStall):
        return (
            "; the change is made on the primary all the same, and reaches the standbys once"
            " they are back (a failover to one before then loses it)"
        )
    if isinstance(exc, Cut):
        return "; the change may or may not have been made: look before making it again"
    return ""
