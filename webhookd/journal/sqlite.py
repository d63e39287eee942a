"""The SQLite journal (``Journal``): its lifecycle, the group-commit writer, the other writes.

Hazards worth knowing before editing:

* Every write goes through one writer task that takes whatever is waiting and commits it as one
  ``BEGIN IMMEDIATE`` transaction (group commit). One fsync per batch, not per webhook, is what
  makes durable intake fast; never add a write path that bypasses the writer.
* Writes run on one thread of their own with a plain ``sqlite3`` connection, a whole batch per
  hop (aiosqlite would make every statement its own hop, and each hop waits for the event
  loop). Reads go through aiosqlite on a second connection; WAL lets them run beside writes.
  Nothing awaits network I/O inside a transaction.
* WAL checkpoints run on a third connection and thread of their own, in the background, never
  inside an ingest's commit: SQLite's automatic checkpoint would copy a thousand pages back and
  fsync the main file in whichever COMMIT crossed the threshold, and every webhook of that batch
  would wait for it (the ack p99 at a steady rate was those stalls). The writer keeps a far
  higher automatic threshold only as a backstop, should the background checkpoints fall behind.
* The file is shared with CLI processes (``webhookd replay`` while the daemon runs): WAL mode
  lets readers run beside the writer, and ``busy_timeout`` makes writers queue for the lock.
* SQLite goes on committing into a file whose name was taken away (``rm -rf`` of its folder, a
  file put at its path), and the file is gone at the exit. The daemon's ``watch`` compares the
  path with what it named at open, once a second; once it differs every write is refused and
  the writer copies the file out through its own connection (``moved``), then the daemon exits.
  Its ``-wal`` removed alone is checkpointed into the file the same way before the exit; its
  ``-shm`` removed alone (which other processes would not share) ends the daemon too.
  A copy that fails (no room) is tried again every ``SAVE_RETRY_S`` with the daemon still up:
  its exit would take the only holder of the contents with it.
* All SQL lives in this package, so that another journal (PostgreSQL) can replace it:
  ``schema`` (migrations, shared SQL, row converters), ``records`` (what goes in and out),
  ``batch`` (what one group commit writes), ``reads`` (queries), ``files`` and ``locks`` (the
  file, what lies beside it, who holds it), ``threads`` (the writer's and the checkpointer's),
  ``writer`` (the group-commit writer), ``saving`` (a file moved while open), and here the
  lifecycle, the checkpoints and the other writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.errors import (
    JournalError,
    JournalNewer,
    JournalUnavailable,
)
from webhookd.journal.base import migrating
from webhookd.journal.batch import (
    ClaimOp,
    FinishOp,
    IngestOp,
    OpQueue,
)
from webhookd.journal.changes import VACUUM_PAGES_MAX, Changes
from webhookd.journal.files import (
    _BUSY_TIMEOUT_MS,
    _NEW_FILE_PRAGMA,
    _PRAGMAS,
    _foreign_file,
    _other_file,
    _owner_only,
    _why_not,
    copied_marker,
    copied_to,
    interrupted_restores,
    not_a_journal,
    short_of_room,
    someone_elses,
)
from webhookd.journal.locks import _take_serve_lock, opened_elsewhere, who_holds
from webhookd.journal.moved import (
    FileIds,
)
from webhookd.journal.reads import Reads
from webhookd.journal.records import (
    Cap,
    CapClaim,
    Claimed,
    Finished,
    Ingested,
    NewEvent,
    Poisoned,
    Recorded,
    Recovery,
)
from webhookd.journal.saving import Saving
from webhookd.journal.schema import (
    MIGRATIONS,
    add_functions,
    attempt_row,
    dump,
    fetch_rows,
    leaving_running,
)
from webhookd.journal.threads import (
    CHECKPOINT_EVERY_S,
    WRITER_AUTOCHECKPOINT_PAGES,
    _Busy,
    _OwnThread,
    checkpoint_passes,
)
from webhookd.journal.writer import _describe, _transaction
from webhookd.models import new_boot_id
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.journal")

# How long close() waits for the writer to flush and for each thread to let go of its
# connection. A thread stuck in I/O is then left behind rather than holding up the exit.
CLOSE_TIMEOUT_S = 10.0
_T = TypeVar("_T")

# A running job put back in the queue (drain, recovery) at ``:now``, or cancelled instead when a
# cancel came while it ran.
_BACK_TO_QUEUE = leaving_running("'queued'", "finished_at", ":now")


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class Journal(Saving, Reads, Changes):
    """The SQLite journal, the embedded default. Use as ``async with Journal(path) as journal:``."""

    one_writer = True
    # Nothing else runs its jobs: the next start re-queues what a boot before it left running.
    left_claimed_fate = "recovered by the next start"

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        on_commit: Any = None,
        serving: bool = False,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        # The daemon's journal (``webhookd serve``), not the CLI's: it holds the file's serve
        # lock while open and truncates the WAL when it closes.
        self.serving = serving
        self._lock_fd: int | None = None
        self._held_elsewhere: str | None = None  # who had the file open as this opened it
        # Named as a PostgreSQL node is, so ``nodes()`` reads the same on both backends.
        self.node_id = new_boot_id().replace("boot_", "node_")
        self.opened_at = clock.time()
        # Called (synchronously, on the loop) with the jobs each committed ingest batch created.
        self.on_commit = on_commit
        self._writer: sqlite3.Connection | None = None  # used only on self._thread
        self._thread: _OwnThread | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: _OwnThread | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None  # used only on its own thread
        self._checkpointing: asyncio.Future[Any] | None = None
        self._last_checkpoint = 0.0
        # Set when a background checkpoint ended with frames still uncopied (commits kept coming
        # through all its passes): the writer then copies them itself, before its next batch,
        # so SQLite can start the WAL over.
        self._checkpoint_tail = False
        self._vacuum_pages = VACUUM_PAGES_MAX  # what an incremental vacuum takes (vacuum_pages)
        # A full disk fails every commit, and any sender causes commits: ten lines a minute.
        self._log_write_failed = Throttle(
            log, logging.ERROR, "journal write failures", clock=clock.monotonic
        )
        # Background checkpoints done, and WAL frames they copied into the main file.
        self.checkpoints = 0
        self.checkpointed_frames = 0
        self._queue = OpQueue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_write_error: str | None = None
        # The failure the "writes succeed again" line will name, and the timer that writes it
        # once commits have gone through for WRITES_BACK_AFTER_S with none failing.
        self._failure_ended: str | None = None
        self._writes_back_line: asyncio.TimerHandle | None = None
        # Why the writer stopped, when it stopped without close() asking it to.
        self.writer_problem: str | None = None
        # Why the last failed batch could not be written, when SQLite's error hides it.
        self._read_only: str | None = None
        self.wal_kept = None
        # What the path named at open, and the save once it names something else (``Saving``).
        self._opened_as: FileIds | None = None
        self._refusing: str | None = None
        self._saving: asyncio.Task[str] | None = None
        self._saving_said = False
        self._save_last = False
        self._save_wake: asyncio.Event | None = None
        self.save_tries = 0
        self.commits = 0
        self.batched_ops = 0
        # Jobs queued or running, kept in step by this process's writes and re-counted when
        # another process has written (``refresh_backlog_if_changed``, every sweep) and at every
        # retention round. The receiver's backpressure reads it.
        self.backlog_jobs = 0
        # The writer connection's ``data_version`` at the last count.
        self._data_version = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self.path.is_dir():
            raise JournalError(f"cannot open journal {self.path}: it is a folder, not a file")
        left = interrupted_restores(self.path)
        if left:
            # Opened as it is, the journal may be an empty new one or lack its last commits.
            raise JournalError(
                f"cannot open journal {self.path}: a restore stopped while putting a backup"
                f" in place ({left[0].name} is that backup, checked): run `webhookd restore`"
                " with the backup again (what it replaced was moved aside, never deleted)"
            )
        if await asyncio.to_thread(_foreign_file, self.path):  # its schema would be made in it
            raise JournalError(not_a_journal(self.path))
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if _owner_only(self.path) and self.serving:
                # After an unexpected restart, the line that tells a new journal was begun.
                log.info("journal %s: created (no journal at that path)", self.path)
            if self.serving:
                self._lock_fd = _take_serve_lock(self.path)
                if (said := copied_to(self.path)) is not None:  # a copy ended as serve began
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    raise JournalError(
                        f"journal {self.path} was {said}, and its jobs run there: serve the"
                        f" nodes' config (journal.url); delete {copied_marker(self.path)} to"
                        " serve this file all the same"
                    )
        except OSError as exc:
            raise JournalError(
                f"cannot open journal {self.path}: {exc.strerror or exc.__class__.__name__}"
                f"{_other_file(exc, self.path)}{_why_not(self.path)}"
            ) from None
        if self.serving and (short := await asyncio.to_thread(short_of_room, self.path)):
            log.warning("journal %s: %s", self.path, short)
        if self.serving and (theirs := someone_elses(self.path)):
            log.warning("journal %s: %s", self.path, theirs)
        # Asked before this process opens the journal: once it has, closing the descriptor the
        # question needs would drop SQLite's own locks on the -shm file (``opened_elsewhere``).
        self._held_elsewhere = opened_elsewhere(self.path)
        self._thread = _OwnThread("webhookd-journal")
        self._queue = OpQueue()
        self.opened_at = self.clock.time()
        try:
            self._writer = await self._in_thread(self._open_writer)
            self._reader = await self._connect()
            self._checkpointer = _OwnThread("webhookd-checkpoint")
            self._checkpoint_conn = await self._checkpointer.submit(self._open_checkpointer)
            # Reads, in the try too: a page that reads back as garbage fails them, and a reader
            # left open keeps its (non-daemon) thread, so the process, alive after its error.
            self._data_version = await self._in_thread(_data_version, self._writer)
            self.backlog_jobs = await self.backlog()
        except sqlite3.Error as exc:
            await self._close_connections()
            raise JournalError(
                f"cannot open journal {self.path}: {exc}{_why_not(self.path)}"
            ) from exc
        except BaseException:
            await self._close_connections()
            raise
        try:
            self._opened_as = FileIds.of(self.path)
        except OSError:  # gone already: nothing to compare with, so nothing watched
            self._opened_as = None
        self._refusing = None
        self._saving, self._saving_said = None, False
        self._save_last, self._save_wake, self.save_tries = False, None, 0
        self._last_checkpoint = self.clock.monotonic()
        self._closing = False
        self.writer_problem = None
        self.wal_kept = None
        self._task = asyncio.create_task(self._write_loop(), name="journal-writer")
        self._task.add_done_callback(self._writer_ended)

    async def close(self) -> None:
        """Flush what is queued, checkpoint the WAL into the main file (the daemon's journal),
        close.

        Bounded: a writer that does not finish within ``CLOSE_TIMEOUT_S`` is cancelled (what it
        still held fails with ``JournalUnavailable``), and the threads are told to close their
        connections without being waited on past that, so a stuck disk cannot stop an exit.

        A journal whose file was removed or replaced while open (``watch``) and not saved yet
        gets one last copy, not the wait for the next try, and ``JournalError`` says where its
        contents went, or that they are lost (``_last_save``).
        """
        self._closing = True
        if self._writes_back_line is not None:  # the last commits went through
            self._say_writes_again()
        self._log_write_failed.flush()
        said: str | None = None
        failed: str | None = None
        try:
            task, self._task = self._task, None
            if self.serving and task is not None:
                # Removed or replaced since the watch last looked (once a second): a stop
                # right after would checkpoint into a file nothing names and exit 0. (A -shm
                # removed now needs nothing: the next start makes one.)
                self._save_if_moved(task, stopping=True)
            if task is not None and not task.done():
                self._queue.close()
                await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
                if not task.done():
                    log.error("journal writer did not finish within %gs; closing", CLOSE_TIMEOUT_S)
                    task.cancel()
                    await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if self._checkpointing is not None:
                await asyncio.wait({self._checkpointing}, timeout=CLOSE_TIMEOUT_S)
            # Before the connections close: the copy is read through the writer's.
            said = await self._last_save()
            # Only the daemon's: TRUNCATE holds the write lock while it waits for readers, so a
            # CLI command's close would hold up the running daemon's commits behind a long read.
            if self.serving and task is not None and task.done() and self.writer_problem is None:
                failed = await self._final_checkpoint()
        finally:
            await self._close_connections()
        if failed is not None:
            self._say_wal_kept(failed)
        if said is not None:
            raise JournalError(said)

    async def _final_checkpoint(self) -> str | None:
        """The daemon's last checkpoint: the whole WAL copied into the main file, and emptied.
        Why it failed, if it did (a full disk)."""
        assert self._thread is not None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._thread.submit(self._truncate_wal)
        except TimeoutError:
            return f"it did not finish within {CLOSE_TIMEOUT_S:g}s"
        except (sqlite3.Error, _Busy) as exc:
            return str(exc)
        return None

    def _truncate_wal(self) -> None:
        try:
            row = self._require_writer().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            # As a failed write's error says it (``_write_error``): SQLite's "disk I/O error"
            # hides a file system the kernel turned read-only.
            if why := self._read_only_cause([exc]):
                raise sqlite3.OperationalError(f"{exc}: {why}") from exc
            raise
        if row is not None and row[0]:
            # Not an error to SQLite: a reader's snapshot (events --follow, a backup) held
            # frames the checkpoint could not copy, and the WAL stays.
            raise _Busy("another process was reading the journal")

    def _say_wal_kept(self, why: str) -> None:
        """Once closed after a last checkpoint that failed: the WAL left beside the journal, if
        it was (the writer's close checkpoints too, as the last connection, and may yet have
        copied it). SQLite reads it back at the next open, whole: its commits are not lost."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            size = wal.stat().st_size
        except OSError:
            return
        if size:
            self.wal_kept = why
            log.warning(
                "journal %s: the last checkpoint failed (%s): its WAL (%.1f MB) is kept,"
                " and replayed at the next start",
                self.path,
                why,
                size / 1e6,
            )

    def _checkpoint_quietly(self, sql: str) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._require_writer().execute(sql)

    async def _close_connections(self) -> None:
        reader, self._reader = self._reader, None
        writer, self._writer = self._writer, None
        thread, self._thread = self._thread, None
        checkpointer, self._checkpointer = self._checkpointer, None
        checkpoint_conn, self._checkpoint_conn = self._checkpoint_conn, None
        if checkpointer is not None:
            if checkpoint_conn is not None:
                closed = checkpointer.submit(checkpoint_conn.close)
                await asyncio.wait({closed}, timeout=CLOSE_TIMEOUT_S)
            checkpointer.shutdown()
        if reader is not None:
            # stop() queues "close, then end the thread" behind whatever the thread is doing;
            # unlike close() it needs no answer, so a stuck read cannot hold us here.
            stopped = reader.stop()
            if stopped is not None:
                await asyncio.wait({stopped}, timeout=CLOSE_TIMEOUT_S)
        if thread is not None:
            if writer is not None:
                await asyncio.wait({thread.submit(writer.close)}, timeout=CLOSE_TIMEOUT_S)
            thread.shutdown()
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:  # last, after the connections: the next daemon may start
            os.close(lock_fd)

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        async with conn.execute("PRAGMA page_count") as cursor:
            row = await cursor.fetchone()
        for pragma in (_NEW_FILE_PRAGMA, *_PRAGMAS) if row and not row[0] else _PRAGMAS:
            await conn.execute(pragma)
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        # check_same_thread stays on: only the writer's thread ever uses this connection.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            new = not conn.execute("PRAGMA page_count").fetchone()[0]
            for pragma in (_NEW_FILE_PRAGMA, *_PRAGMAS) if new else _PRAGMAS:
                conn.execute(pragma)
            conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
            add_functions(conn)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_checkpointer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # A read now opens the -wal and -shm it checkpoints through, while the path names them:
        # a connection whose first read came after the file was removed (``moved``) would
        # fail each checkpoint with "disk I/O error" until the daemon saw it.
        conn.execute("PRAGMA schema_version").fetchone()
        return conn

    def _checkpoint(self) -> tuple[int, bool]:
        """On the checkpointer's thread: ``checkpoint_passes`` on its own connection."""
        assert self._checkpoint_conn is not None
        return checkpoint_passes(self._checkpoint_conn)

    def _maybe_checkpoint(self) -> None:
        """After a commit: start a background checkpoint if none runs and the last is old."""
        if self._checkpointing is not None or self._checkpointer is None:
            return
        now = self.clock.monotonic()
        if now - self._last_checkpoint < CHECKPOINT_EVERY_S:
            return
        self._last_checkpoint = now
        self._checkpointing = self._checkpointer.submit(self._checkpoint)
        self._checkpointing.add_done_callback(self._checkpointed)

    async def wait_checkpoint(self) -> None:
        """Wait for the background checkpoint running now, if any (tests, close)."""
        if self._checkpointing is not None:
            await asyncio.wait({self._checkpointing})

    def _checkpointed(self, done: asyncio.Future[tuple[int, bool]]) -> None:
        self._checkpointing = None
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:  # the writer's own automatic checkpoint is the backstop
            log.warning("background WAL checkpoint failed: %s", _describe(exc))
            return
        frames, whole = done.result()
        # Frames committed after the last pass are left for the writer to copy before its next
        # batch (a few, but that batch waits for them and an fsync of the main file).
        self._checkpoint_tail = not whole
        self.checkpoints += 1
        self.checkpointed_frames += max(frames, 0)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise JournalNewer(
                f"{self.path} has schema version {version}, newer than this webhookd"
                f" understands ({len(MIGRATIONS)}): run the newer webhookd, or `webhookd"
                " restore` a backup you took before the upgrade"
            )
        if version == len(MIGRATIONS):
            return
        if version > 0 and (holder := self._held_elsewhere) is not None:
            said = who_holds(holder, "a daemon of the older webhookd?")
            raise JournalError(
                f"{self.path} has schema version {version}, this webhookd's is"
                f" {len(MIGRATIONS)}, and {holder} has it open ({said}): stop it before this"
                " webhookd upgrades the journal"
            )
        if not self.serving and version > 0:
            # Only a daemon upgrades: a verb would change the tables under a daemon of the
            # older webhookd, or bring a restored backup forward before the way back is taken.
            raise JournalError(
                f"{self.path} has schema version {version}, this webhookd's is"
                f" {len(MIGRATIONS)}: start `webhookd serve` of this webhookd on it (it upgrades"
                " the journal as it starts), then run this again"
            )
        self._upgrade(conn, version)

    def _upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        with migrating(self.location, version, len(MIGRATIONS)):
            for target in range(version, len(MIGRATIONS)):

                def step(conn: sqlite3.Connection, target: int = target) -> None:
                    # executescript would commit our transaction; run statement by statement
                    # (a trigger's body holds semicolons of its own).
                    statement = ""
                    for part in MIGRATIONS[target].split(";"):
                        statement += part + ";"
                        if sqlite3.complete_statement(statement):
                            if statement.strip(" \n;"):
                                conn.execute(statement)
                            statement = ""
                    conn.execute(f"PRAGMA user_version = {target + 1}")

                _transaction(conn, step)

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise JournalError("journal is not open")
        return self._reader

    # -- intake, dispatch, outcomes -----------------------------------------------------------

    async def ingest(self, item: NewEvent) -> Ingested:
        """Journal an event and its jobs; returns once committed (or raises JournalUnavailable)."""
        return await self.submit_ingest(item)

    @property
    def queued_body_bytes(self) -> int:
        return self._queue.body_bytes

    @property
    def queued_ingests(self) -> int:
        return self._queue.ingests

    def submit_ingest(self, item: NewEvent) -> asyncio.Future[Ingested]:
        """Queue an event for the next group commit; the future resolves once it is committed.

        The write happens whether or not anyone still waits: cancelling the future only stops
        the waiting. Raises ``JournalUnavailable`` at once when the writer is not running.
        """
        future: asyncio.Future[Ingested] = self._new_future()
        self._enqueue(IngestOp(future, item))
        return future

    async def claim(self, job_ids: Sequence[str], boot_id: str) -> list[Claimed]:
        """Mark queued jobs running (one more attempt each); returns those actually claimed."""
        op = ClaimOp(self._new_future(), list(job_ids), boot_id, self.clock.time())
        result: CapClaim = await self._submit(op)
        return result.claimed

    async def claim_capped(
        self, job_ids: Sequence[str], boot_id: str, caps: Mapping[str, Sequence[Cap]]
    ) -> CapClaim:
        """``claim`` within caps counted over every process on this file (see BaseJournal)."""
        op = ClaimOp(self._new_future(), list(job_ids), boot_id, self.clock.time(), caps)
        result: CapClaim = await self._submit(op)
        return result

    async def finish(self, results: Sequence[Finished]) -> Recorded:
        """Record attempts' outcomes (batched with whatever else is being committed)."""
        if not results:
            return Recorded()
        cancelled: frozenset[str] = await self._submit(FinishOp(self._new_future(), list(results)))
        return Recorded(cancelled)

    async def unclaim(self, job_ids: Sequence[str], cut: Sequence[Finished] = ()) -> None:
        now = self.clock.time()
        # A cut attempt's result (an openai answer) is kept as a failed attempt's is.
        kept = {f.job_id: dump(f.result) for f in cut if f.result is not None}

        def fn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO attempts(job_id, n, started_at, finished_at, outcome, error, detail)"
                " SELECT ?, ?, ?, ?, ?, ?, ?"
                " WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state = 'running')",
                [(*row, row[0]) for row in (attempt_row(f) for f in cut if f.job_id in job_ids)],
            )
            # Named, not numbered (?1): Python 3.12.0-3.12.3 warn of numbered ones bound by
            # position, and 3.14 was to refuse them.
            conn.executemany(
                f"UPDATE jobs SET {_BACK_TO_QUEUE}, attempts = MAX(attempts - 1, 0),"
                " run_at = :now, boot_id = NULL, result = COALESCE(:result, result)"
                " WHERE id = :id AND state = 'running'",
                [{"now": now, "id": job_id, "result": kept.get(job_id)} for job_id in job_ids],
            )

        if job_ids:
            await self._call(fn)

    async def recover(self, boot_id: str, max_recoveries: int) -> Recovery:
        """Re-queue jobs an earlier boot left ``running``; poison pills go to ``dead``."""
        now = self.clock.time()

        def fn(conn: sqlite3.Connection) -> Recovery:
            rows = fetch_rows(
                conn,
                "SELECT id, attempts, recoveries, claimed_at, source, action, event_id,"
                " cancel_requested_at FROM jobs"
                " WHERE state = 'running' AND (boot_id IS NULL OR boot_id != ?)",
                (boot_id,),
            )
            requeue, dead, attempts, poisoned = [], [], [], []
            cancelled = 0
            for r in rows:
                started = r["claimed_at"] or now
                # Cancelled while it ran: no poison pill, and "re-queued" into cancelled.
                marked = r["cancel_requested_at"] is not None
                if not marked and r["recoveries"] + 1 >= max_recoveries:
                    reason = (
                        f"poison pill: interrupted by a crash or restart "
                        f"{r['recoveries'] + 1} times"
                    )
                    dead.append((now, reason, now, r["id"]))
                    poisoned.append(Poisoned(r["source"], r["action"], r["event_id"]))
                    attempts.append((r["id"], r["attempts"], started, now, "interrupted", reason))
                else:
                    cancelled += marked
                    requeue.append({"now": now, "id": r["id"]})
                    attempts.append(
                        (
                            r["id"],
                            r["attempts"],
                            started,
                            now,
                            "interrupted",
                            "interrupted by a crash or restart",
                        )
                    )
            conn.executemany(
                f"UPDATE jobs SET {_BACK_TO_QUEUE}, recoveries = recoveries + 1, run_at = :now,"
                " boot_id = NULL WHERE id = :id",
                requeue,
            )
            conn.executemany(
                "UPDATE jobs SET state = 'dead', recoveries = recoveries + 1, run_at = ?,"
                " last_error = ?, finished_at = ?, boot_id = NULL, cancel_requested_at = NULL"
                " WHERE id = ?",
                dead,
            )
            conn.executemany(
                "INSERT INTO attempts(job_id, n, started_at, finished_at, outcome, error)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                attempts,
            )
            return Recovery(len(requeue) - cancelled, tuple(poisoned), cancelled)

        return await self._call(fn)  # type: ignore[no-any-return]

    async def refresh_backlog(self) -> int:
        try:
            self.backlog_jobs = await self.backlog()
        except JournalError as exc:  # a failed count pauses the dispatcher, its sweep reads it
            raise JournalUnavailable(str(exc)) from exc
        return self.backlog_jobs

    async def refresh_backlog_if_changed(self) -> None:
        # ``data_version`` on the writer's connection moves only when another connection has
        # committed: another process (this one writes through that connection alone), or a
        # TRUNCATE checkpoint at a close, which costs one needless count.
        version = await self._call(_data_version, transaction=False)
        if version != self._data_version:
            self._data_version = version
            await self.refresh_backlog()

    async def storage_bytes(self) -> int:
        return await self.size_bytes()
