"""The SQLite journal's changes made to order, each in a transaction of its own on the writer:
an operator's (replay, cancel, purge, pause, resume), retention's (prune, compact) and those a
step of the wall clock calls for."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from webhookd.errors import (
    JournalError,
    JournalUnavailable,
    NotFound,
)
from webhookd.journal.base import REPLAYED_RESULT, BaseJournal
from webhookd.journal.records import (
    Cancelled,
    Pruned,
    Purged,
    Replayed,
    walk_end,
)
from webhookd.journal.schema import (
    EXPIRED,
    action_clause,
    fetch,
    fetch_rows,
    key_digest,
    replayed_jobs,
)

_T = TypeVar("_T")
# The row ``probe_write`` adds and removes (no source name starts with a dot), and its size:
# about a big webhook's body.
_PROBE = ".write-probe"
# Queued jobs whose times one transaction moves after a step of the wall clock (clock_stepped).
_STEP_BATCH = 5000
PROBE_BYTES = 64 * 1024


# Free pages one incremental vacuum hands back, at most and at least. Its cost per page grows
# with the free list: after a prune of a million events (a 1.8 GB journal) 1,000 pages took up
# to 3 s, and the webhooks waiting on the writer meanwhile passed server.ack_timeout_s.
VACUUM_PAGES_MAX = 1000
VACUUM_PAGES_MIN = 8
VACUUM_BUDGET_S = 0.05


def vacuum_pages(pages: int, took_s: float) -> int:
    """How many pages the next incremental vacuum takes, after ``pages`` took ``took_s``: half
    as many past the budget, twice as many under a fifth of it."""
    if took_s > VACUUM_BUDGET_S:
        return max(VACUUM_PAGES_MIN, pages // 2)
    if took_s < VACUUM_BUDGET_S / 5:
        return min(VACUUM_PAGES_MAX, pages * 2)
    return pages


class Changes(BaseJournal):
    """The change half of ``Journal``; it needs ``reader``, ``_call`` and ``_vacuum_pages``."""

    _vacuum_pages: int  # what an incremental vacuum takes (vacuum_pages)

    @property
    def reader(self) -> aiosqlite.Connection:
        raise NotImplementedError

    async def _call(self, fn: Any, *, transaction: bool = True) -> Any:
        """``fn(conn)`` on the writer, in a transaction of its own unless ``transaction`` is
        false; its answer."""
        raise NotImplementedError

    # -- operator actions --------------------------------------------------------------------

    async def _each_event(
        self, event_ids: Sequence[str], change: Callable[[sqlite3.Connection, str], _T]
    ) -> dict[str, _T]:
        """``change(conn, event_id)`` for each event, in one transaction; ``NotFound`` for an
        unknown id, changing nothing."""

        def fn(conn: sqlite3.Connection) -> dict[str, _T]:
            out: dict[str, _T] = {}
            for event_id in event_ids:
                if not fetch_rows(conn, "SELECT 1 FROM events WHERE id = ?", (event_id,)):
                    raise NotFound(event_id)
                out[event_id] = change(conn, event_id)
            return out

        return await self._call(fn)  # type: ignore[no-any-return]

    async def replay(
        self,
        event_ids: Sequence[str],
        *,
        dead_only: bool = False,
        dismissed_only: bool = False,
        done_only: bool = False,
        cancelled_only: bool = False,
        action: str | None = None,
    ) -> dict[str, Replayed]:
        """Run each event's jobs again, now.

        Jobs that finished (dead, done, cancelled) are re-queued with fresh attempts: a replay
        is another go from the start, not a resumption. A done or cancelled job's result is
        cleared; a dead one's is kept (``REPLAYED_RESULT``): for an openai action whose
        then-forward failed it is the answer, which the replay delivers without asking the model
        again (other actions do not read a queued job's result). Queued jobs waiting for
        a later ``run_at`` (a backoff, a snooze, a long ``Retry-After``, a lane's cool-down) are
        made due now and keep their attempts, waits and kept result: they are still within their
        retry policy, so a replay only skips the wait; resetting their attempts would let
        repeated replays keep a failing job alive past ``max_attempts``, and would throw away an
        answer kept for a failed ``then``. Running jobs are left alone, but a cancel made while
        they run is withdrawn: the replay is the later word, and a failed attempt retries.

        With ``dead_only`` (a replay of dead letters: ``replay --dead``, a source's
        replay-dead) only the dead jobs are re-queued, the event's other jobs left as they
        are: a forward that was delivered is not delivered again. With ``dismissed_only``
        (``replay --dismissed``: a dismissal undone) only the dead jobs dismissed (``cancel``
        with ``dead_only``) are, likewise, and with ``done_only`` (``replay --done``: deliveries
        made again, for a target that answered 2xx and lost them) only the done ones, and with
        ``cancelled_only`` (``replay --cancelled``: a ``cancel`` undone) only the cancelled
        jobs that were not dismissed.

        With ``action`` only the jobs of the action of that name are touched: a forward made
        again without asking a model again or running a deploy twice.

        Returns ``{event_id: Replayed}``; raises ``NotFound`` for an unknown id.
        """
        now = self.clock.time()

        again = replayed_jobs(dead_only, dismissed_only, done_only, cancelled_only)
        of_action, named = action_clause(action, "?")

        def change(conn: sqlite3.Connection, event_id: str) -> Replayed:
            requeued = conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, recoveries = 0, waits = 0,"
                f" run_at = ?, finished_at = NULL, boot_id = NULL, result = {REPLAYED_RESULT},"
                " cancel_requested_at = NULL, dismissed_at = NULL"
                f" WHERE event_id = ? AND {again}{of_action}",
                (now, event_id, *named),
            )
            if dead_only or dismissed_only or done_only or cancelled_only:
                return Replayed(requeued=requeued.rowcount, run_now=0)
            hurried = conn.execute(
                "UPDATE jobs SET run_at = ? WHERE event_id = ? AND state = 'queued'"
                f" AND run_at > ?{of_action}",
                (now, event_id, now, *named),
            )
            conn.execute(
                "UPDATE jobs SET cancel_requested_at = NULL WHERE event_id = ?"
                f" AND state = 'running' AND cancel_requested_at IS NOT NULL{of_action}",
                (event_id, *named),
            )
            return Replayed(requeued=requeued.rowcount, run_now=hurried.rowcount)

        return self._count_replayed(await self._each_event(event_ids, change))

    async def cancel(
        self, event_ids: Sequence[str], *, dead_only: bool = False, action: str | None = None
    ) -> dict[str, Cancelled]:
        """Stop each event's jobs that have not started: queued ones (due, or waiting for a
        retry, a lane or a paused source) become ``cancelled`` and never run, keeping their
        attempts and last error; ``replay`` runs them again. A running job's attempt ends as it
        ends (done, dead), but whatever would queue it again (a retry, a lane's wait, a drain, a
        recovery) cancels it instead (``cancel_requested_at``, see ``leaving_running``). Returns
        ``{event_id: Cancelled}``; raises ``NotFound`` for an unknown id, changing nothing.

        With ``dead_only`` (dismissing dead letters: ``cancel --dead``) only the dead jobs
        become ``cancelled``, keeping their attempts, last error and result, and leave the
        dead-letter queue; the event's other jobs are left as they are. They are marked
        dismissed (``dismissed_at``), so that ``replay`` with ``dismissed_only`` undoes it.
        With ``action``, only the jobs of the action of that name."""
        now = self.clock.time()
        of_action, named = action_clause(action, "?")
        if dead_only:

            def dismiss(conn: sqlite3.Connection, event_id: str) -> Cancelled:
                cur = conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, dismissed_at = ?"
                    f" WHERE event_id = ? AND state = 'dead'{of_action}",
                    (now, now, event_id, *named),
                )
                return Cancelled(cur.rowcount, 0)

            return await self._each_event(event_ids, dismiss)  # the backlog is unchanged

        def change(conn: sqlite3.Connection, event_id: str) -> Cancelled:
            cancelled = conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?"
                f" WHERE event_id = ? AND state = 'queued'{of_action}",
                (now, event_id, *named),
            )
            running = conn.execute(
                "UPDATE jobs SET cancel_requested_at = ? WHERE event_id = ?"
                f" AND state = 'running'{of_action}",
                (now, event_id, *named),
            )
            return Cancelled(cancelled.rowcount, running.rowcount)

        return self._count_cancelled(await self._each_event(event_ids, change))

    async def purge(self, event_ids: Sequence[str]) -> dict[str, Purged]:
        """``BaseJournal.purge``. What it deletes is overwritten in the file (``secure_delete``);
        the ``-wal`` may hold the pages as they were until commits overwrite them or the daemon
        stops cleanly."""

        def delete(conn: sqlite3.Connection, event_id: str) -> Purged:
            states = [
                r[0]
                for r in fetch_rows(conn, "SELECT state FROM jobs WHERE event_id = ?", (event_id,))
            ]
            if "running" in states:
                return Purged(0, 0, states.count("running"))
            conn.execute(
                "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = ?)",
                (event_id,),
            )
            conn.execute("DELETE FROM jobs WHERE event_id = ?", (event_id,))
            (key,) = fetch_rows(conn, "SELECT dedup_key FROM events WHERE id = ?", (event_id,))[0]
            # Its keys went in together, the second (what a signed body's signature covers,
            # ``NewEvent.second``) right after the first: the rowid after it, if it is the
            # event's. The table has no index on the event.
            found = fetch_rows(
                conn,
                "SELECT n FROM dedup WHERE digest = ? AND event_id = ?",
                (key_digest(key), event_id),
            )
            if found:
                conn.execute(
                    "DELETE FROM dedup WHERE n IN (?, ?) AND event_id = ?",
                    (found[0][0], found[0][0] + 1, event_id),
                )
            conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
            return Purged(len(states), states.count("queued"))

        return self._count_purged(await self._each_event(event_ids, delete))

    # -- retention ---------------------------------------------------------------------------

    async def prune(
        self,
        *,
        keep_done_s: float,
        keep_dead_s: float,
        keep_dedup_s: float,
        batch: int = 500,
        start_at: float | None = None,
    ) -> Pruned:
        """Delete one small batch of expired rows of each kind; call until it returns zeros.

        The candidates are found on the reader connection (WAL lets it run beside the writer),
        walking ``events_received`` from the oldest event (or ``start_at``): only events older
        than ``keep_done_s`` are visited, where walking by ``seq`` read every event of the file
        whenever fewer than ``batch`` had expired, as in every round once retention has caught
        up (250 ms at 300,000 events, against 1 ms). The write transaction then deletes at most
        ``batch`` of them, re-checking each, so the write lock is held for milliseconds and an
        ingest commit never waits long behind retention.
        """
        now = self.clock.time()
        done_before, dead_before = now - keep_done_s, now - keep_dead_s
        since, args = "", [done_before, done_before, dead_before, batch]
        if start_at is not None:
            since = " AND e.received_at >= ?"
            args.insert(1, start_at)
        try:
            rows = await fetch(
                self.reader,
                f"SELECT e.id, e.received_at FROM events e INDEXED BY events_received"
                f" WHERE e.received_at < ?{since} AND {EXPIRED} ORDER BY e.received_at LIMIT ?",
                args,
            )
        except JournalError as exc:
            raise JournalUnavailable(str(exc)) from exc
        candidates = [r[0] for r in rows]
        walked_to = walk_end(rows, batch, done_before)

        def fn(conn: sqlite3.Connection) -> Pruned:
            ids: list[tuple[str]] = []
            for start in range(0, len(candidates), 250):
                chunk = candidates[start : start + 250]
                marks = ",".join("?" * len(chunk))
                still = fetch_rows(  # a replay may have re-queued one since the scan
                    conn,
                    f"SELECT e.id FROM events e WHERE e.id IN ({marks}) AND {EXPIRED}",
                    (*chunk, done_before, dead_before),
                )
                ids.extend((r[0],) for r in still)
            conn.executemany(
                "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs WHERE event_id = ?)",
                ids,
            )
            cur = conn.executemany("DELETE FROM jobs WHERE event_id = ?", ids)
            jobs = cur.rowcount
            conn.executemany("DELETE FROM events WHERE id = ?", ids)
            # The oldest keys by arrival (rowid), not an index on their time: read ``batch`` of
            # them and delete those expired. Those stamped ahead of the clock (made before it
            # was stepped back) are taken as made now: left as they were, such a head held
            # back the deletion of every key behind it until its own time came, 30 years on.
            conn.execute(
                "UPDATE dedup SET created_at = ? WHERE n IN (SELECT n FROM (SELECT n, created_at"
                " FROM dedup ORDER BY n LIMIT ?) WHERE created_at > ?)",
                (now, batch, now),
            )
            cur = conn.execute(
                "DELETE FROM dedup WHERE n IN (SELECT n FROM (SELECT n, created_at FROM dedup"
                " ORDER BY n LIMIT ?) WHERE created_at < ?)",
                (batch, now - keep_dedup_s),
            )
            return Pruned(len(ids), max(jobs, 0), max(cur.rowcount, 0), walked_to)

        result: Pruned = await self._call(fn)
        return result

    async def compact(self, pages: int | None = None) -> tuple[int, int]:
        """Hand free pages back to the file system and checkpoint the WAL without waiting.

        ``PRAGMA incremental_vacuum`` moves at most ``pages`` free pages per call (short, like
        a prune batch; by default as many as ``vacuum_pages`` says fit in its time);
        ``wal_checkpoint(PASSIVE)`` copies what no reader still needs into the main file so the
        WAL is reused instead of growing. Returns (freelist pages left, WAL frames not yet
        checkpointed).
        """

        def vacuum(conn: sqlite3.Connection) -> int:
            # Each step of this PRAGMA frees one page, and Python's execute() steps a statement
            # without result columns only once; executescript steps it to the end. It runs in
            # autocommit, as its own short transaction.
            started = time.monotonic()
            conn.executescript(f"PRAGMA incremental_vacuum({int(pages or self._vacuum_pages)});")
            if pages is None:
                self._vacuum_pages = vacuum_pages(self._vacuum_pages, time.monotonic() - started)
            rows = fetch_rows(conn, "PRAGMA freelist_count")
            return int(rows[0][0])

        def checkpoint(conn: sqlite3.Connection) -> int:
            # (busy, frames in the WAL, frames checkpointed); it cannot run inside a transaction.
            rows = fetch_rows(conn, "PRAGMA wal_checkpoint(PASSIVE)")
            busy, log_frames, done = rows[0]
            return 0 if busy or log_frames < 0 else int(log_frames) - int(done)

        free: int = await self._call(vacuum, transaction=False)
        behind: int = await self._call(checkpoint, transaction=False)
        return free, behind

    async def maintain(self) -> int:
        """Incremental vacuum and a passive checkpoint (``compact``); free pages left."""
        free, _ = await self.compact()
        return free

    # -- pausing -----------------------------------------------------------------------------

    async def pause(self, source: str) -> bool:
        """Hold processing of ``source``'s jobs (intake goes on); ``False`` if already paused."""
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO paused_sources(source, paused_at) VALUES (?, ?)",
                (source, now),
            )
            return cur.rowcount > 0

        return await self._call(fn)  # type: ignore[no-any-return]

    async def clock_stepped(self, by_s: float) -> int | None:
        # Only the jobs queued when the walk begins: one journaled since (a webhook, a retry
        # of a job of higher seq) has its time from the new clock already. Unbounded, the walk
        # moved those too, and under steady intake never came to its end.
        top = await self._call(lambda conn: fetch_rows(conn, "SELECT MAX(seq) FROM jobs"))
        last_seq = top[0][0] if top else None
        if last_seq is None:
            return 0
        moved, after = 0, -1
        while True:

            def fn(conn: sqlite3.Connection, after: int = after) -> tuple[int, int]:
                # One batch of the queued jobs in seq order, through the partial index that
                # holds only those: a million of them in one statement held every ingest's
                # commit for seconds.
                rows = fetch_rows(
                    conn,
                    "SELECT seq FROM jobs WHERE state = 'queued' AND seq > ? AND seq <= ?"
                    " ORDER BY seq LIMIT ?",
                    (after, last_seq, _STEP_BATCH),
                )
                if not rows:
                    return 0, after
                last = int(rows[-1][0])
                cur = conn.execute(
                    "UPDATE jobs SET run_at = run_at + ? WHERE state = 'queued'"
                    " AND seq > ? AND seq <= ?",
                    (by_s, after, last),
                )
                return max(cur.rowcount, 0), last

            n, after = await self._call(fn)
            if not n:
                return moved
            moved += n

    async def bring_due_by(self, latest: float) -> int:
        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE jobs SET run_at = ? WHERE state = 'queued' AND run_at > ?", (latest, latest)
            )
            return max(cur.rowcount, 0)

        return await self._call(fn)  # type: ignore[no-any-return]

    async def probe_write(self) -> None:
        # A row of PROBE_BYTES added and taken out in one transaction: SQLite writes the pages
        # a transaction touched, not only what it changed, so the commit needs as much room as
        # a webhook's body would (a full disk refuses it) and leaves nothing behind.
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO paused_sources(source, paused_at) VALUES (?, zeroblob(?))",
                (_PROBE, PROBE_BYTES),
            )
            conn.execute("DELETE FROM paused_sources WHERE source = ?", (_PROBE,))

        await self._call(fn)

    async def resume(self, source: str) -> bool:
        """Let ``source``'s jobs run again; ``False`` if it was not paused."""

        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM paused_sources WHERE source = ?", (source,))
            return cur.rowcount > 0

        return await self._call(fn)  # type: ignore[no-any-return]
