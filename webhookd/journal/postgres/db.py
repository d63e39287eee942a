"""What every part of the PostgreSQL journal shares: which driver errors mean "not now", and
how a URL or a command status is read."""

from __future__ import annotations

import logging
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
