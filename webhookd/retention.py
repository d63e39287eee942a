"""The retention policy: delete what ``[journal]`` says has expired, then give the space back.

Used by the daemon's retention task and by ``webhookd prune``; it sees only the journal's
interface, so every journal backend is pruned the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from webhookd.config.sections import JournalConfig
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import Pruned

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


def windows_s(config: JournalConfig) -> dict[str, float]:
    """``config``'s retention windows (``keep_done_h`` …) in seconds, as ``prune`` takes them."""
    return {
        "keep_done_s": config.keep_done_h * HOUR_S,
        "keep_dead_s": config.keep_dead_d * DAY_S,
        "keep_dedup_s": config.keep_dedup_d * DAY_S,
    }


def kept_s(config: JournalConfig) -> float:
    """How far back the journal holds every event: a finished one goes once it is older than
    ``keep_done_h`` (a dead one later). A figure counted from the journal over a longer window
    counts only what is still kept: at 20 webhooks/s and ``keep_done_h = 0.01`` (36 s), the
    last 5 minutes' received read 150/min where 1,200 came."""
    return config.keep_done_h * HOUR_S


# Between two batches: how long a batch took (``rest``'s argument).
Rest = Callable[[float], Awaitable[None]]


async def prune_expired(
    journal: BaseJournal,
    config: JournalConfig,
    on_batch: Callable[[Pruned], None] | None = None,
    rest: Rest | None = None,
) -> tuple[int, int]:
    """Prune with the windows ``config`` sets (``keep_done_h`` …); (events, dedup keys)."""
    return await prune_all(journal, **windows_s(config), on_batch=on_batch, rest=rest)


async def prune_all(
    journal: BaseJournal,
    *,
    keep_done_s: float,
    keep_dead_s: float,
    keep_dedup_s: float,
    on_batch: Callable[[Pruned], None] | None = None,
    rest: Rest | None = None,
) -> tuple[int, int]:
    """Prune in small batches until nothing is expired, then compact; (events, dedup keys).

    Each batch is its own short transaction and the loop yields between them, so ingest
    commits interleave with retention instead of waiting behind it; ``rest``, when given, is
    awaited between batches instead (another process than the daemon's, which must leave the
    daemon room to write). ``on_batch`` hears what each batch deleted (``webhookd prune``'s
    progress bar).
    """
    pause = rest if rest is not None else _yield
    events = dedup = 0
    start_at = None  # each batch walks on from where the one before stopped
    while True:
        began = time.monotonic()
        pruned = await journal.prune(
            keep_done_s=keep_done_s,
            keep_dead_s=keep_dead_s,
            keep_dedup_s=keep_dedup_s,
            start_at=start_at,
        )
        start_at = pruned.walked_to
        if on_batch is not None:
            on_batch(pruned)
        events, dedup = events + pruned.events, dedup + pruned.dedup
        if not (pruned.events or pruned.dedup):
            break
        await pause(time.monotonic() - began)
    left: int | None = None
    # Until no free pages are left, or they stop shrinking (an old, non-incremental file).
    while True:
        began = time.monotonic()
        free = await journal.maintain()
        if free == 0 or free == left:
            break
        left = free
        await pause(time.monotonic() - began)
    return events, dedup


async def _yield(_took_s: float) -> None:
    await asyncio.sleep(0)
