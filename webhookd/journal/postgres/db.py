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

from webhookd.config import credentials_unclear

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


def db_error(exc: BaseException) -> str:
    """What went wrong, for a log line or a 503: asyncpg's own words, or for a timeout (whose
    text is empty) that the database did not answer in time. asyncpg's words for a connection
    the server ended mid-use ("cannot switch to state 15; another operation (2) is in
    progress") read like a bug of the daemon's: they are said as what they mean."""
    if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc):
        return "connection to the database lost"
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


class BoundedPool:
    """The journal's asyncpg pool, each use of a connection cut after ``ANSWER_DEADLINE_S``:
    the connection is terminated (its socket closed), so whatever waits on it fails at once
    with ``TimeoutError`` and the pool opens a fresh one for the next use. A write cut so may
    have committed, as one whose connection dropped may: callers treat both alike."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    @contextlib.asynccontextmanager
    async def acquire(self, deadline_s: float | None = None) -> AsyncIterator[Any]:
        """A connection for one use, cut after ``ANSWER_DEADLINE_S``, or ``deadline_s`` if that
        is shorter (the heartbeat's)."""
        limit = ANSWER_DEADLINE_S
        deadline_s = limit if deadline_s is None else min(deadline_s, limit)
        no_answer = f"no answer from the database in {round(deadline_s, 1):g} s"
        started = time.monotonic()
        try:  # a free connection, or a new one: connecting is the part that can hang here
            conn = await self.raw.acquire(timeout=deadline_s)
        except TimeoutError as exc:
            # The pool's own connect timeout may have ended it first: the time it really took.
            took = time.monotonic() - started
            raise TimeoutError(f"no answer from the database in {took:.0f} s") from exc
        cut = False

        def cut_off() -> None:
            nonlocal cut
            cut = True
            conn.terminate()

        timer = asyncio.get_running_loop().call_later(deadline_s, cut_off)
        try:
            yield conn
        except DB_ERRORS as exc:
            if cut:
                raise TimeoutError(no_answer) from exc
            raise
        finally:
            try:
                await self.raw.release(conn)  # still under the timer: it may talk to the server
            finally:
                timer.cancel()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            return list(await conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any, deadline_s: float | None = None) -> str:
        async with self.acquire(deadline_s) as conn:
            return str(await conn.execute(sql, *args))
