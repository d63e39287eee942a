"""A PostgreSQL journal's life as a node: its heartbeat (the lease on every job it runs), the
recovery of silent nodes' jobs, and the wake-ups between nodes (LISTEN on a connection of its
own, NOTIFY after commits that made jobs ready or freed a cap's slot, and after a pause or
resume)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from webhookd.clock import Clock
from webhookd.errors import JournalUnavailable
from webhookd.journal.postgres.db import DB_ERRORS
from webhookd.journal.postgres.writes import write_recovery
from webhookd.journal.records import Recovery

log = logging.getLogger("webhookd.journal")

CHANNEL = "webhookd_jobs"
PAUSE_CHANNEL = "webhookd_paused"  # a source was paused or resumed (payload: its name)
NOTIFY_EVERY_S = 0.1
LISTEN_CHECK_S = 5.0  # how often an idle listener proves its connection is alive
RECONNECT_MAX_S = 5.0
_T = TypeVar("_T")


class PgNodes:
    """The node half of ``PostgresJournal`` (a mixin: the journal supplies the pool and writes)."""

    url: str
    clock: Clock
    node_id: str
    lease_s: float
    max_recoveries: int
    heartbeat_s: float
    last_write_error: str | None
    backlog_jobs: int
    listening: asyncio.Event
    on_remote_jobs: Callable[[], None] | None
    on_pause_change: Callable[[], None] | None
    _notify_wanted: asyncio.Event

    @property
    def pool(self) -> Any:
        raise NotImplementedError

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        raise NotImplementedError

    async def release_doubtful(self) -> int:
        raise NotImplementedError

    async def record_pending(self) -> int:
        raise NotImplementedError

    async def heartbeat(self) -> None:
        """Renew this node's lease on the jobs it runs. Being a write, it also tells /readyz
        whether the database takes writes when no webhook is arriving."""
        now = self.clock.time()
        try:
            await self.pool.execute(
                "INSERT INTO nodes (node_id, started_at, heartbeat_at) VALUES ($1, $2, $2)"
                " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
                self.node_id,
                now,
            )
        except DB_ERRORS as exc:
            self.last_write_error = str(exc) or type(exc).__name__
            raise JournalUnavailable(f"journal heartbeat failed: {exc}") from exc
        self.last_write_error = None

    async def recover_lost(self) -> Recovery:
        """Re-queue the running jobs of nodes silent past ``lease_s``; forget long-gone nodes."""
        now = self.clock.time()

        async def fn(conn: Any) -> Recovery:
            recovery = await write_recovery(conn, now, self.lease_s, self.max_recoveries)
            await conn.execute(
                "DELETE FROM nodes WHERE heartbeat_at < $1 AND NOT EXISTS (SELECT 1 FROM jobs j"
                " WHERE j.state = 'running' AND j.node_id = nodes.node_id)",
                now - 10 * self.lease_s,
            )
            return recovery

        return await self._write(fn)

    async def _lease_loop(self) -> None:
        """Heartbeat, and take over the jobs of silent nodes. A database outage is survived:
        the next round tries again (and this node's own jobs are re-queued by the others if it
        stays cut off past its lease)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
                await self.release_doubtful()
                await self.record_pending()
                recovered = await self.recover_lost()
            except JournalUnavailable as exc:
                log.warning("%s", exc)
                continue
            if recovered.requeued and self.on_remote_jobs is not None:
                self.on_remote_jobs()
            if recovered.requeued or recovered.dead:
                log.warning(
                    "re-queued %d job(s) of silent node(s); %d poison pill(s) sent to dead",
                    recovered.requeued,
                    recovered.dead,
                )
                self.backlog_jobs -= recovered.dead

    async def _listen_loop(self) -> None:
        """LISTEN on a connection of its own; reconnect when it is lost, looking at once."""
        delay_s = 0.1
        while True:
            try:
                conn = await asyncpg.connect(
                    self.url,
                    timeout=10,
                    server_settings={"application_name": "webhookd-listen"},
                )
            except DB_ERRORS as exc:
                log.debug("journal listener cannot connect: %s", exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
                continue
            delay_s = 0.1
            try:
                await self._listen_on(conn)
            except DB_ERRORS as exc:
                log.debug("journal listener lost its connection: %s", exc)
            finally:
                self.listening.clear()
                with contextlib.suppress(*DB_ERRORS):
                    await asyncio.wait_for(conn.close(), 5)

    async def _listen_on(self, conn: Any) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await conn.add_listener(CHANNEL, self._notified)
        await conn.add_listener(PAUSE_CHANNEL, self._pause_notified)
        self.listening.set()
        # What was notified while this was not listening is lost: look now.
        if self.on_remote_jobs is not None:
            self.on_remote_jobs()
        if self.on_pause_change is not None:
            self.on_pause_change()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTEN_CHECK_S)
                return
            # A cut network may never close the socket: prove the connection still answers.
            await asyncio.wait_for(conn.fetchval("SELECT 1"), LISTEN_CHECK_S)

    def _notified(self, _conn: Any, _pid: int, _channel: str, sender: str) -> None:
        if sender != self.node_id and self.on_remote_jobs is not None:
            self.on_remote_jobs()

    def _pause_notified(self, _conn: Any, _pid: int, _channel: str, _source: str) -> None:
        if self.on_pause_change is not None:
            self.on_pause_change()

    async def _notify_loop(self) -> None:
        """Tell idle nodes that jobs were committed: this node runs its own in-process."""
        while True:
            await self._notify_wanted.wait()
            self._notify_wanted.clear()
            try:
                await self.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, self.node_id)
            except DB_ERRORS as exc:
                log.debug("journal notify failed: %s", exc)  # a hint; the sweep finds the jobs
            await asyncio.sleep(NOTIFY_EVERY_S)
