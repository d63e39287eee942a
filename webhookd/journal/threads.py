"""The SQLite journal's threads: each owns one connection, and one of them runs checkpoints.

The writer and the background checkpointer each run on a thread of their own (``_OwnThread``),
off the event loop; ``checkpoint_passes`` is what the checkpointer runs, every
``CHECKPOINT_EVERY_S`` while there are commits.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from webhookd.threads import settle

# The writer's own automatic checkpoint, a backstop only (pages of WAL, ~40 MB): the background
# checkpointer copies the WAL back every CHECKPOINT_EVERY_S while there are commits.
WRITER_AUTOCHECKPOINT_PAGES = 10_000
CHECKPOINT_EVERY_S = 0.5
# Passes one background checkpoint may make: the first copies what 0.5 s of commits wrote, each
# later one only what was committed while the one before ran (a few pages), until none is left.
CHECKPOINT_PASSES = 4
_T = TypeVar("_T")


class _OwnThread:
    """One thread that owns a connection (the writer's, the checkpointer's) and runs what it is
    handed, in order.

    ``submit`` answers with an asyncio future settled through one ``call_soon_threadsafe``: the
    writer hands every batch over this way, and ``run_in_executor`` on a one-thread pool cost a
    ``concurrent.futures.Future``, its chained asyncio future and their callbacks per batch on
    top of that. The thread is a daemon: ``close()`` flushes and waits for it (bounded), so a
    thread stuck in I/O is left behind rather than holding up the exit.
    """

    def __init__(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any] | None]
        self._work = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        future: asyncio.Future[_T] = self._loop.create_future()
        self._work.put((fn, args, future))
        return future

    def shutdown(self) -> None:
        """End the thread once it has run what it was handed."""
        self._work.put(None)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            fn, args, future = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the waiter, like an executor would
                result, error = None, exc
            try:
                self._loop.call_soon_threadsafe(settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def checkpoint_passes(conn: sqlite3.Connection) -> tuple[int, bool]:
    """Copy what no reader still needs from the WAL back into the main file, in up to
    ``CHECKPOINT_PASSES`` passes; returns the frames copied and whether the whole WAL was (so
    the writer can start it over).

    PASSIVE never waits for the writer or readers; the writer goes on appending to the WAL
    meanwhile, and restarts it from the top once a checkpoint has copied all of it. Under a
    steady stream of commits the first pass never ends with the whole WAL copied, so short
    follow-up passes copy what came in meanwhile, here and not in the writer's next batch,
    where it would hold up that batch's acks (its fsync of the main file took 4 ms at the
    median, 20 ms at worst, at 1,000 webhooks/s).
    """
    copied = 0
    for _ in range(CHECKPOINT_PASSES):
        busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        copied = max(copied, int(done))
        if busy or int(done) >= int(log_frames):
            return copied, not busy
    return copied, False


class _Busy(Exception):
    """A checkpoint SQLite could not finish for a reader, which it reports as a result."""
