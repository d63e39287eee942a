"""The journal: the SQLite file or the PostgreSQL database the config names, opened or peeked.

``open_journal`` picks the backend from ``journal.path`` or ``journal.url``; ``peek_journal``
reads one without opening it (``check``). The package's modules, each importing only those
below it (tests/test_imports.py): ``moved`` (a SQLite file removed or replaced while open),
``locks`` (who holds a SQLite journal), ``threads`` (the SQLite journal's own threads),
``records`` (what goes in and out), ``schema`` (migrations, shared SQL, row converters),
``base`` (``BaseJournal``, the interface) and ``batch`` (what one group commit writes),
``files`` (a SQLite journal's file and what lies beside it), ``reads`` (queries), ``sqlite``
(``Journal``, the embedded default) beside ``postgres`` (``PostgresJournal``); above them,
``copies`` (backup, restore) and ``postgres.from_sqlite`` (``webhookd copy``). The names other
modules and the tests import from here are here too: ``from webhookd.journal import X``
wherever ``X`` lives.
"""

from __future__ import annotations

import asyncio

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config.checks import check_journal_url
from webhookd.config.sections import JournalConfig
from webhookd.journal.base import BULK_BATCH, BaseJournal, present_only
from webhookd.journal.changes import VACUUM_PAGES_MAX, VACUUM_PAGES_MIN, vacuum_pages
from webhookd.journal.files import (
    _BUSY_TIMEOUT_MS,
    _NEARLY_FULL_BYTES,
    _SQLITE_HEADER,
    WAL_SIZE_LIMIT_BYTES,
    _owner_only,
    copied_marker,
    copied_to,
    foreign,
    interrupted_restores,
    not_a_journal,
    restored_marker,
    short_of_room,
    someone_elses,
    why_unusable,
)
from webhookd.journal.locks import (
    _take_serve_lock,
    opened_elsewhere,
    process_running,
    serve_lock_file,
    serve_lock_held,
    who_holds,
)
from webhookd.journal.polled import ADMIN_READ_S, PolledCounts, answer_within, let_go
from webhookd.journal.reads import peek
from webhookd.journal.records import (
    CAUSE_CHARS,
    Activity,
    Cancelled,
    Cap,
    CapClaim,
    Claimed,
    Counts,
    DeadCause,
    DeadJobs,
    EventDetail,
    EventSummary,
    Finished,
    Ingested,
    Lane,
    LaneAction,
    LaneBacklog,
    LaneCall,
    NewEvent,
    NewJob,
    NodeInfo,
    Peeked,
    Peer,
    Poisoned,
    Pruned,
    Purged,
    Ready,
    Recorded,
    Recovery,
    Replayed,
    Series,
    Starter,
)
from webhookd.journal.schema import EVENT_STATES, MIGRATIONS
from webhookd.journal.sqlite import Journal
from webhookd.journal.threads import (
    CHECKPOINT_EVERY_S,
    WRITER_AUTOCHECKPOINT_PAGES,
    checkpoint_passes,
)

__all__ = [
    "ADMIN_READ_S",
    "BULK_BATCH",
    "CAUSE_CHARS",
    "CHECKPOINT_EVERY_S",
    "EVENT_STATES",
    "MIGRATIONS",
    "VACUUM_PAGES_MAX",
    "VACUUM_PAGES_MIN",
    "WAL_SIZE_LIMIT_BYTES",
    "WRITER_AUTOCHECKPOINT_PAGES",
    "_BUSY_TIMEOUT_MS",
    "_NEARLY_FULL_BYTES",
    "_SQLITE_HEADER",
    "Activity",
    "BaseJournal",
    "Cancelled",
    "Cap",
    "CapClaim",
    "Claimed",
    "Counts",
    "DeadCause",
    "DeadJobs",
    "EventDetail",
    "EventSummary",
    "Finished",
    "Ingested",
    "Journal",
    "Lane",
    "LaneAction",
    "LaneBacklog",
    "LaneCall",
    "NewEvent",
    "NewJob",
    "NodeInfo",
    "Peeked",
    "Peer",
    "Poisoned",
    "PolledCounts",
    "Pruned",
    "Purged",
    "Ready",
    "Recorded",
    "Recovery",
    "Replayed",
    "Series",
    "Starter",
    "_owner_only",
    "_take_serve_lock",
    "answer_within",
    "checkpoint_passes",
    "copied_marker",
    "copied_to",
    "foreign",
    "interrupted_restores",
    "let_go",
    "not_a_journal",
    "open_journal",
    "opened_elsewhere",
    "peek_journal",
    "present_only",
    "process_running",
    "restored_marker",
    "serve_lock_file",
    "serve_lock_held",
    "short_of_room",
    "someone_elses",
    "vacuum_pages",
    "who_holds",
    "why_unusable",
]


async def peek_journal(cfg: JournalConfig) -> Peeked:
    """The queued or running jobs by (source, action) and the schema version of the journal
    ``cfg`` names, with its events when ``serve`` would upgrade it, read without opening it as
    ``open_journal`` does: no schema upgrade, no file created, no node joined (``check``,
    beside a running daemon or none). Nothing when there is no journal yet; ``JournalError``
    when it cannot be read."""
    if cfg.url is not None:
        from webhookd.journal.postgres import schema

        check_journal_url(cfg.url, "journal.url")
        return await schema.peek(cfg.url.reveal(), cfg.statement_cache_size)
    return await asyncio.to_thread(peek, cfg.path)


def open_journal(
    cfg: JournalConfig, *, clock: Clock = SYSTEM_CLOCK, max_recoveries: int = 3, node: bool = True
) -> BaseJournal:
    """The journal ``cfg`` names, not yet opened (use ``async with``): the SQLite file at
    ``journal.path`` or PostgreSQL at ``journal.url``.

    ``max_recoveries`` is the poison-pill rule's count, which a PostgreSQL journal applies each
    time it re-queues the jobs of a node that went silent, not only at start. The PostgreSQL
    driver is imported only when a URL is configured. ``node=False`` (the CLI) opens a
    PostgreSQL journal without joining the cluster as a node.
    """
    if cfg.url is not None:
        from webhookd.journal.postgres import PostgresJournal

        check_journal_url(cfg.url, "journal.url")  # an env: URL is read only now (the CLI)
        return PostgresJournal(
            cfg.url.reveal(),
            clock=clock,
            lease_s=cfg.lease_s,
            max_recoveries=max_recoveries,
            statement_cache_size=cfg.statement_cache_size,
            node=node,
            # Only a node listens: the CLI needs no listen_url, nor its env: variable.
            listen_url=_listen_url(cfg) if node else None,
        )
    return Journal(cfg.path, clock=clock, serving=node)


def _listen_url(cfg: JournalConfig) -> str | None:
    if cfg.listen_url is None:
        return None
    check_journal_url(cfg.listen_url, "journal.listen_url")
    return cfg.listen_url.reveal()
