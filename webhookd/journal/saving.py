"""The SQLite journal's file removed or replaced while open (``Saving``, a layer of
``Journal`` over its ``Writer``): noticed by ``watch``, every write refused from then on, the
contents copied out through the writer's own connection (``moved``), then the daemon exits.

A copy that fails (no room) is tried again every ``SAVE_RETRY_S`` with the daemon still up:
its exit would take the only holder of the contents with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from webhookd.errors import JournalError
from webhookd.journal.batch import CallOp
from webhookd.journal.moved import (
    SHM,
    WAL,
    FileIds,
    Saved,
    checkpoint_open,
    lost_line,
    moved,
    own_moved,
    save_open,
    saved_line,
    shm_line,
    what_happened,
)
from webhookd.journal.writer import Writer

log = logging.getLogger("webhookd.journal")

# How often the daemon's journal checks that its path still names the file it has open (one
# ``stat``, beside the writer: never on the ack path).
PATH_CHECK_S = 1.0
# How long the daemon waits before it tries again to save a journal removed or replaced while
# open, when the copy failed (no room, a folder it may not write to): the contents are held
# only by this process, so it keeps them, refusing every write, until the operator has made
# room or mended the folder. Each try is one copy (``moved.save_open``).
SAVE_RETRY_S = 5.0


class Saving(Writer):
    """The save of a journal whose path no longer names the file open.

    What the path named at open (``_opened_as``), and, once it names something else, why every
    write is refused (``_refusing``) and the task saving the file's contents (``_saving``, its
    answer: the line to exit with), trying again every SAVE_RETRY_S while the copy fails.
    ``_save_last``: close() asked, so the next try is the last; ``_save_wake`` ends the wait
    before the next at once.
    """

    _opened_as: FileIds | None
    _saving: asyncio.Task[str] | None
    _saving_said: bool
    _save_last: bool
    _save_wake: asyncio.Event | None
    save_tries: int  # copies tried since the path was seen changed (tests, the lines)

    async def _last_save(self) -> str | None:
        """The line to exit with, when the contents were being saved and the watch, cancelled
        by a stop, has not said it: the try running now ends, then at most one more is made
        (none once one has succeeded), never the wait for the next one."""
        saving = self._saving
        if saving is None or self._saving_said:
            return None
        self._saving_said = True
        self._save_last = True
        if self._save_wake is not None:
            self._save_wake.set()
        return await saving

    async def watch(self) -> None:
        """Wait for as long as the writer runs; raise ``JournalError`` if it stops unasked, or
        once the journal's path no longer names the file open (``moved``) and its contents
        have been saved, or its ``-wal`` was removed (``own_moved``) and has been checkpointed
        into the file, or its ``-shm`` was and what was queued is written.

        The daemon runs this beside its other long-lived tasks: a dead writer means a daemon
        that can neither take nor finish anything, and it must exit rather than half live.
        A file removed or replaced while open takes every commit with it at the exit, so
        from the moment that is seen nothing more is acknowledged or claimed, what the file
        holds is written back out (``_save``), and the daemon exits non-zero with one line
        saying where it went: the next start opens it and runs again what was running. While
        the copy fails (no room), it is tried again every ``SAVE_RETRY_S``, and the daemon
        stays up, refusing writes, for as long as that lasts: its exit would lose the file.
        """
        task = self._task
        if task is None:
            raise JournalError("journal is not open")
        while not task.done():
            # Cancelling the watch leaves the writer alone.
            await asyncio.wait({task}, timeout=PATH_CHECK_S)
            self._save_if_moved(task)
            if self._saving is not None:
                said = await asyncio.shield(self._saving)
                self._saving_said = True
                raise JournalError(said)
        if not self._closing:
            raise JournalError(self.writer_problem or "journal writer stopped")

    def _save_if_moved(self, task: asyncio.Task[None], *, stopping: bool = False) -> None:
        """``_save`` the contents once the path no longer names the file opened, if no save
        has begun and the writer (``task``) still runs: the watch's look, and the close's
        (``stopping``), which leaves a ``-shm`` removed alone be."""
        opened = self._opened_as
        if (
            self._saving is None
            and opened is not None
            and not task.done()
            and (
                how := moved(self.path, opened)
                or _own(WAL, own_moved(opened, WAL))
                or (None if stopping else _own(SHM, own_moved(opened, SHM)))
            )
            is not None
        ):
            self._save(how)

    def _save(self, how: str) -> None:
        """The path names another file, or none (``how``): refuse every write from now on
        (intake answers 503, ``/readyz`` says why), and, once the writer has done what it was
        given before, copy the file it has open (``moved.save_open``) on its thread; ``_saves``
        tries again while that fails."""
        self._refusing = what_happened(self.path, how)
        saving = "" if how.startswith(SHM) else ", saving its contents"
        self.writer_problem = f"{self._refusing}: writes refused{saving}, then exiting"
        self._save_last, self._save_wake, self.save_tries = False, asyncio.Event(), 0
        # Behind every write acknowledged or claimed until now; the copy is not in its batch, so
        # those writes are answered as they commit, not once the copy (seconds) is done.
        flushed = CallOp(self._new_future(), _nothing, transaction=False)
        self._queue.put(flushed)
        self._saving = asyncio.create_task(self._saves(how, flushed.future), name="journal-save")

    async def _saves(self, how: str, flushed: asyncio.Future[None]) -> str:
        """The line the daemon exits with, once a copy is written, or once the last try
        close() asks for has failed. Until then each failure waits ``SAVE_RETRY_S`` (or for
        close()) and the copy is tried again on the writer's thread: nothing else writes."""
        what = what_happened(self.path, how)
        opened, at = self._opened_as, self.clock.time()
        assert opened is not None

        def save(conn: sqlite3.Connection) -> Saved | str:
            # Never raises: a failure is the line's to tell.
            try:
                if how.startswith(WAL):  # the file is still the journal's: the -wal goes in it
                    return checkpoint_open(conn, self.path)
                return save_open(conn, self.path, opened, at)
            except (OSError, sqlite3.Error) as exc:
                return _said(exc)

        with contextlib.suppress(JournalError):  # the writer stopped first: its thread copies
            await flushed
        if how.startswith(SHM):  # nothing to copy: the files the path names hold everything
            return shm_line(what)
        said = set[str]()
        while True:
            last = self._save_last  # asked before this try began: the try is the last
            thread, writer = self._thread, self._writer
            if thread is None or writer is None:  # closed under it (a close() cancelled)
                return lost_line(what, how, "the journal was closed first", self.save_tries)
            saved = await thread.submit(save, writer)
            self.save_tries += 1
            if isinstance(saved, Saved):
                return saved_line(what, how, saved, self.path)
            if last:
                return lost_line(what, how, saved, self.save_tries)
            self._save_failed(what, saved, said)
            wake = self._save_wake
            assert wake is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAVE_RETRY_S):
                    await wake.wait()
            wake.clear()

    def _save_failed(self, what: str, why: str, said: set[str]) -> None:
        """A copy failed and will be tried again: ``/readyz`` and the systemd status say why
        from now on; the log says it once, and each other reason once (``said``: those told),
        so that a disk nearly full failing one way then another is not a line a try."""
        folder, every = self.path.parent, f"{SAVE_RETRY_S:g}s"
        self.writer_problem = (
            f"{what}: writes refused; saving its contents failed ({why}), trying again every"
            f" {every}: free space or make {folder} writable; they are lost if this process ends"
            " first"
        )
        if not said:
            log.error(
                "%s, and saving its contents failed (%s): trying again every %s, every write"
                " refused meanwhile; free space on its file system or make %s writable, as the"
                " error calls for. The contents (every acknowledged webhook) are held only by"
                " this process: they are lost if it ends before a copy succeeds",
                what,
                why,
                every,
                folder,
            )
        elif why not in said:
            log.warning("%s: saving its contents still fails, now with: %s", what, why)
        else:
            log.debug("%s: saving its contents failed again (%s)", what, why)
        said.add(why)


def _own(suffix: str, how: str | None) -> str | None:
    """``own_moved``'s answer as a ``how`` of its own: ``-wal removed``, ``-shm replaced``."""
    return None if how is None else f"{suffix} {how}"


def _nothing(conn: sqlite3.Connection) -> None:
    """A call that writes nothing: its answer says the writes queued before it are done."""


def _said(exc: OSError | sqlite3.Error) -> str:
    """An error saving a copy: the system's words and the file, or SQLite's."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)
