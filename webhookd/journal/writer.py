"""The SQLite journal's writer (``Writer``, a half of ``Journal``): one task takes whatever
writes wait and commits them as one transaction on a thread of its own (group commit).

Hazards worth knowing before editing:

* One fsync per batch, not per webhook, is what makes durable intake fast: every write goes
  through ``_enqueue``, and each batch is one ``BEGIN IMMEDIATE`` transaction (the group), then
  each other write (``CallOp``) in its own. Never add a write path that bypasses the writer.
* The whole batch is one hop to the writer's thread, and its futures are settled back on the
  loop (``_resolve``); the writer's connection is touched on that thread only.
* Nothing may escape from the thread's side: an error fails the operations it concerns, never
  the writer, which every later webhook and job needs. A writer that stops anyway fails what
  it held, and ``watch`` ends the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from webhookd.errors import JournalCopied, JournalError, JournalGone, JournalUnavailable
from webhookd.journal.base import BaseJournal
from webhookd.journal.batch import (
    GATHER_PASSES,
    CallOp,
    ClaimOp,
    FinishOp,
    Group,
    IngestOp,
    Op,
    OpQueue,
    Starts,
    WriteFailed,
    reserve_starts,
    write_ops,
)
from webhookd.journal.files import copied_to, read_only
from webhookd.journal.records import Ready
from webhookd.journal.threads import _OwnThread
from webhookd.models import JobState, storable_text
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.journal")

MAX_BATCH = 512
# After write failures, how long commits must go through with none failing before one line says
# writes succeed again. On a nearly full disk small commits (a claim, a job's outcome) still fit
# in the WAL's old space while larger ones fail, so success and failure alternate for as long
# as the disk stays full: a line at each first success would say so hundreds of times a second.
WRITES_BACK_AFTER_S = 5.0
_T = TypeVar("_T")
# SQLite's errors for a file it cannot write: "disk I/O error", "attempt to write a readonly
# database" (``read_only`` then asks the file system why).
_CANNOT_WRITE = (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY)


class Writer(BaseJournal):
    """The writer half of ``Journal``; it needs ``_checkpoint_quietly`` and
    ``_maybe_checkpoint`` (the WAL's checkpoints, which the writer's batches call for)."""

    path: Path
    serving: bool
    _writer: sqlite3.Connection | None  # used only on self._thread
    _thread: _OwnThread | None
    _queue: OpQueue
    _task: asyncio.Task[None] | None
    _closing: bool
    # Set when a background checkpoint left frames uncopied: the next batch copies them first.
    _checkpoint_tail: bool
    _log_write_failed: Throttle
    # The failure the "writes succeed again" line will name, and the timer that writes it.
    _failure_ended: str | None
    _writes_back_line: asyncio.TimerHandle | None
    _read_only: str | None  # why the last failed batch could not be written
    _refusing: str | None  # why every write is refused (the file was moved: ``Saving``)

    def _require_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise JournalError("journal is not open")
        return self._writer

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the writer's own thread (the only thread that touches its connection)."""
        assert self._thread is not None
        return await self._thread.submit(fn, *args)

    def _checkpoint_quietly(self, sql: str) -> None:
        raise NotImplementedError

    def _maybe_checkpoint(self) -> None:
        raise NotImplementedError

    def _enqueue(self, op: Op) -> None:
        if self._refusing is not None:
            raise JournalGone(self._refusing)
        if self._task is None or self._task.done():
            raise JournalUnavailable(self.writer_problem or "journal writer is not running")
        self._queue.put(op)

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        """The writer's task is done: if close() did not ask for that, say why (``/readyz``)."""
        if task.cancelled():
            why = "cancelled"
        else:
            exc = task.exception()  # retrieved here, so asyncio does not log it a second time
            why = _describe(exc) if exc is not None else "returned"
        if not self._closing:
            self.writer_problem = f"journal writer stopped: {why}"

    async def _submit(self, op: Op) -> Any:
        self._enqueue(op)
        return await op.future

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _write_loop(self) -> None:
        batch: list[Op] = []
        try:
            # After close() the queue still hands out what was queued, then nothing.
            while batch := await self._queue.take(MAX_BATCH, GATHER_PASSES):
                # The whole batch is one hop to the writer's thread: the group transaction,
                # then each other write in its own. Futures are resolved back here, on the loop.
                ops: list[Op] = []
                calls: list[CallOp] = []
                for op in batch:
                    if isinstance(op, CallOp):
                        calls.append(op)
                    else:
                        ops.append(op)
                group = Group(ops, calls, self.clock.time(), checkpoint_tail=self._checkpoint_tail)
                self._checkpoint_tail = False
                group.starts = starts = reserve_starts(self.starter, ops)
                self._writing_since = time.monotonic()
                try:
                    await self._in_thread(self._write_batch, group)
                    self._resolve(group)
                finally:
                    self._writing_since = None
                    # The pool starts the jobs written claimed and gets every other slot it
                    # reserved back, whatever became of the write. Should the writer die here,
                    # a job written claimed stays running under this boot: the next start
                    # recovers it.
                    if starts.job_ids and self.starter is not None:
                        self.starter.settle(group.started, starts.job_ids)
                if group.commits:
                    self._maybe_checkpoint()
        finally:
            # Only reached with work left when the writer dies or is cancelled: fail the rest
            # now rather than leave webhooks and workers waiting on futures no one will resolve.
            self._fail_all(batch)

    def _fail_all(self, batch: list[Op]) -> None:
        error = JournalUnavailable("journal writer is not running")
        for op in [*batch, *self._queue.drain()]:
            if not op.future.done():
                op.future.set_exception(error)

    def _write_batch(self, group: Group) -> None:
        """On the writer's thread: commit the group, then each call; record what happened.

        Nothing may escape from here: an error fails the operations it concerns, never the
        writer, which every later webhook and job needs.
        """
        conn = self._require_writer()
        began = time.perf_counter()
        if group.checkpoint_tail:
            # Under a steady stream of commits a background checkpoint never ends with the
            # whole WAL copied, and SQLite restarts the WAL only when it has: finishing the
            # tail here (frames committed while it ran: a few pages) lets the next transaction
            # start the WAL over instead of growing it to the backstop.
            self._checkpoint_quietly("PRAGMA wal_checkpoint(PASSIVE)")
        # A group none of whose operations needs a sync (claims alone, see ClaimOp.synced) is
        # committed with synchronous = NORMAL; every other commit stays FULL.
        unsynced = bool(group.ops) and not any(op.synced for op in group.ops)
        if unsynced:
            try:
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.Error:
                unsynced = False  # then the claims are fsync'd like the rest
        try:
            self._write_ops(conn, group)
        finally:
            if unsynced:
                # Should this fail, it escapes and ends the writer (and the daemon): better
                # than acknowledging webhooks from a connection left without its fsync.
                conn.execute("PRAGMA synchronous = FULL")
        if group.commits and not unsynced:
            # The tail copy included: the group's webhooks waited for it too.
            group.write_s = time.perf_counter() - began
        for call in group.calls:
            group.called.append(self._write_call(conn, call))
        self._read_only = None
        if group.error is not None or group.called:  # not on a batch of ingests that went in
            failures = [
                group.error,
                *(e.cause for _, e in group.called if isinstance(e, WriteFailed)),
            ]
            self._read_only = self._read_only_cause(failures)

    def _read_only_cause(self, errors: Sequence[BaseException | None]) -> str | None:
        """What hides behind SQLite's "disk I/O error" (or "readonly") among ``errors``: a
        file system the kernel turned read-only (``read_only``), asked on the writer's thread
        only after such an error."""
        if any(getattr(e, "sqlite_errorcode", 0) & 0xFF in _CANNOT_WRITE for e in errors):
            return read_only(self.path)
        return None

    @staticmethod
    def _write_ops(conn: sqlite3.Connection, group: Group) -> None:
        if group.ops:
            try:
                group.results = _transaction(conn, _writer_of(group.ops, group.now, group.starts))
                group.commits += 1
            except Exception as exc:
                group.results = {}
                if len(group.ops) == 1 or isinstance(exc, (sqlite3.OperationalError, OSError)):
                    # Full, locked, read-only, I/O: every operation would fail again alone (and
                    # a locked file would make each wait out busy_timeout).
                    group.error = exc
                else:
                    # One operation's value failed the group (a lone surrogate cannot be
                    # encoded, an integer too big): write each alone so the others still commit.
                    for op in group.ops:
                        try:
                            group.results |= _transaction(
                                conn, _writer_of([op], group.now, group.starts)
                            )
                            group.commits += 1
                        except Exception as one_exc:
                            group.errors[id(op)] = one_exc

    @staticmethod
    def _write_call(conn: sqlite3.Connection, op: CallOp) -> tuple[Any, BaseException | None]:
        if not op.transaction:
            try:
                return op.fn(conn), None
            except Exception as exc:
                return None, JournalUnavailable(f"journal maintenance failed: {_describe(exc)}")
        try:
            result = _transaction(conn, op.fn)
        except (sqlite3.Error, OSError) as exc:
            return None, WriteFailed(exc)
        except Exception as exc:  # an error of the operation itself (NotFound …): pass it on
            return None, exc
        return result, None

    def _write_error(self, exc: BaseException) -> str:
        """A failed commit's error, with its cause where SQLite's words hide it: a file system
        the kernel turned read-only after an I/O error is a bare "disk I/O error" to SQLite
        (``_write_batch`` asked ``read_only`` on the writer's thread)."""
        said = _describe(exc)
        return f"{said} ({self._read_only})" if self._read_only else said

    def _writes_again(self) -> None:
        """A commit went through: after failures (a full disk, say), the error clears at once
        (``/readyz``, the metrics) and one line says so once commits have kept going through
        for ``WRITES_BACK_AFTER_S`` (``_write_failed`` calls it off)."""
        if self.last_write_error is None:
            return
        self._failure_ended = self.last_write_error
        self.last_write_error = None
        if self._writes_back_line is None:
            self._writes_back_line = asyncio.get_running_loop().call_later(
                WRITES_BACK_AFTER_S, self._say_writes_again
            )

    def _write_failed(self, error: str) -> None:
        self.last_write_error = error
        if self._writes_back_line is not None:
            self._writes_back_line.cancel()
            self._writes_back_line = None

    def _say_writes_again(self) -> None:
        """The line that ends a run of write failures (also when the journal closes first)."""
        if self._writes_back_line is not None:
            self._writes_back_line.cancel()
            self._writes_back_line = None
        if self._failure_ended is not None:
            self._log_write_failed.flush()  # what was held back, before the line that ends it
            log.info("journal writes succeed again (the last failure: %s)", self._failure_ended)
            self._failure_ended = None

    def _resolve(self, group: Group) -> None:
        """On the loop: hand each waiter its result, keep the counters, announce new jobs (and
        keep those written claimed in ``group.started``)."""
        if group.error is not None:
            self._write_failed(self._write_error(group.error))
            self._log_write_failed("journal write failed: %s", self.last_write_error)
        elif group.commits:
            self._writes_again()
        self.commits += group.commits
        created: list[Ready] = []
        started = group.started
        for op in group.ops:
            exc = group.error or group.errors.get(id(op))
            if exc is not None:
                if exc is not group.error:
                    self._log_write_failed(
                        "journal write failed for one %s: %s", _kind(op), _describe(exc)
                    )
                    said = _describe(exc)
                else:
                    said = self.last_write_error or _describe(exc)
                if not op.future.done():
                    op.future.set_exception(JournalUnavailable(f"journal write failed: {said}"))
                continue
            result = group.results[id(op)]
            self.batched_ops += 1
            if isinstance(op, IngestOp):
                ingested, ready, claimed = result
                created.extend(ready)
                started.extend(claimed)
                result = ingested
            elif isinstance(op, FinishOp):
                # Those a cancel kept from being queued again (``result``) left the backlog too.
                ended = sum(1 for f in op.results if f.state != JobState.QUEUED)
                self.backlog_jobs -= ended + len(result)
            if not op.future.done():
                op.future.set_result(result)
        self.backlog_jobs += len(created) + len(started)
        for call, (result, call_exc) in zip(group.calls, group.called, strict=True):
            if isinstance(call_exc, WriteFailed):
                self._write_failed(self._write_error(call_exc.cause))
                call_exc = JournalUnavailable(f"journal write failed: {self.last_write_error}")
            elif call_exc is None and call.transaction:
                self._writes_again()
                self.commits += 1
            if call.future.done():
                continue
            if call_exc is not None:
                call.future.set_exception(call_exc)
            else:
                call.future.set_result(result)
        # Last, once every waiter has its answer: a consumer's error here ends the writer.
        if group.write_s and self.on_commit_seconds is not None:
            self.on_commit_seconds(group.write_s)
        if created and self.on_commit is not None:
            self.on_commit(created)

    async def _call(self, fn: Any, *, transaction: bool = True) -> Any:
        if transaction and not self.serving:  # a CLI verb's change
            fn = self._not_copied(fn)
        return await self._submit(CallOp(self._new_future(), fn, transaction))

    def _not_copied(self, fn: Callable[[sqlite3.Connection], _T]) -> Callable[..., _T]:
        """``fn``, refused on a journal ``webhookd copy`` put into PostgreSQL. Asked inside
        the write transaction: a verb checks the marker as it starts, then may wait here for
        the write lock a copy holds, and that copy may end meanwhile."""

        def guarded(conn: sqlite3.Connection) -> _T:
            if (said := copied_to(self.path)) is not None:
                raise JournalCopied(
                    f"journal {self.path} was {said} while this waited for it, and its jobs"
                    " run there: nothing was changed; make the change with the nodes' config"
                    " (journal.url)"
                )
            return fn(conn)

        return guarded


def _describe(exc: BaseException) -> str:
    """A write error for logs and ``/readyz``: SQLite's own words, else the exception's type."""
    text = str(exc) if isinstance(exc, (sqlite3.Error, OSError)) else f"{type(exc).__name__}: {exc}"
    return storable_text(text)  # the value that failed may hold a lone surrogate


def _writer_of(
    ops: list[Op], now: float, starts: Starts
) -> Callable[[sqlite3.Connection], dict[int, Any]]:
    return lambda conn: write_ops(conn, ops, now, starts)


def _kind(op: Op) -> str:
    return {IngestOp: "ingest", FinishOp: "finish", ClaimOp: "claim"}.get(type(op), "write")


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """``fn(conn)`` inside ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if anything raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return result
