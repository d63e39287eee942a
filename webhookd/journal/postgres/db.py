"""What every part of the PostgreSQL journal shares: which driver errors mean "not now", and
how a URL or a command status is read."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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
    text is empty) that the database did not answer in time."""
    if str(exc):
        return str(exc)
    return "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__


def quiet_pool_retries() -> None:
    """Install the filter on asyncpg's pool logger (once, however many journals open)."""
    logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _QuietFloorRetries) for f in logger.filters):
        logger.addFilter(_QuietFloorRetries())


def redact_url(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


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
