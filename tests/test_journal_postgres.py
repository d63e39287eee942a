"""PostgreSQL-only journal tests: nodes, leases and fencing, the schema version, an outage.

What every backend shares is in test_journal_contract.py; these cover what only a journal shared
by several nodes has.
"""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest
from test_journal_contract import LEASE_S, START, finished, new_event

from webhookd.clock import ManualClock
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal.postgres import PostgresJournal, redact_url
from webhookd.journal.postgres.schema import MIGRATIONS
from webhookd.models import JobState


def node(url: str, clock: ManualClock) -> PostgresJournal:
    # Heartbeats only when the test calls heartbeat(): the clock decides who is silent.
    return PostgresJournal(url, clock=clock, lease_s=LEASE_S, heartbeat_s=3600)


async def test_pg_a_node_that_lost_its_lease_cannot_overwrite_the_new_owner(pg_url: str) -> None:
    """A node silent past lease_s loses its job to another; its late outcome is ignored and the
    new owner's outcome stands."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as slow, node(pg_url, clock) as other:
        item = new_event()
        await slow.ingest(item)
        job_id = item.jobs[0].id
        assert len(await slow.claim([job_id], "boot_slow")) == 1
        clock.advance(LEASE_S + 1)  # slow stalls (a GC pause, a network cut) past its lease
        await other.heartbeat()
        recovery = await other.recover_lost()
        assert (recovery.requeued, recovery.dead) == (1, 0)
        assert len(await other.claim([job_id], "boot_other")) == 1
        await other.finish([finished(job_id, JobState.DONE, "done", attempt=2, result={"by": 2})])
        # slow wakes up and reports its attempt: fenced out by the claim token.
        await slow.finish([finished(job_id, JobState.DEAD, "dead", error="late", result=None)])
        job = (await other.get_event(item.event.id)).jobs[0]
    assert (job.state, job.result, job.attempts) == (JobState.DONE, {"by": 2}, 2)
    assert [a.outcome for a in job.history] == ["interrupted", "done"]


async def test_pg_a_heartbeating_node_keeps_its_jobs_past_lease_s(pg_url: str) -> None:
    """A long job on a live node is not taken away: its heartbeat renews the lease."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as busy, node(pg_url, clock) as other:
        item = new_event()
        await busy.ingest(item)
        await busy.claim([item.jobs[0].id], "boot_busy")
        for _ in range(5):
            clock.advance(LEASE_S / 2)
            await busy.heartbeat()
            recovery = await other.recover_lost()
            assert (recovery.requeued, recovery.dead) == (0, 0)
        assert (await other.get_event(item.event.id)).state == "running"


async def test_pg_unclaim_after_losing_the_lease_changes_nothing(pg_url: str) -> None:
    """A drain's unclaim of a job another node has since claimed leaves that claim alone."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as old, node(pg_url, clock) as new:
        item = new_event()
        await old.ingest(item)
        job_id = item.jobs[0].id
        await old.claim([job_id], "a")
        clock.advance(LEASE_S + 1)
        await new.heartbeat()
        await new.recover_lost()
        await new.claim([job_id], "b")
        await old.unclaim([job_id])
        job = (await new.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.RUNNING, 2)


async def test_pg_schema_version_is_recorded_and_newer_databases_refused(pg_url: str) -> None:
    """The database carries its schema version; one from a newer webhookd is refused clearly."""
    async with node(pg_url, ManualClock(START)):
        pass
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT max(version) FROM webhookd_schema") == len(MIGRATIONS)
        options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
        assert "autovacuum_vacuum_scale_factor=0" in options
        await conn.execute("INSERT INTO webhookd_schema VALUES ($1)", len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    with pytest.raises(JournalError, match="newer"):
        async with node(pg_url, ManualClock(START)):
            pass


async def test_pg_ingest_fails_loudly_when_the_server_goes_away(pg_url: str) -> None:
    """With the database gone an ingest raises JournalUnavailable (the receiver's 503), never
    a false acknowledgement, and /readyz's error is set."""
    async with node(pg_url, ManualClock(START)) as journal:
        await journal.ingest(new_event())
        admin = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")
        try:
            # Refuse new connections and cut the pool's, as a server going down would.
            await admin.execute(
                f'ALTER DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH ALLOW_CONNECTIONS false'
            )
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                pg_url.rsplit("/", 1)[1],
            )
            with pytest.raises(JournalUnavailable):
                await journal.ingest(new_event())
            assert journal.last_write_error
            await admin.execute(
                f'ALTER DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH ALLOW_CONNECTIONS true'
            )
        finally:
            await admin.close()
        # Back: the pool reconnects by itself.
        assert not (await journal.ingest(new_event())).duplicate
        assert journal.last_write_error is None


