"""Which journal a config asks for: the SQLite file at ``journal.path`` or PostgreSQL at
``journal.url``. The PostgreSQL driver is imported only when a URL is configured."""

from __future__ import annotations

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config import JournalConfig, check_journal_url
from webhookd.journal.base import BaseJournal


def open_journal(
    cfg: JournalConfig, *, clock: Clock = SYSTEM_CLOCK, max_recoveries: int = 3
) -> BaseJournal:
    """The journal ``cfg`` names, not yet opened (use ``async with``).

    ``max_recoveries`` is the poison-pill rule's count, which a PostgreSQL journal applies each
    time it re-queues the jobs of a node that went silent, not only at start.
    """
    if cfg.url is not None:
        from webhookd.journal.postgres import PostgresJournal

        check_journal_url(cfg.url, "journal.url")  # an env: URL is read only now (the CLI)
        return PostgresJournal(
            cfg.url.reveal(), clock=clock, lease_s=cfg.lease_s, max_recoveries=max_recoveries
        )
    from webhookd.journal import Journal

    return Journal(cfg.path, clock=clock)