async def test_pg_cannot_open_an_unreachable_server() -> None:
    """Pointing at a port nothing listens on fails at open with the URL, password hidden."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://user:hunter2@127.0.0.1:{port}/webhookd"
    with pytest.raises(JournalError) as caught:
        async with PostgresJournal(url):
            pass
    assert "hunter2" not in str(caught.value) and "user:***@" in str(caught.value)
    assert redact_url(url) == f"postgresql://user:***@127.0.0.1:{port}/webhookd"


async def test_pg_a_commit_on_one_node_wakes_the_others_at_once(pg_url: str) -> None:
    """A webhook journaled by one node wakes an idle other node (LISTEN/NOTIFY), not its own."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as a, node(pg_url, clock) as b:
        woken = {a: asyncio.Event(), b: asyncio.Event()}
        a.on_remote_jobs, b.on_remote_jobs = woken[a].set, woken[b].set
        await asyncio.wait_for(asyncio.gather(a.listening.wait(), b.listening.wait()), 10)
        for event in woken.values():
            event.clear()  # the look-now of connecting
        await a.ingest(new_event())
        await asyncio.wait_for(woken[b].wait(), 10)
        assert not woken[a].is_set()


async def test_pg_a_pause_or_resume_anywhere_tells_every_listening_node(pg_url: str) -> None:
    """A pause made by one process (the CLI) reaches the other nodes at once, not at their next
    sweep, and so does the resume; a pause that changes nothing tells nobody."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as daemon, node(pg_url, clock) as cli:
        told = asyncio.Event()
        daemon.on_pause_change = told.set
        await asyncio.wait_for(daemon.listening.wait(), 10)
        told.clear()  # the look-now of connecting
        assert await cli.pause("shop") is True
        await asyncio.wait_for(told.wait(), 10)
        told.clear()
        assert await cli.resume("shop") is True
        await asyncio.wait_for(told.wait(), 10)
        told.clear()
        assert await cli.resume("shop") is False
        await cli.ingest(new_event())  # a notification sent after it: this one is heard
        woken = asyncio.Event()
        daemon.on_remote_jobs = woken.set
        await asyncio.wait_for(woken.wait(), 10)
        assert not told.is_set()


async def test_pg_the_listener_reconnects_and_asks_for_a_look_at_once(pg_url: str) -> None:
    """A listener cut off (server restart, network) reconnects by itself and asks the
    dispatcher to look at once, since notifications sent meanwhile are lost; then it hears
    the next one."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as a, node(pg_url, clock) as b:
        woken = asyncio.Event()
        b.on_remote_jobs = woken.set
        await asyncio.wait_for(b.listening.wait(), 10)
        woken.clear()
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'webhookd-listen' AND datname = current_database()"
            )
        finally:
            await admin.close()
        await asyncio.wait_for(woken.wait(), 10)  # reconnected, and asked for a look
        await asyncio.wait_for(b.listening.wait(), 10)
        woken.clear()
        await a.ingest(new_event())
        await asyncio.wait_for(woken.wait(), 10)


async def test_pg_readiness_follows_the_heartbeat_without_traffic(pg_url: str) -> None:
    """With no webhook arriving, the heartbeat's write is what tells /readyz the database is
    gone, and back."""
    async with node(pg_url, ManualClock(START)) as journal:
        name = pg_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            with pytest.raises(JournalUnavailable):
                await journal.heartbeat()
            assert journal.last_write_error
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        finally:
            await admin.close()
        await journal.heartbeat()
        assert journal.last_write_error is None


async def test_pg_an_outcome_kept_back_by_an_outage_is_recorded_once_it_is_over(
    pg_url: str,
) -> None:
    """A job finished while the database is down is not left running forever under its live
    node: the outcome is recorded with the next heartbeat after the database is back."""
    async with node(pg_url, ManualClock(START)) as journal:
        item = new_event()
        await journal.ingest(item)
        job_id = item.jobs[0].id
        await journal.claim([job_id], "b")
        name = pg_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            with pytest.raises(JournalUnavailable):
                await journal.finish([finished(job_id, JobState.DONE, "done")])
            with pytest.raises(JournalUnavailable):
                await journal.record_pending()  # still down: kept for the next round
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        finally:
            await admin.close()
        assert await journal.record_pending() == 1
        job = (await journal.get_event(item.event.id)).jobs[0]
        assert (job.state, [a.outcome for a in job.history]) == (JobState.DONE, ["done"])
        assert await journal.record_pending() == 0


async def test_pg_a_claim_whose_commit_was_in_doubt_is_released_by_its_token(
    pg_url: str,
) -> None:
    """A claim that committed but whose answer was lost (connection dropped) does not leave
    its jobs running forever under a live node: the next heartbeat re-queues them, uncounted."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item = new_event()
        await journal.ingest(item)
        job_id = item.jobs[0].id
        claimed = await journal.claim([job_id], "b")
        # As if the claim's answer never arrived: the journal holds only its token in doubt.
        token = journal._tokens.pop(job_id)
        journal._doubtful.append(token)
        assert claimed and await journal.release_doubtful() == 1
        job = (await journal.get_event(item.event.id)).jobs[0]
        assert (job.state, job.attempts) == (JobState.QUEUED, 0)
        assert await journal.release_doubtful() == 0
