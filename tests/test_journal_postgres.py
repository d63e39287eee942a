"""PostgreSQL-only journal tests: nodes, leases and fencing, the schema version, an outage.

What every backend shares is in test_journal_contract.py; these cover what only a journal shared
by several nodes has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from conftest import (
    DatabaseOutage,
    Running,
    Target,
    fresh_database,
    make_config,
    own_pg_server,
)
from ops_support import accepted, cli, event_state, forward_source
from procs import Procs, config_text, poll
from test_journal_contract import (
    LEASE_S,
    START,
    Store,
    Taker,
    claimed_one,
    finished,
    marked_behind,
    new_event,
)

from webhookd import admin as admin_mod
from webhookd import metrics as metrics_mod
from webhookd.admission import order_cap
from webhookd.clock import ManualClock
from webhookd.errors import JournalError, JournalUnavailable, NotFound
from webhookd.journal import (
    Cancelled,
    Cap,
    CapClaim,
    Claimed,
    Finished,
    NewEvent,
    Poisoned,
    Ready,
    Recorded,
    Recovery,
    Replayed,
    postgres,
)
from webhookd.journal.batch import IngestOp
from webhookd.journal.postgres import REINDEX_EVERY_S, PostgresJournal, db, nodes, redact_url
from webhookd.journal.postgres.db import DB_ERRORS, db_error
from webhookd.journal.postgres.reads import BACKLOG_SQL, READY_IN_LANES_SQL
from webhookd.journal.postgres.schema import MIGRATIONS
from webhookd.journal.postgres.writes import (
    _LOST_COLUMNS,
    PRUNE_SQL,
    write_group,
    write_ingests,
)
from webhookd.limiter import SHARED_LOG_S
from webhookd.models import JobState, LaneSpec, Priority
from webhookd.process import STOP_MARGIN_S
from webhookd.workers import WorkerPool


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


async def test_pg_after_an_outage_a_node_requeues_the_running_jobs_it_no_longer_holds(
    pg_url: str,
) -> None:
    """A primary failed over to a replica that lacked the last commits: a node's outcome
    committed before the crash is gone, its job is running again under the node, which holds
    no claim for it and heartbeats, so nobody ever took it (5 jobs, two minutes, freed only by
    a restart). Once an outage has ended the node re-queues such jobs, and only those: not the
    one it runs, nor one whose claim is being written."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as busy:
        items = [new_event() for _ in range(3)]
        for item in items:
            await busy.ingest(item)
        running, forgotten, claiming = (item.jobs[0].id for item in items)
        assert len(await busy.claim([running, forgotten], "boot_busy")) == 2
        assert len(await busy.claim([claiming], "boot_busy")) == 1  # a claim of its own
        # The outcome of `forgotten` was committed and lost; `claiming`'s claim is in flight.
        del busy._tokens[forgotten]
        busy._claiming.add(busy._tokens.pop(claiming))
        assert (await busy.release_forgotten()).requeued == 0  # no outage: not looked for
        busy.went_down(OSError("connection lost"))
        busy.came_back()
        recovery = await busy.release_forgotten()
        assert (recovery.requeued, recovery.dead) == (1, 0)
        states = {item.jobs[0].id: (await busy.get_event(item.event.id)).jobs[0] for item in items}
        assert {job_id: job.state for job_id, job in states.items()} == {
            running: JobState.RUNNING,
            forgotten: JobState.QUEUED,
            claiming: JobState.RUNNING,
        }
        assert [a.outcome for a in states[forgotten].history] == ["interrupted"]
        # Said as what it was: the node ran on, the database lost the outcome.
        assert states[forgotten].history[0].error == (
            "its outcome was lost as the database failed over (the new primary lacked the commit)"
        )
        assert (await busy.release_forgotten()).requeued == 0  # once per outage


async def test_pg_a_claim_committed_as_forgotten_jobs_are_looked_for_is_not_taken_for_one(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher's claim may commit after ``release_forgotten`` began and before its read
    of the node's running jobs (a pool slow to hand out a connection after an outage): that job
    is the node's, running, and stays so. Made certain here by holding the read until the claim
    has committed."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as busy:
        item = new_event()
        await busy.ingest(item)
        job_id = item.jobs[0].id
        busy.went_down(OSError("connection lost"))  # a blip: forgotten jobs are looked for
        busy.came_back()
        reading, claimed = asyncio.Event(), asyncio.Event()
        write_forgotten = postgres.write_forgotten

        async def after_the_claim(conn: Any, *args: Any) -> Any:
            reading.set()
            await claimed.wait()
            return await write_forgotten(conn, *args)

        monkeypatch.setattr(postgres, "write_forgotten", after_the_claim)

        async def dispatch() -> None:
            await reading.wait()
            assert len(await busy.claim([job_id], "boot_busy")) == 1
            claimed.set()

        recovery, _ = await asyncio.wait_for(
            asyncio.gather(busy.release_forgotten(), dispatch()), 30
        )
        job = (await busy.get_event(item.event.id)).jobs[0]
    assert (recovery.requeued, job.state, job.history) == (0, JobState.RUNNING, ())


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


@contextlib.asynccontextmanager
async def _long_lease_running_a_job(
    pg_url: str, clock: ManualClock
) -> AsyncIterator[tuple[PostgresJournal, PostgresJournal]]:
    """A node of a 30 s lease running a job, and one of 3 s: (long, short)."""
    long = PostgresJournal(pg_url, clock=clock, lease_s=30.0, heartbeat_s=3600)
    short = PostgresJournal(pg_url, clock=clock, lease_s=3.0, heartbeat_s=3600)
    async with long, short:
        item = new_event()
        await long.ingest(item)
        await long.claim([item.jobs[0].id], "boot_long")
        yield long, short


async def test_pg_a_node_with_a_longer_lease_keeps_its_jobs_under_a_leader_with_a_shorter(
    pg_url: str,
) -> None:
    """Nodes whose ``journal.lease_s`` differ (a rolling restart that changes it): each is
    judged by its own lease, which its heartbeat keeps within. The leader's 3 s took a node of
    30 s, heartbeating every 5 s, for lost between beats: its jobs ran twice."""
    clock = ManualClock(START)
    async with _long_lease_running_a_job(pg_url, clock) as (long, short):
        for _ in range(12):  # a minute of beats 5 s apart: past the claim's own lease too
            await long.heartbeat()
            clock.advance(4)  # the leader looks between two of them: 4 s of silence
            await short.heartbeat()
            recovery = await short.recover_lost()
            assert (recovery.requeued, recovery.dead) == (0, 0)
            seen = {n.node_id: n.stale for n in await short.nodes()}
            assert seen == {long.node_id: False, short.node_id: False}
            clock.advance(1)
        clock.advance(31)  # now silent past its own lease: lost
        await short.heartbeat()
        assert {n.node_id: n.stale for n in await short.nodes()}[long.node_id]
        assert (await short.recover_lost()).requeued == 1


async def test_pg_nodes_whose_configs_differ_say_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each node's heartbeat carries a digest of its sources, actions and lanes: a node whose
    digest differs from a live one's says so once (until every node has one file, a job of
    an action one lacks goes dead on it), /stats marks it, and it is said when they agree.
    A stale node is compared with none, in /stats as in the log (it was marked as running
    another config there)."""
    clock = ManualClock(START)
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    async with node(pg_url, clock) as a, node(pg_url, clock) as b:
        a.config_digest, b.config_digest = "one", "two"
        for journal in (a, b):
            await journal.heartbeat()
        assert await a.compare_configs() == {f"{socket.gethostname()} pid {os.getpid()}"}
        await a.compare_configs()  # said once
        assert {n.node_id: n.same_config for n in await a.nodes()} == {
            a.node_id: True,
            b.node_id: False,
        }
        clock.advance(LEASE_S + 1)
        await a.heartbeat()  # b silent past its lease
        assert {n.node_id: (n.stale, n.same_config) for n in await a.nodes()} == {
            a.node_id: (False, True),
            b.node_id: (True, None),
        }
        b.config_digest = "one"  # reloaded with the same file
        await b.heartbeat()
        assert await a.compare_configs() == frozenset()
    said = [r.getMessage() for r in caplog.records if "node" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("node(s) ") and "other than this node's config" in said[0]
    assert said[1] == "every node runs this node's sources, actions and lanes again"


async def test_pg_nodes_lists_every_node_and_marks_a_silent_one_stale(pg_url: str) -> None:
    """Each node's ``/stats`` lists both nodes with their own running jobs; one silent past
    lease_s shows stale, and one that stopped cleanly is gone."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as a:
        async with node(pg_url, clock) as b:
            items = [new_event() for _ in range(3)]
            for item in items:
                await a.ingest(item)
            await a.claim([items[0].jobs[0].id], "boot_a")
            await b.claim([items[1].jobs[0].id, items[2].jobs[0].id], "boot_b")
            for journal in (a, b):
                seen = {n.node_id: n for n in await journal.nodes()}
                assert set(seen) == {a.node_id, b.node_id}
                assert (seen[a.node_id].running, seen[b.node_id].running) == (1, 2)
                assert [n.node_id for n in seen.values() if n.this] == [journal.node_id]
                assert seen[b.node_id].pid == os.getpid() and seen[b.node_id].host
                assert not any(n.stale for n in seen.values())
            clock.advance(LEASE_S + 1)
            await a.heartbeat()  # b falls silent
            seen = {n.node_id: n for n in await a.nodes()}
            assert (seen[a.node_id].stale, seen[b.node_id].stale) == (False, True)
            await b.unclaim([items[1].jobs[0].id, items[2].jobs[0].id])
        assert [n.node_id for n in await a.nodes()] == [a.node_id]


async def test_pg_the_cli_reads_and_writes_the_journal_without_joining_the_cluster(
    pg_url: str,
) -> None:
    """`webhookd stats`/`replay`/`pause` against PostgreSQL never show up as a node, take the
    lead or leave a node row behind."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as daemon:
        item = new_event()
        await daemon.ingest(item)
        async with PostgresJournal(pg_url, clock=clock, lease_s=LEASE_S, node=False) as cli:
            assert await cli.pause("shop")
            assert (await cli.replay([item.event.id]))[item.event.id].requeued == 0
            assert [n.node_id for n in await cli.nodes()] == [daemon.node_id]
            assert not cli.leads()
        assert [n.node_id for n in await daemon.nodes()] == [daemon.node_id]


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


async def test_pg_one_node_leads_and_another_takes_over_once_its_lease_has_passed(
    pg_url: str,
) -> None:
    """Of two nodes only one runs maintenance; when it goes silent (killed, cut off) the other
    takes over after lease_s, not before."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as first, node(pg_url, clock) as second:
        assert (await first.lead(), await second.lead()) == (True, False)
        assert (first.leads(), second.leads()) == (True, False)
        clock.advance(LEASE_S / 2)
        assert (await first.lead(), await second.lead()) == (True, False)  # renewed
        clock.advance(LEASE_S - 1)  # first falls silent: its renewed lease still stands
        assert (await second.lead(), first.leads()) == (False, True)
        clock.advance(2)
        assert not first.leads()  # it never believes it leads past its lease
        assert (await second.lead(), second.leads()) == (True, True)
        assert await first.lead() is False  # back from its pause: the lease is taken


async def test_pg_a_leader_that_stops_cleanly_hands_over_at_once(pg_url: str) -> None:
    """A node stopped with SIGTERM gives up the leader lease: the next node leads without
    waiting for lease_s."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as stays:
        async with node(pg_url, clock) as leaves:
            assert (await leaves.lead(), await stays.lead()) == (True, False)
        assert await stays.lead() is True


async def test_pg_only_the_leader_recovers_a_silent_nodes_jobs(pg_url: str) -> None:
    """A starting node that does not lead leaves lease recovery to the leader; the leader
    re-queues the silent node's job once."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as dead, node(pg_url, clock) as leader:
        item = new_event()
        await dead.ingest(item)
        await dead.claim([item.jobs[0].id], "boot_dead")
        assert await leader.lead()
        clock.advance(LEASE_S / 2)
        assert await leader.lead()  # renewed; the other node stays silent
        clock.advance(LEASE_S / 2 + 1)
        async with node(pg_url, clock) as follower:
            follows = await follower.recover("boot_f", 3)
            leads = await leader.recover("boot_l", 3)
        assert (follows.requeued, leads.requeued) == (0, 1)
        assert (await leader.get_event(item.event.id)).jobs[0].state == JobState.QUEUED


async def test_pg_a_silent_nodes_recovered_jobs_name_it_and_say_it_went_silent(pg_url: str) -> None:
    """A job taken from a node silent past its lease (frozen, cut off) said "interrupted by a
    crash or restart" though its node may never have crashed, and the recovery did not say
    whose jobs it took: its interrupted attempt, its poison pill and the recovery now name the
    node (host, pid, node id) and say that it went silent. A node that stopped leaving a job
    running keeps the crash or restart wording, and the recovery names it as stopped (it was
    named nowhere, nor were jobs copied from SQLite running under no node)."""
    clock = ManualClock(START)
    leader = PostgresJournal(
        pg_url, clock=clock, lease_s=LEASE_S, heartbeat_s=3600, max_recoveries=2
    )
    async with node(pg_url, clock) as silent, leader:
        quiet, left = new_event(), new_event()
        await silent.ingest(quiet)
        await silent.ingest(left)
        await silent.claim([quiet.jobs[0].id], "b")
        async with node(pg_url, clock) as stopped:
            await stopped.claim([left.jobs[0].id], "b")  # its close leaves it running
        clock.advance(LEASE_S + 1)
        await leader.heartbeat()
        recovery = await leader.recover_lost()
        named = f"{socket.gethostname()} pid {os.getpid()} ({silent.node_id})"
        assert (recovery.requeued, recovery.nodes) == (2, (named,))
        assert recovery.named_nodes() == f" {named}"
        gone = f"{socket.gethostname()} pid {os.getpid()} ({stopped.node_id})"
        assert recovery.whose() == f"of silent node(s) {named}, and of stopped node(s) {gone}"
        assert Recovery(2, copied=1, stopped=("node_x",)).whose() == (
            "of stopped node(s) node_x, and 1 left running by the SQLite daemon this journal was"
            " copied from"
        )
        many = Recovery(7, nodes=tuple(f"n{i}" for i in range(7)))
        assert many.named_nodes() == " n0, n1, n2, n3, n4 and 2 more"  # a line's worth

        async def last_error(item: NewEvent) -> str | None:
            return (await leader.get_event(item.event.id)).jobs[0].history[-1].error

        assert await last_error(quiet) == f"its node {named} went silent and its lease passed"
        assert await last_error(left) == "interrupted by a crash or restart"
        await silent.claim([quiet.jobs[0].id], "b")
        clock.advance(LEASE_S + 1)
        await leader.heartbeat()
        recovery = await leader.recover_lost()
        assert (recovery.requeued, recovery.dead, recovery.nodes) == (0, 1, (named,))
        assert await last_error(quiet) == (
            f"poison pill: interrupted 2 times, the last as its node {named} went silent and"
            " its lease passed"
        )


async def test_pg_the_leaders_lease_loop_hands_its_poison_pills_to_on_poisoned(
    pg_url: str,
) -> None:
    """A silent node's job at its last recovery goes to dead in the leader's lease loop, long
    after start (once the leader has been up a whole lease itself): the daemon hears of it
    through ``on_poisoned`` (alerts, dead-letter metric)."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as silent:
        item = new_event()
        await silent.ingest(item)
        await silent.claim([item.jobs[0].id], "boot_silent")
        clock.advance(LEASE_S + 1)
        leader = PostgresJournal(
            pg_url, clock=clock, lease_s=LEASE_S, heartbeat_s=0.01, max_recoveries=1
        )
        heard: asyncio.Future[Sequence[Poisoned]] = asyncio.get_running_loop().create_future()
        leader.on_poisoned = heard.set_result
        async with leader:
            clock.advance(LEASE_S)
            pills = await asyncio.wait_for(heard, 10)
    job = item.jobs[0]
    assert list(pills) == [Poisoned(item.event.source, job.action, item.event.id)]


async def test_pg_writes_ask_for_synchronous_commit_where_the_database_turned_it_off(
    pg_url: str,
) -> None:
    """The journal asks for nothing at connection start that a pooler would refuse; where the
    database's default is ``synchronous_commit = off``, each write transaction turns it on."""
    database = pg_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    finally:
        await admin.close()
    async with node(pg_url, ManualClock(START)) as journal:
        item = new_event()
        await journal.ingest(item)
        assert (await journal.get_event(item.event.id)).event.id == item.event.id
        assert (await journal.fetch("SHOW synchronous_commit"))[0][0] == "off"
        assert await journal._write(lambda conn: conn.fetchval("SHOW synchronous_commit")) == "on"


async def test_pg_a_journal_behind_pgbouncer_in_transaction_mode(pgbouncer_url: str) -> None:
    """Through a real PgBouncer in transaction mode (1.18: no prepared statement outlives its
    transaction, so ``statement_cache_size = 0``): the schema is made, webhooks are journaled
    and deduplicated from many tasks at once, claimed, finished, replayed and counted."""
    clock = ManualClock(START)
    journal = PostgresJournal(
        pgbouncer_url, clock=clock, lease_s=LEASE_S, heartbeat_s=3600, statement_cache_size=0
    )
    async with journal:
        items = [new_event() for _ in range(40)]
        first = await asyncio.gather(*(journal.ingest(item) for item in items))
        resent = [new_event(key=item.event.dedup_key) for item in items[:5]]
        again = await asyncio.gather(*(journal.ingest(item) for item in resent))
        assert not any(i.duplicate for i in first) and all(i.duplicate for i in again)
        ids = [item.jobs[0].id for item in items]
        claimed = await journal.claim(ids, "boot")
        assert sorted(c.job.id for c in claimed) == sorted(ids)
        await journal.finish([finished(i, JobState.DONE, "done") for i in ids])
        replayed = await journal.replay([items[0].event.id])
        assert replayed[items[0].event.id].requeued == 1
        counts = await journal.counts()
    assert (counts.events, counts.jobs_by_state["done"], counts.jobs_by_state["queued"]) == (
        40,
        39,
        1,
    )


async def test_pg_prepared_statements_a_pooler_loses_are_said_with_the_setting_that_helps(
    pgbouncer_url: str,
) -> None:
    """Through PgBouncer in transaction mode with the default ``statement_cache_size`` the
    statements asyncpg prepares are lost or met twice between transactions. What a node's log
    and the CLI said was asyncpg's error with its hint on lines of their own ("set
    statement_cache_size to 0 when creating the asyncpg connection object"), a key no config
    has; it is now one line naming ``journal.statement_cache_size = 0``."""

    async def use() -> None:
        async with PostgresJournal(pgbouncer_url, lease_s=LEASE_S, heartbeat_s=3600) as journal:
            for _ in range(20):
                await asyncio.gather(*(journal.counts() for _ in range(10)))

    with pytest.raises(JournalError) as err:
        for _ in range(5):
            await use()
    said = str(err.value)
    assert "prepared statement" in said and "\n" not in said, said
    assert said.endswith(
        ": a pooler in transaction mode (PgBouncer before 1.21, or without"
        " max_prepared_statements) keeps no prepared statement from one transaction to the next:"
        " set journal.statement_cache_size = 0 (docs/scaling.md, PgBouncer)"
    ), said


async def test_pg_works_without_prepared_statements_as_pgbouncer_needs(pg_url: str) -> None:
    """With ``statement_cache_size = 0`` (transaction-mode PgBouncer before 1.21) a webhook is
    journaled, claimed and finished, and no named statement is left on the server."""
    clock = ManualClock(START)
    journal = PostgresJournal(pg_url, clock=clock, lease_s=LEASE_S, statement_cache_size=0)
    async with journal:
        item = new_event()
        await journal.ingest(item)
        job_id = item.jobs[0].id
        assert len(await journal.claim([job_id], "boot")) == 1
        await journal.finish([finished(job_id, JobState.DONE, "done", result={"ok": True})])
        assert (await journal.get_event(item.event.id)).jobs[0].state == JobState.DONE
        rows = await journal.fetch("SELECT count(*) FROM pg_prepared_statements")
    assert rows[0][0] == 0


async def _add_done_jobs(conn: Any, count: int = 20_000) -> None:
    """``count`` done jobs (of events that do not exist, finished at ``START``) and fresh
    statistics: a long finished history for the planner to weigh."""
    await conn.execute(
        "INSERT INTO jobs (id, event_id, source, action, type, state, priority, run_at,"
        " max_attempts, finished_at) SELECT 'done' || g, 'e' || g, 'shop', 'a', 'forward', 'done',"
        " 1, 0, 3, $1::double precision FROM generate_series(1, $2::integer) g",
        START,
        count,
    )
    await conn.execute("VACUUM ANALYZE jobs")


async def test_pg_the_backlog_count_reads_the_queue_not_the_finished_jobs(pg_url: str) -> None:
    """Counting the backlog (every node, every heartbeat) stays cheap however many finished
    jobs the table holds: it reads the queued/running partial indexes, never the whole table."""
    async with node(pg_url, ManualClock(START)) as journal:
        await journal.ingest(new_event())
        conn = await asyncpg.connect(pg_url)
        try:
            await _add_done_jobs(conn)
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {BACKLOG_SQL}")
        finally:
            await conn.close()
        assert await journal.backlog() == 1
    assert '"Seq Scan"' not in plan and '"Index Only Scan"' in plan


async def test_pg_prune_looks_up_each_old_events_jobs_instead_of_hashing_every_job(
    pg_url: str,
) -> None:
    """Retention's candidates: the jobs of each event older than ``keep_done`` are looked up
    one event at a time (a subplan), never joined against every recent job (a hash of all the
    jobs finished within ``keep_done_h``, rebuilt at every round). The contract suite checks
    what prune deletes."""
    async with node(pg_url, ManualClock(START)) as journal:
        await journal.ingest(new_event())
        conn = await asyncpg.connect(pg_url)
        try:
            await _add_done_jobs(conn)
            async with conn.transaction():
                plan = await conn.fetchval(
                    f"EXPLAIN (FORMAT JSON) {PRUNE_SQL}", START - 10.0, START - 100.0, 500, 0.0
                )
        finally:
            await conn.close()
    nodes_ = list(_plan_nodes(json.loads(plan)[0]["Plan"]))
    assert not [n for n in nodes_ if "Join Type" in n], plan
    assert [n for n in nodes_ if n.get("Index Cond") == "(event_id = e.id)"], plan


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


# Retention as the leader runs it: dead events go a day after they finished.
_KEEP = {"keep_done_s": 3600.0, "keep_dead_s": 86400.0, "keep_dedup_s": 86400.0}


async def _expired_dead_event(journal: PostgresJournal, clock: ManualClock) -> NewEvent:
    """An event whose only job went dead, then the clock moved past its retention."""
    item = new_event(received_at=clock.time())
    await journal.ingest(item)
    await journal.claim([item.jobs[0].id], "b")
    await journal.finish(
        [finished(item.jobs[0].id, JobState.DEAD, "dead", now=clock.time(), error="404")]
    )
    clock.advance(_KEEP["keep_dead_s"] + 1)
    return item


def _prune_args(clock: ManualClock) -> tuple[float, float, int, float]:
    """``PRUNE_SQL``'s parameters for a prune with ``_KEEP`` now, as ``prune`` binds them."""
    now = clock.time()
    return (now - _KEEP["keep_done_s"], now - _KEEP["keep_dead_s"], 500, -math.inf)


async def _blocked_by(watch: asyncpg.Connection, holder: asyncpg.Connection) -> bool:
    """Whether some session waits for a lock ``holder`` holds (asked on a third connection:
    one inside a transaction keeps reading the same ``pg_stat_activity``)."""
    return bool(
        await watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            holder.get_server_pid(),
        )
    )


async def test_pg_a_replay_waits_for_a_prune_holding_its_event_then_finds_it_gone(
    pg_url: str,
) -> None:
    """A replay that comes while another node's prune holds an expired event (locked by the
    prune's own candidate query) waits for that prune, then answers ``NotFound``: it never
    acknowledges re-queued jobs that the prune then deletes."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item = await _expired_dead_event(journal, clock)
        event_id = item.event.id
        prune, watch = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
        try:
            async with prune.transaction():
                rows = await prune.fetch(PRUNE_SQL, *_prune_args(clock))
                assert [r[0] for r in rows] == [event_id]
                replay = asyncio.create_task(journal.replay([event_id]))
                await poll(lambda: _blocked_by(watch, prune), timeout_s=10)
                assert not replay.done()
                await prune.execute(
                    "DELETE FROM attempts WHERE job_id IN"
                    " (SELECT id FROM jobs WHERE event_id = $1)",
                    event_id,
                )
                await prune.execute("DELETE FROM jobs WHERE event_id = $1", event_id)
                await prune.execute("DELETE FROM events WHERE id = $1", event_id)
            with pytest.raises(NotFound):
                await replay
        finally:
            await prune.close()
            await watch.close()
        assert (await journal.counts()).events == 0


async def test_pg_a_prune_leaves_alone_an_event_a_replay_holds(pg_url: str) -> None:
    """A prune that comes while a replay of an expired event is in flight (its lock on the
    event held) skips that event without waiting, and once the replay has committed the
    event's job is queued again and kept."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item = await _expired_dead_event(journal, clock)
        event_id = item.event.id
        replay = await asyncpg.connect(pg_url)
        try:
            async with replay.transaction():  # what the replay's first statement takes
                await replay.execute("SELECT 1 FROM events WHERE id = $1 FOR KEY SHARE", event_id)
                # Bounded: a prune that waited for the replay would wait for ever here.
                pruned = await asyncio.wait_for(journal.prune(**_KEEP), 10)
                assert (pruned.events, pruned.jobs) == (0, 0)
                await replay.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, finished_at = NULL"
                    " WHERE event_id = $1",
                    event_id,
                )
        finally:
            await replay.close()
        assert (await journal.prune(**_KEEP)).events == 0
        detail = await journal.get_event(event_id)
    assert [j.state for j in detail.jobs] == [JobState.QUEUED]


class _AfterCandidates:
    """A prune's connection that runs ``then`` once ``PRUNE_SQL`` has answered, with the
    candidates' locks held and before anything is deleted."""

    def __init__(self, conn: Any, then: Callable[[], Awaitable[None]]) -> None:
        self._conn, self._then = conn, then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        rows = list(await self._conn.fetch(sql, *args))
        if sql == PRUNE_SQL and rows:
            await self._then()
        return rows


async def test_pg_a_prune_keeps_an_event_replayed_after_it_read_its_candidates(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay can commit after a prune's candidate query took its snapshot and before it
    locked the event (the replay's lock gone by then, so ``SKIP LOCKED`` does not skip it):
    the prune then holds an event whose jobs are queued again. It looks again once the lock
    is held, and keeps the event and its job. Here the jobs are re-queued after the candidate
    query, by a statement of another session that takes no lock on the event: from the
    prune's side the same state."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item = await _expired_dead_event(journal, clock)
        event_id = item.event.id
        other = await asyncpg.connect(pg_url)

        async def requeue() -> None:
            await other.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, finished_at = NULL"
                " WHERE event_id = $1",
                event_id,
            )

        real_write = journal._write

        async def write(fn: Callable[[Any], Awaitable[Any]]) -> Any:
            return await real_write(lambda conn: fn(_AfterCandidates(conn, requeue)))

        try:
            monkeypatch.setattr(journal, "_write", write)
            pruned = await journal.prune(**_KEEP)
            monkeypatch.undo()
        finally:
            await other.close()
        assert (pruned.events, pruned.jobs) == (0, 0)
        detail = await journal.get_event(event_id)
    assert [j.state for j in detail.jobs] == [JobState.QUEUED]


async def test_pg_two_replays_of_the_same_events_in_opposite_orders_do_not_deadlock(
    pg_url: str,
) -> None:
    """Two replays of overlapping events, asked for in opposite orders (two operators, two
    nodes), lock the events' jobs in one order: the second waits for the first and both
    re-queue, where each holding one event's jobs while waiting for the other's was a
    deadlock that PostgreSQL broke by failing one of them. The first replay is played by
    hand here, holding the lower id's jobs as a replay does between its two events."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        low, high = sorted([(await _expired_dead_event(journal, clock)).event.id for _ in "ab"])
        other, watch = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)

        async def lock_jobs(conn: asyncpg.Connection, event_id: str) -> str:
            # The row locks a replay's UPDATE takes, without changing what it would change.
            return str(
                await conn.execute("UPDATE jobs SET run_at = run_at WHERE event_id = $1", event_id)
            )

        try:
            async with other.transaction():
                await lock_jobs(other, low)
                replay = asyncio.create_task(journal.replay([high, low]))
                await poll(lambda: _blocked_by(watch, other), timeout_s=10)
                # The old order had locked ``high``'s jobs by now: this waited for it, and
                # PostgreSQL failed one side after deadlock_timeout.
                assert await asyncio.wait_for(lock_jobs(other, high), 10) == "UPDATE 1"
            replayed = await replay
        finally:
            await other.close()
            await watch.close()
    assert {i: (r.requeued, r.run_now) for i, r in replayed.items()} == {low: (1, 0), high: (1, 0)}


async def test_pg_a_group_commit_ended_by_a_deadlock_is_run_again_not_an_outage(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel holding one job's row while it goes for another, and a group commit
    recording both jobs' outcomes in the other order, deadlock; PostgreSQL rolls one side
    back. The group commit is then run again and records both, where it used to fail its
    batch (503s for the webhooks in it, outcomes kept back) and log an outage. The cancel is
    played by hand, holding the first job's row as a cancel does between two events."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        (a, first, _), (b, second, _) = [await claimed_one(journal) for _ in "ab"]
        other, watch = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
        try:
            # The deadlock check runs in whichever session has waited deadlock_timeout first:
            # this one waits second, and checks only long after the journal's has.
            await other.execute("SET deadlock_timeout = '60s'")
            caplog.set_level(logging.INFO, "webhookd.journal")
            async with other.transaction():
                # The later job: the commit, whether it walks the outcomes or the table, takes
                # the earlier one's row first, then waits for this.
                await other.execute("UPDATE jobs SET run_at = run_at WHERE id = $1", second)
                outcomes = [finished(j, JobState.DONE, "ok") for j in (first, second)]
                finishing = asyncio.create_task(journal.finish(outcomes))
                await poll(lambda: _blocked_by(watch, other), timeout_s=10)
                await asyncio.wait_for(
                    other.execute("UPDATE jobs SET run_at = run_at WHERE id = $1", first), 30
                )
            assert await asyncio.wait_for(finishing, 30) == Recorded()
        finally:
            await other.close()
            await watch.close()
        assert "ended to break a deadlock; trying it again" in caplog.text
        # Once, or again: when the rolled-back side lets go, the rerun may take the first row
        # before the other session's waiting update does (row locks wait on the holder's
        # transaction, with no queue), and the two deadlock once more. Each is run again.
        assert journal.rerun_writes >= 1  # webhookd_journal_writes_rerun_total
        assert journal.last_write_error is None
        for item in (a, b):
            assert (await journal.get_event(item.event.id)).jobs[0].state == JobState.DONE


async def test_pg_a_refill_seeks_the_due_jobs_past_those_in_backoff(pg_url: str) -> None:
    """A lane's due jobs are a range of ``jobs_lane`` (…, run_at, seq): 20,000 jobs of the
    lane waiting out a retry's backoff, first in it by seq, are not read to reach the due one
    behind them. The contract suite checks what a refill returns."""
    async with node(pg_url, ManualClock(START)) as journal:
        due = new_event(source="a")
        await journal.ingest(due)
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
                " run_at, max_attempts, seq) OVERRIDING SYSTEM VALUE"
                " SELECT 'wait' || g, 'e' || g, 'a', 'a', 'forward',"
                " 'queued', $1, 't1', $2::double precision + 3600, 3, -g"
                " FROM generate_series(1, 20000) g",
                int(Priority.NORMAL),
                START,
            )
            await conn.execute("VACUUM ANALYZE jobs")
            async with conn.transaction():
                plan = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {READY_IN_LANES_SQL}",
                    [int(Priority.NORMAL)],
                    ["a"],
                    ["t1"],
                    [5],
                    START + 60,
                )
        finally:
            await conn.close()
        lane = (int(Priority.NORMAL), "a", "t1")
        assert [r.id for r in await journal.ready_in_lanes(START + 60, [(lane, 5)])] == [
            due.jobs[0].id
        ]
    scans = [
        n for n in _plan_nodes(json.loads(plan)[0]["Plan"]) if n.get("Relation Name") == "jobs"
    ]
    assert scans and all(n["Actual Rows"] <= 1 for n in scans), plan
    assert all(n.get("Rows Removed by Filter", 0) == 0 for n in scans), plan


async def test_pg_maintenance_rebuilds_the_queue_indexes_once_per_period_across_nodes(
    pg_url: str,
) -> None:
    """The queue's partial indexes, grown by the jobs that passed through, are rebuilt small
    when a rebuild is due (one node does it for the cluster), and not again until the next."""
    clock = ManualClock(START)

    async def lane_index(conn: asyncpg.Connection) -> tuple[int, int]:
        row = await conn.fetchrow(
            "SELECT relfilenode, pg_relation_size(oid) FROM pg_class WHERE relname = 'jobs_lane'"
        )
        return int(row[0]), int(row[1])

    async with node(pg_url, clock) as a, node(pg_url, clock) as b:
        conn = await asyncpg.connect(pg_url)
        try:
            for _ in range(6):
                items = [new_event(body=b"{}") for _ in range(200)]
                await asyncio.gather(*(a.ingest(item) for item in items))
                claimed = await a.claim([i.jobs[0].id for i in items], "b")
                await a.finish([finished(c.job.id, JobState.DONE, "done") for c in claimed])
            await conn.execute("VACUUM jobs")
            grown = await lane_index(conn)
            assert await a.maintain() == 0
            rebuilt = await lane_index(conn)
            assert await b.maintain() == 0  # not due again: the other node leaves it
            assert await lane_index(conn) == rebuilt
            clock.advance(REINDEX_EVERY_S + 1)
            await b.maintain()
            again = await lane_index(conn)
            invalid = await conn.fetchval("SELECT count(*) FROM pg_index WHERE NOT indisvalid")
        finally:
            await conn.close()
    assert rebuilt[0] != grown[0] and rebuilt[1] < grown[1]
    assert again[0] != rebuilt[0] and invalid == 0


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
    with pytest.raises(JournalError) as err:
        async with node(pg_url, ManualClock(START)):
            pass
    # Named as the log names it (no password), with the way back.
    assert str(err.value) == (
        f"{redact_url(pg_url)} has journal schema version {len(MIGRATIONS) + 1}, newer than"
        f" this webhookd understands ({len(MIGRATIONS)}): run the newer webhookd, or restore"
        " a pg_dump you took before the upgrade"
    )


async def test_pg_a_schema_upgrade_at_open_is_logged_with_its_versions(
    pg_url: str, pg_server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a database of an older schema says so at INFO before and after the migrations,
    naming the journal as ``location`` does (its URL without a password); a new one says
    nothing of upgrades."""
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    async with node(pg_url, ManualClock(START)):
        pass
    assert "upgrad" not in caplog.text
    async with fresh_database(pg_server_url) as old:
        conn = await asyncpg.connect(old)
        try:  # a database of the version before
            await conn.execute("CREATE TABLE webhookd_schema (version integer NOT NULL)")
            for version, migration in enumerate(MIGRATIONS[:-1], start=1):
                await conn.execute(migration)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
        finally:
            await conn.close()
        async with node(old, ManualClock(START)) as journal:
            where = journal.location
    upgrades = [r.getMessage() for r in caplog.records if "upgrad" in r.getMessage()]
    latest = len(MIGRATIONS)
    assert len(upgrades) == 2
    assert f"{where}: upgrading its schema from version {latest - 1} to {latest}" in upgrades[0]
    assert f"{where}: schema upgraded to version {latest} in " in upgrades[1]


async def test_pg_the_cli_neither_makes_nor_upgrades_a_journal(pg_server_url: str) -> None:
    """Only a node brings the schema forward: a verb on a database with no journal (a mistyped
    name) would report an empty cluster, and one on an older schema would change the tables
    under the older nodes still running. Both are refused, and the database left as it was."""
    async with fresh_database(pg_server_url) as empty:
        with pytest.raises(JournalError, match=r"no webhookd journal in .* yet: `webhookd serve`"):
            await PostgresJournal(empty, node=False).open()
        conn = await asyncpg.connect(empty)
        try:
            assert await conn.fetchval("SELECT to_regclass('webhookd_schema')") is None
            await conn.execute("CREATE TABLE webhookd_schema (version integer NOT NULL)")
            for version, migration in enumerate(MIGRATIONS[:-1], start=1):
                await conn.execute(migration)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
            latest = len(MIGRATIONS)
            with pytest.raises(
                JournalError,
                match=f"schema version {latest - 1}, this webhookd's is {latest}: start the nodes",
            ):
                await PostgresJournal(empty, node=False).open()
            assert await conn.fetchval("SELECT max(version) FROM webhookd_schema") == latest - 1
        finally:
            await conn.close()


# The schema version before ``behind`` (migration 8 -> 9) and the columns ``jobs`` had then.
_BEFORE_BEHIND = 8
_JOB_COLUMNS_AT_8 = (
    "seq, id, event_id, source, action, type, state, priority, tenant, order_key, run_at,"
    " attempts, max_attempts, recoveries, waits, node_id, claim_token, lease_until, claimed_at,"
    " finished_at, last_error, result, caps, cancel_requested_at"
)


async def _at_version(conn: asyncpg.Connection, version: int) -> None:
    """Bring the empty database on ``conn`` to schema ``version``, as that webhookd left it."""
    await conn.execute("CREATE TABLE webhookd_schema (version integer NOT NULL)")
    for done, migration in enumerate(MIGRATIONS[:version], start=1):
        await conn.execute(migration)
        await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", done)


async def test_pg_the_upgrade_that_adds_behind_marks_the_jobs_queued_behind_a_head(
    pg_server_url: str,
) -> None:
    """A database of the version before, with three jobs of one key queued (the first in
    backoff) and one without a key: the upgrade marks the two behind the head, so the first
    refill after it already leaves them unread."""
    async with fresh_database(pg_server_url) as old:
        conn = await asyncpg.connect(old)
        try:
            await _at_version(conn, _BEFORE_BEHIND)
            for job_id, key, run_at in (
                ("j1", "k", START + 60),
                ("j2", "k", START),
                ("j3", "k", START),
                ("j4", None, START),
            ):
                await conn.execute(
                    "INSERT INTO jobs (id, event_id, source, action, type, state, priority,"
                    " tenant, order_key, run_at, max_attempts)"
                    " VALUES ($1, 'e', 'shop', 'a', 'log', 'queued', 1, 't1', $2, $3, 3)",
                    job_id,
                    key,
                    run_at,
                )
        finally:
            await conn.close()
        async with node(old, ManualClock(START)) as journal:
            lane = (int(Priority.NORMAL), "shop", "t1")
            assert [r.id for r in await journal.ready_in_lanes(START, [(lane, 5)])] == ["j4"]
        assert await marked_behind(Store("postgres", old, ManualClock(START))) == {"j2", "j3"}


async def test_pg_the_upgrade_to_behind_marks_exactly_the_queued_jobs_after_their_keys_first(
    pg_server_url: str,
) -> None:
    """Every case the upgrade that adds ``behind`` meets: a queued job is marked when an older
    (by seq) queued or running job has its source, action and order key, and no other job is
    (finished jobs ahead, a running job behind a queued one, the same key on another action
    or source, the key "" and no key); every other column of every row is left as it was."""
    jobs = (  # id, source, action, tenant, order_key, state, in insertion (seq) order
        ("a1", "shop", "a", "t1", "k1", "done"),
        ("a2", "shop", "a", "t1", "k1", "running"),
        ("a3", "shop", "a", "t1", "k1", "queued"),  # behind the running a2
        ("a4", "shop", "a", "t2", "k1", "queued"),  # another tenant, the same key: behind
        ("b1", "shop", "a", "t1", "k2", "dead"),
        ("b2", "shop", "a", "t1", "k2", "cancelled"),
        ("b3", "shop", "a", "t1", "k2", "queued"),  # the head: the jobs before it finished
        ("b4", "shop", "a", "t1", "k2", "done"),
        ("b5", "shop", "a", "t1", "k2", "queued"),  # behind b3
        ("c1", "shop", "b", "t1", "k2", "queued"),  # k2 of another action: a head
        ("c2", "mail", "a", "t1", "k2", "queued"),  # k2 of another source: a head
        ("c3", "mail", "a", "t1", "K2", "queued"),  # another key (case counts): a head
        ("d1", "shop", "a", "t1", "k3", "queued"),  # a head...
        ("d2", "shop", "a", "t1", "k3", "running"),  # ...with a running job after it: no mark
        ("d3", "shop", "a", "t1", "k3", "queued"),  # behind d1 and d2
        ("e1", "shop", "a", "t1", "", "queued"),  # "" is a key
        ("e2", "shop", "a", "t1", "", "queued"),  # behind e1
        ("n1", "shop", "a", "t1", None, "queued"),  # no key: never marked
        ("n2", "shop", "a", "t1", None, "running"),
        ("n3", "shop", "a", "t1", None, "queued"),
        ("f1", "shop", "a", "t1", "k4", "done"),
        ("f2", "shop", "a", "t1", "k4", "queued"),  # a head: only a finished job before it
    )
    async with fresh_database(pg_server_url) as old:
        conn = await asyncpg.connect(old)
        try:
            await _at_version(conn, _BEFORE_BEHIND)
            for n, (job_id, source, action, tenant, key, state) in enumerate(jobs):
                await conn.execute(
                    "INSERT INTO jobs (id, event_id, source, action, type, state, priority,"
                    " tenant, order_key, run_at, max_attempts, attempts, node_id, finished_at)"
                    " VALUES ($1, 'e' || $1, $2, $3, 'log', $4, 1, $5, $6, $7, 3, $8, $9, $10)",
                    job_id,
                    source,
                    action,
                    state,
                    tenant,
                    key,
                    START + 60 - n,  # run_at against seq: the order is seq's, not run_at's
                    int(state != "queued"),
                    "node" if state == "running" else None,
                    START if state in ("done", "dead", "cancelled") else None,
                )
            before = await conn.fetch(f"SELECT {_JOB_COLUMNS_AT_8} FROM jobs ORDER BY seq")
            await postgres.schema.migrate(conn, "old")
            after = await conn.fetch(f"SELECT {_JOB_COLUMNS_AT_8} FROM jobs ORDER BY seq")
            marked = await conn.fetch("SELECT id, behind FROM jobs WHERE behind IS NOT NULL")
        finally:
            await conn.close()
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert sorted((r["id"], r["behind"]) for r in marked) == [
        (job_id, 1) for job_id in ("a3", "a4", "b5", "d3", "e2")
    ]


async def test_pg_the_upgrade_to_behind_marks_a_long_queue_of_one_key_in_a_few_seconds(
    pg_server_url: str,
) -> None:
    """20,000 jobs queued in one order key are marked in about a second: the upgrade compared
    each job with every other job of its key, a time growing with the square of a key's queue
    (here past its 10 s cut; minutes for 200,000 jobs over 10 keys, a node answering nothing)."""
    async with fresh_database(pg_server_url) as old:
        conn = await asyncpg.connect(old, server_settings={"statement_timeout": "10s"})
        try:
            await _at_version(conn, _BEFORE_BEHIND)
            await conn.execute(
                "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
                " order_key, run_at, max_attempts) SELECT 'j' || g, 'e' || g, 'shop', 'a', 'log',"
                " 'queued', 1, '', 'k', $1::double precision, 3 FROM generate_series(1, 20000) g",
                START,
            )
            await conn.execute("VACUUM ANALYZE jobs")
            await postgres.schema.migrate(conn, "old")
            marked = await conn.fetchval("SELECT count(*) FROM jobs WHERE behind IS NOT NULL")
        finally:
            await conn.close()
    assert marked == 19_999


async def test_pg_events_from_before_the_query_column_read_as_having_none(
    pg_server_url: str,
) -> None:
    """An event and its queued job written by the version before ``events.query``: after the
    upgrade its page and the claim of its job read its query as ``""``."""
    async with fresh_database(pg_server_url) as old:
        conn = await asyncpg.connect(old)
        try:
            await conn.execute("CREATE TABLE webhookd_schema (version integer NOT NULL)")
            for version, migration in enumerate(MIGRATIONS[:10], start=1):  # before ``query``
                await conn.execute(migration)
                await conn.execute("INSERT INTO webhookd_schema (version) VALUES ($1)", version)
            await conn.execute(
                "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority,"
                " headers, body) VALUES ('evt_old', 'shop', $1, 'shop:k', '', 1, '[]', '{}')",
                START,
            )
            await conn.execute(
                "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
                " run_at, max_attempts) VALUES ('job_old', 'evt_old', 'shop', 'a', 'log',"
                " 'queued', 1, '', $1, 3)",
                START,
            )
        finally:
            await conn.close()
        async with node(old, ManualClock(START)) as journal:
            assert (await journal.get_event("evt_old")).event.query == ""
            [claimed] = await journal.claim(["job_old"], "b")
            assert (claimed.event.id, claimed.event.query) == ("evt_old", "")


async def test_pg_ingest_fails_loudly_when_the_server_goes_away(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """With the database gone an ingest raises JournalUnavailable (the receiver's 503), never
    a false acknowledgement, and /readyz's error is set."""
    async with node(pg_url, ManualClock(START)) as journal:
        await journal.ingest(new_event())
        await db_outage.begin()
        with pytest.raises(JournalUnavailable):
            await journal.ingest(new_event())
        assert journal.last_write_error
        await db_outage.end()
        # Back: the pool reconnects by itself.
        assert not (await journal.ingest(new_event())).duplicate
        assert journal.last_write_error is None


async def test_pg_a_node_of_another_config_that_stops_is_not_said_to_agree(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose config differs stops (a restart during a rollout): the others say that it
    stopped, not that every node runs their config again (which read as the rollout done,
    and was taken back as it came back)."""
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    clock = ManualClock(START)
    async with node(pg_url, clock) as a:
        a.config_digest = "one"
        async with node(pg_url, clock) as b:
            b.config_digest = "two"
            await b.heartbeat()
            named = f"{socket.gethostname()} pid {os.getpid()}"
            assert await a.compare_configs() == {named}
        assert await a.compare_configs() == frozenset()  # b stopped
    said = [r.getMessage() for r in caplog.records if "node" in r.getMessage()]
    assert said[-1] == (
        f"node(s) {named}, which ran another config, stopped or went silent: the nodes running"
        " now run this node's sources, actions and lanes"
    ), said


async def test_pg_names_a_reload_published_during_an_outage_go_with_the_next_commit(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """A reload during an outage cannot write the node's new sources and actions: the first
    group commit once the database is back writes them, in the transaction of the webhooks it
    takes, so another node meeting a job of a source just added finds the node that has it.
    (They waited for the next heartbeat, and such a job could go dead meanwhile.)"""
    before, after = json.dumps({"sources": ["shop"]}), json.dumps({"sources": ["shop", "new"]})
    async with node(pg_url, ManualClock(START)) as a, node(pg_url, ManualClock(START)) as b:
        a.config_names = before
        await a.heartbeat()
        await db_outage.begin()
        await a.publish_names(after)  # the reload's write, which the outage fails
        await db_outage.end()
        assert [p.runs for p in await b.peer_names()] == [before]
        await a.ingest(new_event())  # a webhook of the new source, say
        assert [p.runs for p in await b.peer_names()] == [after]


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
    assert redact_url(url) == f"PostgreSQL user:***@127.0.0.1:{port}/webhookd"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u@db.internal:5432/hooks", "PostgreSQL u@db.internal:5432/hooks"),
        ("postgresql://u@h/d?password=hunter2&sslmode=require", "PostgreSQL u@h/d"),
        ("postgres://u:p%40ss@h:6432/d", "PostgreSQL u:***@h:6432/d"),
        ("postgres://u:Abc%40Sec%2Fret99%23x@h:6432/d", "PostgreSQL u:***@h:6432/d"),
        ("postgresql:///hooks?host=/run/postgresql", "PostgreSQL /run/postgresql/hooks"),
    ],
)
def test_a_journal_url_is_named_by_where_it_points_never_written_out(url: str, shown: str) -> None:
    """A URL is a secret, masked whole in logs: a node names its journal by host and
    database, with no password, in the user part or an option."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://wh:Abc@Sec/ret99@127.0.0.1:19310/whtrial",
        "postgresql://wh:Abc@Sec?ret99@127.0.0.1:19310/whtrial",
        "postgresql://wh:Abc#Secret99@127.0.0.1:19310/whtrial",
        "postgresql://wh:Abc/ret99@127.0.0.1:19310/whtrial",
        "postgresql://wh:Abc@Sec@127.0.0.1:19310/whtrial",
        "postgresql://wh:Abc@[Sec/ret99",
    ],
)
def test_a_journal_url_whose_password_may_be_split_is_named_by_nothing(url: str) -> None:
    """Where a bare @, /, ? or # may have split the password into the host, path, options or
    fragment (the config refuses such a URL; this is what a log would say if one got by),
    no part of the URL is named: no part of it is sure not to be the password's."""
    assert redact_url(url) == "PostgreSQL ***"


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


async def test_pg_jobs_a_node_gives_back_wake_the_others_at_once(pg_url: str) -> None:
    """Jobs queued again (a drain's cut, a claim in doubt, a silent node's recovered) were
    left for the other nodes' sweep, which may be workers.sweep_interval_s away; each wakes
    them as a commit of new jobs does."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as a, node(pg_url, clock) as b:
        woken = asyncio.Event()
        b.on_remote_jobs = woken.set
        await asyncio.wait_for(asyncio.gather(a.listening.wait(), b.listening.wait()), 10)
        item = new_event()
        await a.ingest(item)
        await asyncio.wait_for(woken.wait(), 10)  # its commit's wake-up
        [claimed] = await a.claim([item.jobs[0].id], "boot_a")
        woken.clear()
        await a.unclaim([claimed.job.id])  # a drain gives it back
        await asyncio.wait_for(woken.wait(), 10)


async def test_pg_listen_url_hears_what_a_pooler_loses(
    pg_url: str,
    pgbouncer_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two nodes whose journal goes through PgBouncer in transaction mode, where a LISTEN hears
    nothing: the one listening through the pooler finds out from its own probe and says so
    once, naming ``journal.listen_url``; the one with ``listen_url`` pointing straight at the
    server hears its probe and is woken by the other's commit at once, as without a pooler."""
    monkeypatch.setattr(nodes, "PROBE_S", 0.5)
    clock = ManualClock(START)

    def pooled(**kw: Any) -> PostgresJournal:
        return PostgresJournal(
            pgbouncer_url,
            clock=clock,
            lease_s=LEASE_S,
            heartbeat_s=3600,
            statement_cache_size=0,
            **kw,
        )

    async with pooled() as a, pooled(listen_url=pg_url) as b:
        woken = asyncio.Event()
        b.on_remote_jobs = woken.set
        await asyncio.wait_for(b.heard_itself.wait(), 10)
        woken.clear()  # the look-now of connecting
        await a.ingest(new_event())
        await asyncio.wait_for(woken.wait(), 10)

        async def deaf() -> bool:
            return a.listener_deaf

        await poll(deaf, timeout_s=10)
    assert not b.listener_deaf and not a.heard_itself.is_set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "hears nothing" in w and "journal.listen_url" in w], warnings


class _Watched(asyncio.Event):
    """An event that says when someone starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def wait(self) -> Literal[True]:
        self.waiting.set()
        return await super().wait()


async def test_pg_a_listener_cancelled_as_it_hears_its_probe_ends(
    pg_url: str, pgbouncer_url: str
) -> None:
    """The journal's close cancels the listener and waits for it. Cancelled just as its probe
    was heard, the listener ended on no version: Python 3.11's ``wait_for`` returned the
    event's result and dropped the cancellation, the listener went on listening, and the close
    (a node's stop, in a CI run) waited for ever. Through PgBouncer the probe goes unheard, so
    the listener is surely waiting for it when the test sets it."""
    journal = PostgresJournal(
        pgbouncer_url, lease_s=LEASE_S, heartbeat_s=3600, statement_cache_size=0
    )
    journal.heard_itself = heard = _Watched()
    async with journal:
        await asyncio.wait_for(heard.waiting.wait(), 10)  # probe sent, waiting to hear it
        task = journal._listen_task
        assert task is not None
        heard.set()
        await asyncio.sleep(0)  # the wait for it ends first, then the cancellation comes
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the listener went on after its cancellation"


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


async def test_pg_a_replay_cancel_or_purge_from_the_cli_wakes_every_node_at_once(
    pg_url: str,
) -> None:
    """The CLI runs no notify task: a replay it made (of dead jobs, of waiting ones), or a
    cancel or purge that let the next job of an order key through, waited for each node's
    next sweep (measured: 28 s, sweeps 30 s apart). Each tells every listening node in its own
    transaction, as a pause does; one that makes nothing runnable tells nobody."""
    clock = ManualClock(START)
    async with (
        node(pg_url, clock) as daemon,
        PostgresJournal(pg_url, clock=clock, node=False) as cli,
    ):
        woken = asyncio.Event()
        wakes = 0

        def wake() -> None:
            nonlocal wakes
            wakes += 1
            woken.set()

        daemon.on_remote_jobs = wake
        told = asyncio.Event()
        daemon.on_pause_change = told.set
        await asyncio.wait_for(daemon.listening.wait(), 10)
        item, waiting = new_event(), new_event()
        head, behind, gone, after = (new_event(order_key=k) for k in ("k1", "k1", "k2", "k2"))
        for one in (item, waiting, head, behind, gone, after):
            await daemon.ingest(one)
        [claimed] = await daemon.claim([item.jobs[0].id], "b")
        await daemon.finish([finished(claimed.job.id, JobState.DEAD, "dead", claim=claimed.claim)])
        [claimed] = await daemon.claim([waiting.jobs[0].id], "b")
        await daemon.finish(
            [
                finished(
                    claimed.job.id,
                    JobState.QUEUED,
                    "retry",
                    run_at=START + 3600,
                    claim=claimed.claim,
                )
            ]
        )
        changes: list[Callable[[], Awaitable[object]]] = [
            lambda: cli.replay([item.event.id], dead_only=True),
            lambda: cli.replay([waiting.event.id]),  # its retry is due now
            lambda: cli.cancel([head.event.id]),  # the next job of k1 may run
            lambda: cli.purge([gone.event.id]),  # the next job of k2 may run
        ]
        for change in changes:
            woken.clear()  # the look-now of connecting, the one before
            await change()
            await asyncio.wait_for(woken.wait(), 10)
        ready = {r.id for r in await daemon.ready(clock.time(), 10)}
        assert {item.jobs[0].id, waiting.jobs[0].id, behind.jobs[0].id, after.jobs[0].id} <= ready
        before = wakes
        assert await cli.replay([item.event.id], dead_only=True) == {item.event.id: Replayed(0, 0)}
        assert await cli.cancel([item.event.id], dead_only=True) == {item.event.id: Cancelled(0, 0)}
        told.clear()  # the look-now of connecting
        assert await cli.pause("shop") is True  # heard after anything sent before it
        await asyncio.wait_for(told.wait(), 10)
        assert wakes == before


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


async def test_pg_a_listener_whose_path_hangs_as_it_listens_connects_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path to the server hangs as the listener sends its LISTEN (a pooler stuck just
    then): the listener gives up within its check interval and connects again, rather than
    wait for an answer for ever, deaf to every other node's wake-ups."""
    monkeypatch.setattr(nodes, "LISTEN_CHECK_S", 0.5)
    hop = HangingHop(pg_url, hang_on=b"LISTEN")
    url = await hop.start()
    try:
        journal = PostgresJournal(pg_url, lease_s=30, listen_url=url)
        async with journal:
            while hop.taken < 2:  # the first connection hangs; the listener comes back
                hop.took.clear()
                await asyncio.wait_for(hop.took.wait(), 10)
            hop.hang_on = None
            hop.flowing.set()
            await asyncio.wait_for(journal.listening.wait(), 10)
    finally:
        await hop.close()


async def test_pg_readiness_follows_the_heartbeat_without_traffic(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """With no webhook arriving, the heartbeat's write is what tells /readyz the database is
    gone, and back."""
    async with node(pg_url, ManualClock(START)) as journal:
        await db_outage.begin()
        with pytest.raises(JournalUnavailable):
            await journal.heartbeat()
        assert journal.last_write_error
        await db_outage.end()
        await journal.heartbeat()
        assert journal.last_write_error is None


async def test_pg_an_outage_logs_one_short_line_as_it_begins_and_one_as_it_ends(
    pg_url: str, db_outage: DatabaseOutage, caplog: pytest.LogCaptureFixture
) -> None:
    """A database refusing connections for a while leaves two warnings in the log (gone, back),
    not a traceback or a warning for every retry."""
    caplog.set_level(logging.DEBUG)
    journal = PostgresJournal(pg_url, lease_s=0.3)  # a heartbeat every 0.1 s
    async with journal:
        await db_outage.begin()
        # Some 20 failed rounds: past asyncpg's own one-second retries of its pool floor.
        await poll(lambda: _said(caplog, "heartbeat failed", 20), timeout_s=30)
        await db_outage.end()
        await poll(lambda: _said(caplog, "available again", 1), timeout_s=30)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(":")[0].split(",")[0] for r in loud] == [
        "journal unavailable",
        "journal available again",
    ]
    assert not any(r.exc_info for r in caplog.records)


async def _said(caplog: pytest.LogCaptureFixture, text: str, times: int) -> bool:
    return sum(text in r.getMessage() for r in caplog.records) >= times


async def test_pg_an_outcome_kept_back_by_an_outage_is_recorded_once_it_is_over(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """A job finished while the database is down is not left running forever under its live
    node: the outcome is recorded with the next heartbeat after the database is back."""
    async with node(pg_url, ManualClock(START)) as journal:
        item = new_event()
        await journal.ingest(item)
        job_id = item.jobs[0].id
        await journal.claim([job_id], "b")
        await db_outage.begin()
        with pytest.raises(JournalUnavailable):
            await journal.finish([finished(job_id, JobState.DONE, "done")])
        with pytest.raises(JournalUnavailable):
            await journal.record_pending()  # still down: kept for the next round
        await db_outage.end()
        await _writable_again(journal)  # the pool may first hand out a connection it cut
        assert await journal.record_pending() == 1
        job = (await journal.get_event(item.event.id)).jobs[0]
        assert (job.state, [a.outcome for a in job.history]) == (JobState.DONE, ["done"])
        assert await journal.record_pending() == 0


async def _history(journal: PostgresJournal, item: NewEvent) -> tuple[Any, ...]:
    """The event's one job as (state, attempts, [(attempt, outcome), …])."""
    job = (await journal.get_event(item.event.id)).jobs[0]
    return job.state, job.attempts, [(a.n, a.outcome) for a in job.history]


async def _writable_again(journal: PostgresJournal) -> None:
    """After an outage, until a write goes through, as the lease loop would retry: the pool
    may first hand out a connection the outage cut."""

    async def heartbeat() -> bool:
        try:
            await journal.heartbeat()
        except JournalUnavailable:
            return False
        return True

    await poll(heartbeat, timeout_s=30)


async def test_pg_a_kept_back_outcome_written_late_leaves_the_next_claim_alone(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """An outage keeps attempt 1's outcome back (twice: the worker tries again while it lasts);
    once it is over the worker's next try records it, and the job is claimed again. The
    heartbeat's late write of the copies kept back answers attempt 1's claim, not attempt 2's:
    attempt 2 stays running under its own token, its own outcome is then recorded, and the
    history has one row per attempt."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item, job_id, first = await claimed_one(journal)
        retry = finished(job_id, JobState.QUEUED, "retry", run_at=START + 1, error="503")
        await db_outage.begin()
        for _ in range(2):
            with pytest.raises(JournalUnavailable):
                await journal.finish([retry])
        await db_outage.end()
        await _writable_again(journal)
        await journal.finish([retry])  # the worker's next try
        assert await _history(journal, item) == (JobState.QUEUED, 1, [(1, "retry")])
        clock.advance(1)  # its retry is due
        [second] = await journal.claim([job_id], "b")
        assert second.claim and second.claim != first.claim
        await journal.record_pending()  # the next heartbeat
        assert await _history(journal, item) == (JobState.RUNNING, 2, [(1, "retry")])
        assert journal._tokens[job_id] == second.claim
        assert await journal.claim([job_id], "b") == []
        done = finished(job_id, JobState.DONE, "done", attempt=2, now=START + 2)
        await journal.finish([done])
        assert await _history(journal, item) == (JobState.DONE, 2, [(1, "retry"), (2, "done")])
        assert job_id not in journal._tokens and await journal.record_pending() == 0


async def test_pg_a_workers_late_try_of_a_recorded_outcome_leaves_the_next_claim_alone(
    pg_url: str, db_outage: DatabaseOutage, caplog: pytest.LogCaptureFixture
) -> None:
    """The other order: the heartbeat records the outcome kept back, the job is claimed again,
    and then the worker, still trying, sends it once more. It names the claim it answers (as
    the worker's outcomes do), so it changes nothing, takes nothing of the new claim's, and is
    no lost lease worth a warning."""
    caplog.set_level(logging.DEBUG, logger="webhookd.journal")
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item, job_id, first = await claimed_one(journal)
        retry = finished(
            job_id, JobState.QUEUED, "retry", run_at=START + 1, error="503", claim=first.claim
        )
        await db_outage.begin()
        with pytest.raises(JournalUnavailable):
            await journal.finish([retry])
        await db_outage.end()
        await _writable_again(journal)
        assert await journal.record_pending() == 1
        clock.advance(1)  # its retry is due
        [second] = await journal.claim([job_id], "b")
        await journal.finish([retry])  # the worker's try, after its back-off
        assert await _history(journal, item) == (JobState.RUNNING, 2, [(1, "retry")])
        assert journal._tokens[job_id] == second.claim
    assert not [r for r in caplog.records if "lease passed" in r.getMessage()]


async def test_pg_two_copies_of_an_outcome_in_one_commit_are_recorded_once(
    pg_url: str, db_outage: DatabaseOutage, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's try and the heartbeat's write of the same kept-back outcome can meet in one
    group commit: the job is updated once, one attempt row is written, and the copy that found
    its claim already answered is no lost lease."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        item, job_id, first = await claimed_one(journal)
        dead = finished(job_id, JobState.DEAD, "dead", error="404", claim=first.claim)
        await db_outage.begin()
        with pytest.raises(JournalUnavailable):
            await journal.finish([dead])
        await db_outage.end()
        await _writable_again(journal)
        before, backlog = journal.commits, journal.backlog_jobs
        written, _ = await asyncio.gather(journal.record_pending(), journal.finish([dead]))
        assert (written, journal.commits) == (1, before + 1)
        assert await _history(journal, item) == (JobState.DEAD, 1, [(1, "dead")])
        assert job_id not in journal._tokens and journal.backlog_jobs == backlog - 1
    assert not [r for r in caplog.records if "lease passed" in r.getMessage()]


@pytest.mark.parametrize("outcome", ["dead", "wait"])
async def test_pg_an_outcome_committed_unheard_is_recorded_not_a_lost_lease_when_tried_again(
    pg_url: str, caplog: pytest.LogCaptureFixture, outcome: str
) -> None:
    """A connection lost just as the server committed an outcome: the node hears a failure, and
    the worker's next try (then the heartbeat's write of the copy kept back) finds the claim
    answered. That read as a lost lease: a warning that another node had the job, and a worker
    told so, which logged no outcome line and raised no alert for a dead letter that stood. It
    is the outcome recorded, once: no warning, the claim forgotten, the backlog counted down
    once, one attempt row."""
    caplog.set_level(logging.DEBUG, logger="webhookd.journal")
    hop = HangingHop(pg_url)
    url = await hop.start()
    try:
        async with node(url, ManualClock(START)) as journal:
            item, job_id, first = await claimed_one(journal)
            if outcome == "dead":
                end = finished(job_id, JobState.DEAD, "dead", error="404", claim=first.claim)
                after: tuple[Any, ...] = (JobState.DEAD, 1, [(1, "dead")])
            else:
                end = finished(job_id, JobState.QUEUED, "wait", run_at=START + 9, claim=first.claim)
                after = (JobState.QUEUED, 0, [])
            backlog = journal.backlog_jobs
            hop.lose_answer_to = b"COMMIT;"  # not the BEGIN's READ COMMITTED
            with pytest.raises(JournalUnavailable):
                await journal.finish([end])
            assert hop.lose_answer_to is None
            await _writable_again(journal)

            async def committed() -> bool:  # the server made it, whatever the node heard
                return await _history(journal, item) == after

            await poll(committed, timeout_s=10)
            recorded = await journal.finish([end])  # the worker's next try
            assert recorded.lost == frozenset() and job_id not in journal._tokens
            assert await journal.record_pending() == 1  # the heartbeat's, of the copy kept back
            assert await _history(journal, item) == after
            assert journal.backlog_jobs == backlog - (outcome == "dead")
    finally:
        await hop.close()
    assert not [r for r in caplog.records if "lease passed" in r.getMessage()]


async def test_pg_an_outcome_whose_lease_passed_is_dropped_with_a_warning_and_its_claim_forgotten(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The one outcome not recorded that is worth a warning: this node still holds the claim it
    answers, but lease recovery gave the job to another node. The node forgets the claim and
    ``finish`` says the outcome was lost (its worker logs no outcome line that would read as
    the job's); the other node's claim and outcome stand."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as slow, node(pg_url, clock) as other:
        item = new_event()
        await slow.ingest(item)
        job_id = item.jobs[0].id
        [mine] = await slow.claim([job_id], "b")
        clock.advance(LEASE_S + 1)
        await other.heartbeat()
        await other.recover_lost()
        [theirs] = await other.claim([job_id], "b")
        late = await slow.finish([finished(job_id, JobState.DONE, "done", claim=mine.claim)])
        assert late == Recorded(lost=frozenset({job_id}))  # its worker says no outcome of it
        assert job_id not in slow._tokens and other._tokens[job_id] == theirs.claim
        assert await _history(other, item) == (JobState.RUNNING, 2, [(1, "interrupted")])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warned if job_id in w and "lease passed to another node" in w], warned


async def test_pg_an_outcome_whose_lease_passed_is_neither_counted_nor_told_by_the_worker(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose node lost the job's lease while it ran (a frozen node, taken over) ends
    its attempt with an outcome the journal does not record: it went to the metrics and to the
    dead-letter alert as the job's all the same (a dead letter told of a job another node was
    running). The worker now counts, tells and logs it as nothing."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as slow, node(pg_url, clock) as other:
        item = new_event()
        await slow.ingest(item)
        job_id = item.jobs[0].id
        record = slow.finish

        async def taken_over_first(results: Sequence[Finished]) -> Recorded:
            clock.advance(LEASE_S + 1)  # the node froze past its lease as the attempt ran
            await other.heartbeat()
            await other.recover_lost()
            assert len(await other.claim([job_id], "b2")) == 1
            return await record(results)

        slow.finish = taken_over_first  # type: ignore[method-assign]
        # No action by the job's name: its attempt's outcome is dead, a dead letter if counted.
        pool = WorkerPool(config=make_config(tmp_path), journal=slow, actions={}, boot_id="b")
        seen: list[Finished] = []
        pool.on_finish.append(lambda _claimed, _outcome, finished: seen.append(finished))
        with caplog.at_level(logging.DEBUG, logger="webhookd"):
            await pool.run_until_idle()
        assert await _history(other, item) == (JobState.RUNNING, 2, [(1, "interrupted")])
    assert (seen, dict(pool.outcomes)) == ([], {})
    told = [r.getMessage() for r in caplog.records if "outcome=" in r.getMessage()]
    assert [line for line in told if "outcome=dead" in line and "not recorded" not in line] == []


async def test_pg_every_claim_names_its_token_and_a_workers_outcome_answers_it(
    pg_url: str, tmp_path: Path
) -> None:
    """Jobs claimed alone, within caps, or by their webhook's commit each carry the token this
    node holds for them (``Claimed.claim``); a worker's outcome names the claim of the attempt
    it reports, and is recorded under it."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as journal:
        items = [new_event() for _ in range(3)]
        for item in items:
            await journal.ingest(item)
        alone = await journal.claim([items[0].jobs[0].id], "b")
        capped = await journal.claim_capped(
            [items[1].jobs[0].id], "b", {items[1].jobs[0].id: [Cap("shop", 1)]}
        )
        taker = Taker(room=1)
        journal.starter = taker
        started = new_event()
        await journal.ingest(started)
        journal.starter = None
        claims = [*alone, *capped.claimed, *taker.started]
        assert [c.job.id for c in claims] == [
            items[0].jobs[0].id,
            items[1].jobs[0].id,
            started.jobs[0].id,
        ]
        assert all(c.claim and c.claim == journal._tokens[c.job.id] for c in claims)

        # A worker pool on the journal runs the queued job; the source has no action by that
        # name, so the outcome is dead, and recorded only under the claim it names.
        cfg = make_config(tmp_path)
        pool = WorkerPool(config=cfg, journal=journal, actions={}, boot_id="b", clock=clock)
        seen: list[tuple[Claimed, Finished]] = []
        pool.on_finish.append(lambda claimed, _, outcome: seen.append((claimed, outcome)))
        await pool.run_until_idle()
        [(claimed, outcome)] = seen
        assert claimed.job.id == items[2].jobs[0].id
        assert claimed.claim and outcome.claim == claimed.claim
        assert (await _history(journal, items[2]))[:2] == (JobState.DEAD, 1)


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


async def test_pg_a_transaction_whose_connection_the_server_ended_is_said_as_lost(
    pg_url: str,
) -> None:
    """The server ending a write's connection mid-transaction (a restart, an administrator's
    pg_terminate_backend) is the first line of an outage and of the worker's error: it said
    "cannot call Transaction.__aexit__(): the underlying connection is closed", which reads as
    a bug of the daemon's. It says what it means."""
    admin = await asyncpg.connect(pg_url)
    try:
        async with node(pg_url, ManualClock(START)) as journal:

            async def ended(conn: Any) -> None:
                await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())

                async def closed() -> bool:
                    return bool(conn.is_closed())

                await poll(closed, timeout_s=10)

            with pytest.raises(JournalUnavailable) as err:
                await journal._write(ended)
    finally:
        await admin.close()
    assert str(err.value) == "journal write failed: connection to the database lost"


async def test_pg_a_url_the_driver_cannot_read_is_a_journal_error_that_shows_no_password() -> None:
    """A URL that got past the config's checks but not the driver's parser (what the CLI and
    ``serve`` would have shown as a traceback) is one line naming the journal, password masked;
    a timeout, whose own text is empty, says what it was."""
    with pytest.raises(JournalError) as err:
        async with PostgresJournal("postgresql://wh:Zq9secret@db:notaport/wh"):
            pass
    assert str(err.value) == (
        "cannot open journal PostgreSQL wh:***@db:notaport/wh: its URL cannot be read"
    )
    assert db_error(TimeoutError()) == "no answer in time"
    assert (
        db_error(ConnectionRefusedError(111, "Connection refused"))
        == "[Errno 111] Connection refused"
    )


async def test_pg_a_lock_held_by_a_frozen_node_costs_a_write_its_lock_timeout_not_for_ever(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose host froze mid-commit leaves its transaction open, holding the dedup row of
    a webhook the provider then retries elsewhere. That write gives up after the lock timeout
    (a 503 the provider retries) instead of holding every webhook of the node behind it, and
    the next group commits."""
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_S", 1)
    async with PostgresJournal(pg_url, lease_s=30) as j:
        frozen = await asyncpg.connect(pg_url)
        try:
            tx = frozen.transaction()
            await tx.start()
            await frozen.execute(
                "INSERT INTO dedup (key, event_id, created_at) VALUES ('shop:D-1', 'evt_A', 0)"
            )
            with pytest.raises(JournalUnavailable, match="lock timeout"):
                await asyncio.wait_for(j.ingest(new_event(key="shop:D-1")), 30)
            assert j.last_write_error is not None  # /readyz says so meanwhile
            other = await asyncio.wait_for(j.ingest(new_event()), 30)
            assert other.duplicate is False and j.last_write_error is None
            await tx.rollback()
        finally:
            await frozen.close()


class HangingHop:
    """A TCP hop in front of the test's server that can hang as a stuck PgBouncer does: its
    connections stay open, and while ``flowing`` is clear nothing passes either way (new
    connections are taken, and then hear nothing either)."""

    def __init__(self, url: str, hang_on: bytes | None = None) -> None:
        self.target = urlsplit(url)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.hang_on = hang_on  # hang once a client sends these bytes (a statement's text)
        # Once a client sends these bytes, pass them on and cut that client off before the
        # server's answer reaches it: a commit made that its client never hears of.
        self.lose_answer_to: bytes | None = None
        self.taken = 0  # connections taken so far
        self.took = asyncio.Event()  # set at each one
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen; returns the target's URL with this hop's address in it."""
        self._server = await asyncio.start_server(self._take, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        user = self.target.netloc.rsplit("@", 1)[0]
        return urlunsplit(self.target._replace(netloc=f"{user}@127.0.0.1:{port}"))

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.taken += 1
        self.took.set()
        up_reader, up_writer = await asyncio.open_connection(self.target.hostname, self.target.port)

        answer_lost = asyncio.Event()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.hang_on is not None and self.hang_on in data:
                        self.flowing.clear()
                    await self.flowing.wait()
                    if answer_lost.is_set():
                        return  # the server's answer, dropped
                    cut = self.lose_answer_to
                    lost = src is reader and cut is not None and cut in data
                    if lost:
                        self.lose_answer_to = None
                        answer_lost.set()
                    dst.write(data)
                    await dst.drain()
                    if lost:
                        writer.transport.abort()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        for task in (
            asyncio.create_task(pump(reader, up_writer)),
            asyncio.create_task(pump(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_pg_a_pooler_that_hangs_fails_each_call_in_its_deadline_not_for_ever(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooler (or anything between node and server) that keeps its connections open and
    stops answering is not seen by TCP keepalive: every write, read and heartbeat waited on
    it for ever, and the node, its writer stuck, still said it was ready. Each use of a
    connection is now cut after the answer deadline: the call fails (a 503 for a webhook),
    the outage shows on ``/readyz``, and once the path answers again fresh connections carry
    on."""
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 1)
    hop = HangingHop(pg_url)
    url = await hop.start()
    try:
        async with PostgresJournal(url, lease_s=30) as journal:
            assert (await journal.ingest(new_event())).duplicate is False
            no_answer = "no answer from the database in 1 s"
            with pytest.raises(TimeoutError, match=no_answer):
                async with journal.pool.acquire() as conn:
                    hop.flowing.clear()  # with a query of this connection's on its way
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), 30)
            with pytest.raises(JournalUnavailable, match=f"journal write failed: {no_answer}"):
                await asyncio.wait_for(journal.ingest(new_event()), 30)
            assert journal.last_write_error == no_answer  # /readyz: not ready
            with pytest.raises(JournalUnavailable, match=f"heartbeat failed: {no_answer}"):
                await asyncio.wait_for(journal.heartbeat(), 30)
            with pytest.raises(JournalUnavailable, match=f"read failed: {no_answer}"):
                await asyncio.wait_for(journal.backlog(), 30)
            hop.flowing.set()
            ingested = await asyncio.wait_for(journal.ingest(new_event()), 30)
            assert ingested.duplicate is False and journal.last_write_error is None
            assert await journal.backlog() == 2
    finally:
        await hop.close()


async def test_pg_a_node_behind_a_hung_pooler_says_not_ready_then_carries_on(
    tmp_path: Path,
    pg_url: str,
    run_daemon: Any,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same hang under a running daemon: a webhook gets a 503 (never a false 2xx),
    ``/readyz`` turns 503 so a load balancer sends the node nothing more, and once the path
    answers again the node takes webhooks and runs their jobs without a restart. Before the
    deadline the writer waited on the hung connection and ``/readyz`` stayed 200."""
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 1)
    async with _daemon_behind_a_hop(tmp_path, pg_url, run_daemon, target) as (running, hop):
        http, admin = running.http, running.admin_url

        async def readyz(want: int) -> bool:
            async with http.get(admin + "/readyz") as r:
                return r.status == want

        hop.flowing.clear()
        status, doc = await running.post("/hooks/shop", '{"n": 2}')
        assert status == 503 and "error" in doc
        await poll(lambda: readyz(503), timeout_s=30)
        hop.flowing.set()
        await poll(lambda: readyz(200), timeout_s=30)
        await event_state(http, admin, await accepted(running, "shop", '{"n": 3}'), "done")


@contextlib.asynccontextmanager
async def _daemon_behind_a_hop(
    tmp_path: Path, pg_url: str, run_daemon: Any, target: Target, journal: str = ""
) -> AsyncIterator[tuple[Running, HangingHop]]:
    """A daemon whose journal it reaches through a ``HangingHop``, its first webhook done; at
    the end the hop flows again, the daemon is stopped and the hop closed."""
    hop = HangingHop(pg_url)
    url = await hop.start()
    cfg = make_config(
        tmp_path, forward_source("shop", target.url + "/shop"), journal_url=url, journal=journal
    )
    running = await run_daemon(cfg)
    try:
        http, admin = running.http, running.admin_url
        await event_state(http, admin, await accepted(running, "shop", '{"n": 1}'), "done")
        yield running, hop
    finally:
        hop.flowing.set()
        await running.stop()
        await hop.close()


async def test_pg_reads_of_the_admin_api_answer_in_seconds_while_the_database_hangs(
    tmp_path: Path,
    pg_url: str,
    run_daemon: Any,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each use of a connection waits up to the answer deadline (a minute), so /stats, the
    dashboard's reads and /metrics hung that long on a database that stopped answering: a
    scrape timed out (the node looked down, never webhookd_journal_up 0). They now answer
    within ADMIN_READ_S: /stats a 503, /metrics its own counters with webhookd_journal_up 0;
    and the heartbeat, cut after two heartbeats' time, makes /readyz say so meanwhile."""
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 30)
    monkeypatch.setattr(admin_mod, "ADMIN_READ_S", 0.5)
    monkeypatch.setattr(metrics_mod, "ADMIN_READ_S", 0.5)
    hop_config = (tmp_path, pg_url, run_daemon, target, "lease_s = 3")
    async with _daemon_behind_a_hop(*hop_config) as (running, hop):
        http, admin = running.http, running.admin_url
        hop.flowing.clear()
        for path in ("/stats", "/events"):
            started = time.monotonic()
            async with http.get(admin + path) as r:
                assert (r.status, (await r.json())["error"]) == (
                    503,
                    "no answer from the journal in 0.5 s",
                ), path
            assert time.monotonic() - started < 10, path
        started = time.monotonic()
        async with http.get(admin + "/metrics") as r:
            assert r.status == 200 and "\nwebhookd_journal_up 0.0\n" in await r.text()
        assert time.monotonic() - started < 10

        async def not_ready() -> bool:  # the heartbeat's cut: 5 s, not the 30 s deadline
            async with http.get(admin + "/readyz") as r:
                return r.status == 503

        started = time.monotonic()
        await poll(not_ready, timeout_s=25)
        assert time.monotonic() - started < 20


async def test_pg_a_transaction_a_frozen_node_left_open_is_ended_by_the_server(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node frozen between two statements of its write (a VM paused, a host lost) has its
    transaction ended by the server after the idle-in-transaction timeout, and its locks with
    it: another node's write of the same delivery then goes through."""
    monkeypatch.setattr(postgres, "IDLE_IN_TRANSACTION_S", 1)
    async with PostgresJournal(pg_url, lease_s=30) as a, PostgresJournal(pg_url, lease_s=30) as b:
        never = asyncio.Event()

        async def freezes(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO dedup (key, event_id, created_at) VALUES ('shop:D-2', 'evt_A', 0)"
            )
            await never.wait()  # frozen between statements

        stuck = asyncio.create_task(a._write(freezes))
        try:
            ingested = await asyncio.wait_for(b.ingest(new_event(key="shop:D-2")), 30)
        finally:
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError, JournalUnavailable):
                await stuck
    assert ingested.duplicate is False  # A's row went with its transaction


async def test_pg_after_an_outage_a_node_recovers_others_only_once_up_for_a_whole_lease(
    pg_url: str,
) -> None:
    """After an outage longer than lease_s every heartbeat is stale at once: the first node
    back does not take the others' jobs (they are alive and run them) until it has itself been
    up a whole lease, time in which they heartbeat again."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as j:
        await j.heartbeat()
        assert not j._settled()  # just started: not up a whole lease yet
        clock.advance(LEASE_S)
        assert j._settled()
        j.went_down(OSError("connection refused"))
        assert not j._settled()
        clock.advance(2 * LEASE_S)  # the outage
        await j.heartbeat()  # back
        assert not j._settled()
        clock.advance(LEASE_S - 1)
        assert not j._settled()
        clock.advance(1)
        assert j._settled()


async def test_pg_a_node_started_as_the_database_comes_back_leaves_live_nodes_their_jobs(
    pg_url: str,
) -> None:
    """A node (re)started as the database comes back from an outage longer than lease_s takes
    the expired leader lease, and every live node's heartbeat is stale: its start-up recovery
    re-queues only a stopped node's job, and leaves a silent one's to the lease loop, by when
    the live node has heartbeat again."""
    clock = ManualClock(START)
    async with node(pg_url, clock) as live:
        running, left = new_event(), new_event()
        await live.ingest(running)
        await live.ingest(left)
        assert len(await live.claim([running.jobs[0].id], "boot_live")) == 1
        assert await live.lead()
        async with node(pg_url, clock) as stopped:  # stops with a job running: no row left
            assert len(await stopped.claim([left.jobs[0].id], "boot_stopped")) == 1
        live.went_down(OSError("connection refused"))
        clock.advance(2 * LEASE_S)  # the outage: no node writes
        async with node(pg_url, clock) as starting:
            recovery = await starting.recover("boot_starting", 3)
            await live.heartbeat()  # a moment after the start
            assert (recovery.requeued, recovery.dead) == (1, 0)
            states = [(await live.get_event(i.event.id)).jobs[0].state for i in (running, left)]
            assert states == [JobState.RUNNING, JobState.QUEUED]
            clock.advance(LEASE_S)  # the lease loop's turn: the live node has heartbeat
            await starting.heartbeat()
            assert starting._settled() and (await starting.recover_lost()).requeued == 0


# A lock held past lease_s, by where it catches the nodes: its table, the statements the test
# sees waiting on it (they begin so), and how many.
_LOCKS_HELD = {
    "jobs-every-lease-loop": ("jobs", BACKLOG_SQL, 2),
    "nodes-every-heartbeat": ("nodes", "INSERT INTO nodes ", 2),
    "jobs-the-leaders-recovery": ("jobs", _LOST_COLUMNS, 1),
    "nodes-the-leaders-recovery": ("nodes", _LOST_COLUMNS, 1),
}


@pytest.mark.parametrize("where", list(_LOCKS_HELD))
async def test_pg_a_lock_held_past_the_lease_costs_no_live_node_its_running_job(
    pg_url: str, where: str
) -> None:
    """A lock held past lease_s (``VACUUM FULL``, ``LOCK TABLE``, a newer node's migration).

    On ``jobs``: it held every node's lease loop, the heartbeat with it, though ``nodes`` was
    free; once it went, the node that took the lead (the leader's lease had run out meanwhile)
    re-queued the live node's running job before that node heartbeat again, so the job ran
    twice. The heartbeat now has a task and a connection of its own, and goes on.

    On ``nodes``: every node's heartbeat waits. A node whose own heartbeat was held up past a
    sixth of a lease waits a lease, as after an outage, before it takes any node's silence
    for its loss: the live node heartbeats again meanwhile.

    Taken as the leader's recovery begins, its statement waits behind the lock and runs the
    moment the lock goes, before any heartbeat: it judges silence as of when it began.

    Each lock is let go only once what it holds is seen waiting on it (``pg_locks``) for
    longer than a lease: the live node's last heartbeat before it is then stale."""
    table, waits, count = _LOCKS_HELD[where]
    at_recovery = waits == _LOST_COLUMNS
    lease_s = 3.0
    async with PostgresJournal(pg_url, lease_s=lease_s, heartbeat_s=0.5) as first:

        async def leads_settled() -> bool:
            return first.leads() and first._settled()

        await poll(leads_settled, timeout_s=30)
        async with PostgresJournal(pg_url, lease_s=lease_s, heartbeat_s=0.5) as live:
            item = new_event()
            await live.ingest(item)
            job_id = item.jobs[0].id
            assert len(await live.claim([job_id], "boot_live")) == 1
            holder, watch = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
            held = holder.transaction()
            locked = asyncio.Event()

            async def lock() -> None:
                await held.start()
                await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                locked.set()

            if at_recovery:  # taken by the leader's next recovery, as it begins
                recover_lost = first.recover_lost

                async def locking(**kw: Any) -> Recovery:
                    if not locked.is_set():
                        await lock()
                    return await recover_lost(**kw)

                first.recover_lost = locking  # type: ignore[method-assign]
            released = False
            after: asyncio.Future[Recovery] = asyncio.get_running_loop().create_future()

            def watch_recoveries(journal: PostgresJournal) -> None:
                """Whichever node leads once the lock has gone: its first recovery then."""
                recover_lost = journal.recover_lost

                async def watched(**kw: Any) -> Recovery:
                    began_after = released
                    recovery = await recover_lost(**kw)
                    if began_after and not after.done():
                        after.set_result(recovery)
                    return recovery

                journal.recover_lost = watched  # type: ignore[method-assign]

            watch_recoveries(first)
            watch_recoveries(live)

            async def held_past_the_lease() -> bool:
                waited = await watch.fetch(
                    "SELECT EXTRACT(epoch FROM clock_timestamp() - l.waitstart)"
                    " FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
                    " WHERE NOT l.granted AND $1 = ANY(pg_blocking_pids(a.pid))"
                    " AND starts_with(a.query, $2)",
                    holder.get_server_pid(),
                    waits,
                )
                seconds = [float(r[0]) for r in waited if r[0] is not None]
                return len(seconds) == count and min(seconds) > lease_s + 0.25

            try:
                if not at_recovery:
                    await lock()
                await asyncio.wait_for(locked.wait(), 30)
                await poll(held_past_the_lease, timeout_s=30)
                await held.commit()
                released = True
            finally:
                await holder.close()
                await watch.close()
            recovery = await asyncio.wait_for(after, 30)  # the first look since
            job = (await live.get_event(item.event.id)).jobs[0]
            assert (recovery.requeued, job.state, job.history, job_id in live._tokens) == (
                0,
                JobState.RUNNING,
                (),
                True,
            )


async def test_pg_after_an_outage_the_leader_waits_out_the_longest_lease_of_any_node(
    pg_url: str,
) -> None:
    """A node of a longer lease heartbeats within it, not within the leader's: the first node
    back from an outage waits that longest lease before it takes any node's silence for its
    loss (with 3 s against a node of 30 s, it re-queued the live node's jobs)."""
    clock = ManualClock(START)
    async with _long_lease_running_a_job(pg_url, clock) as (long, short):
        await long.heartbeat()
        await short.heartbeat()
        short.went_down(OSError("connection refused"))
        clock.advance(60)  # the outage: both silent
        await short.heartbeat()  # back first
        await short.compare_configs()  # the lease loop's look at the others
        clock.advance(4)
        assert not short._settled()  # up a lease of its own, not the longest
        clock.advance(26)
        assert short._settled()


async def test_pg_a_lane_change_made_after_waiting_for_its_row_is_stamped_when_made(
    pg_url: str,
) -> None:
    """A reservation that waits for the lane's row (another node's reservation holds it, or
    the pool has no connection free) is logged when it is granted, not when it was asked for:
    stamped d seconds early it would leave the shared log d seconds early, and a 60 s window
    could hold more than rpm. A cool-down and a circuit's next probe count from then too."""
    clock = ManualClock(START)
    spec = LaneSpec("gpt", 60, None, 60.0, SHARED_LOG_S, 30.0)
    async with node(pg_url, clock) as j:
        await j.reserve_lane(spec, need=(1, 0), want=(1, 0))  # the row exists
        holder, watch = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)

        async def held_up(change: Awaitable[Any]) -> Any:
            """``change`` while another session holds the lane's row for 5 s (of the clock)."""
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM lanes WHERE name = 'gpt' FOR UPDATE")
                waiting = asyncio.ensure_future(change)
                await poll(lambda: _blocked_by(watch, holder), timeout_s=10)
                clock.advance(5)
            return await asyncio.wait_for(waiting, 10)

        try:
            grant = await held_up(j.reserve_lane(spec, need=(1, 0), want=(1, 0)))
            await held_up(j.cool_lane(spec, 10))
            await held_up(j.set_lane_circuit(spec, "HTTP 500"))
        finally:
            await holder.close()
            await watch.close()
        [row] = await j.fetch("SELECT log_at, cooling_until, probe_at FROM lanes")
    assert (grant.requests, grant.at, max(row[0])) == (1, START + 5, START + 5)
    assert (row[1], row[2]) == (START + 10 + 10, START + 15 + 30)


async def test_pg_two_nodes_never_run_two_jobs_of_one_order_key_at_once(pg_url: str) -> None:
    """Seqs are taken at insert and seen at commit: a claim whose snapshot predates an older job
    of the key, and one that sees it, each found its job at the head. The pool claims an
    ordered job under its key's cap (one running), whose lock puts the two claims in turn, so
    the second sees the first's job running. A trigger holds the first claim open to make the
    interleaving certain."""
    ready: dict[str, Ready] = {}
    async with (
        PostgresJournal(pg_url, lease_s=30) as b,
        PostgresJournal(pg_url, lease_s=30) as c,
        PostgresJournal(pg_url, lease_s=30) as d,
    ):
        raw = await asyncpg.connect(pg_url)
        try:
            older = new_event(order_key="customer-42")
            newer = new_event(order_key="customer-42")
            await raw.execute(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                f" IF NEW.state = 'running' AND NEW.id = '{newer.jobs[0].id}' THEN"
                " PERFORM pg_sleep(1); END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER slow BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION slow()"
            )
            for item in (older, newer):
                job = item.jobs[0]
                ready[job.id] = Ready(job.id, "shop", job.action, 1, "t1", "customer-42", 0)
            # A's group commit in flight: the older job's seq is taken, its commit not made.
            tx = raw.transaction()
            await tx.start()
            await write_ingests(raw, [IngestOp(asyncio.Future(), older)], START)
            await b.ingest(newer)  # B's commit lands first, with the later seq

            def claim(node: PostgresJournal, item: NewEvent) -> Awaitable[CapClaim]:
                job_id = item.jobs[0].id
                caps = {job_id: (order_cap(ready[job_id]),)}
                return node.claim_capped([job_id], f"boot_{id(node)}", caps)

            first = asyncio.ensure_future(claim(c, newer))  # its snapshot has no older job

            async def first_held_open() -> bool:
                return bool(
                    await b.pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    )
                )

            await poll(first_held_open, timeout_s=10)  # state in another server process
            await tx.commit()  # A's commit lands while the first claim is held open
            second = await claim(d, older)
            got = await first
        finally:
            await raw.close()
    assert [x.job.id for x in got.claimed] == [newer.jobs[0].id]
    assert second.claimed == []


async def _waiting_on_a_lock(pool: Any) -> bool:
    return bool(
        await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    )


async def _released(journal: PostgresJournal, url: str, job_id: str) -> None:
    """No mark stands in the database, and a refill offers ``job_id`` (its key's head now)."""
    assert await marked_behind(Store("postgres", url, ManualClock(START))) == set()
    lane = (int(Priority.NORMAL), "shop", "t1")
    assert [r.id for r in await journal.ready_in_lanes(2e9, [(lane, 5)])] == [job_id]


async def test_pg_an_ingest_behind_a_head_whose_finish_is_in_flight_is_not_marked(
    pg_url: str,
) -> None:
    """Another node is recording the key's head as done, its commit not yet made. An ingest of
    the key's next job reads the head as unfinished; marked behind it, the job would never be
    released (the finish saw no job behind). The insert skips a head being written instead:
    not marked, and offered once the finish lands."""
    head, later = new_event(order_key="k"), new_event(order_key="k")
    async with PostgresJournal(pg_url, lease_s=30) as journal:
        await journal.ingest(head)
        raw = await asyncpg.connect(pg_url)
        try:
            tx = raw.transaction()
            await tx.start()
            await raw.execute(
                "UPDATE jobs SET state = 'done', finished_at = $1 WHERE id = $2",
                START,
                head.jobs[0].id,
            )
            await asyncio.wait_for(journal.ingest(later), 10)  # does not wait for the finish
            await tx.commit()
        finally:
            await raw.close()
        await _released(journal, pg_url, later.jobs[0].id)


async def _finish_head_while_an_ingest_behind_it_is_open(url: str) -> None:
    """Another node's group commit holds a job marked behind the key's head, its commit not
    yet made, while the head's finish runs: the finish waits for that commit (the mark's share
    lock on the head), then releases the job."""
    head, later = new_event(order_key="k"), new_event(order_key="k")
    async with PostgresJournal(url, lease_s=30) as journal:
        await journal.ingest(head)
        await journal.claim([head.jobs[0].id], "b")
        raw = await asyncpg.connect(url)
        try:
            tx = raw.transaction(isolation="read_committed")
            await tx.start()
            await write_ingests(raw, [IngestOp(asyncio.Future(), later)], START)
            done = asyncio.ensure_future(
                journal.finish([finished(head.jobs[0].id, JobState.DONE, "done")])
            )
            await poll(lambda: _waiting_on_a_lock(journal.pool), timeout_s=10)
            assert not done.done()
            await tx.commit()
            await asyncio.wait_for(done, 10)
        finally:
            await raw.close()
        await _released(journal, url, later.jobs[0].id)


async def test_pg_a_heads_finish_waits_for_an_ingest_marked_behind_it_then_releases_it(
    pg_url: str,
) -> None:
    """The head's finish cannot see the job another node's open commit marks behind it: it
    waits for that commit, then releases the job."""
    await _finish_head_while_an_ingest_behind_it_is_open(pg_url)


async def test_pg_writes_run_at_read_committed_whatever_the_databases_default(
    pg_url: str,
) -> None:
    """The same with a database whose default isolation is REPEATABLE READ: the finish's
    trigger, reading with a snapshot taken before the ingest it waited for committed, left
    the mark standing alone for ever. The journal's writes ask for READ COMMITTED."""
    admin = await asyncpg.connect(pg_url)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(
            f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
        )
    finally:
        await admin.close()
    await _finish_head_while_an_ingest_behind_it_is_open(pg_url)


async def test_pg_two_nodes_ingesting_behind_the_heads_the_other_ends_do_not_deadlock(
    pg_url: str,
) -> None:
    """Node A's group commit ingests behind key k's head and ends key j's; node B's the mirror.
    Ingests first, each held a share lock on the head the other was ending, and PostgreSQL
    broke the deadlock by failing one (a 503 for its webhooks, after a second). A group commit
    writes outcomes first, and an ingest's share locks come last, after which it waits on
    nothing. A trigger holds A's commit open just after its ingest, to make the interleaving
    certain."""
    hk, hj = new_event(order_key="k"), new_event(order_key="j")
    lk, lj = new_event(order_key="k"), new_event(order_key="j")
    async with PostgresJournal(pg_url, lease_s=30) as journal:
        for item in (hk, hj):
            await journal.ingest(item)
        claims = {
            c.job.id: c.claim for c in await journal.claim([hk.jobs[0].id, hj.jobs[0].id], "b")
        }

        def ends(item: NewEvent) -> Finished:
            job_id = item.jobs[0].id
            return finished(job_id, JobState.DONE, "done", claim=claims[job_id])

        a, b = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
        try:
            await a.execute(
                "CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " PERFORM pg_sleep(1); RETURN NULL; END $$;"
                " CREATE TRIGGER hold AFTER INSERT ON jobs FOR EACH ROW"
                f" WHEN (NEW.id = '{lk.jobs[0].id}') EXECUTE FUNCTION hold()"
            )
            ta, tb = a.transaction(), b.transaction()
            await ta.start()
            await tb.start()

            def group(conn: Any, ingest: NewEvent, end: NewEvent) -> Awaitable[Any]:
                f = ends(end)
                return write_group(
                    conn,
                    [IngestOp(asyncio.Future(), ingest)],
                    [f],
                    [f.claim],
                    START,
                    frozenset(),
                    ("", "", 0.0),
                )

            first = asyncio.ensure_future(group(a, lk, hj))

            async def a_held() -> bool:
                return bool(
                    await journal.pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
                    )
                )

            await poll(a_held, timeout_s=10)
            second = asyncio.ensure_future(group(b, lj, hk))
            await first
            await ta.commit()
            await asyncio.wait_for(second, 10)
            await tb.commit()
        finally:
            await a.close()
            await b.close()
        assert await marked_behind(Store("postgres", pg_url, ManualClock(START))) == set()


async def test_pg_an_ingest_behind_a_queue_of_its_key_leaves_the_head_to_be_claimed(
    pg_url: str,
) -> None:
    """An ingest marked behind its key share-locks an older unfinished job until it commits;
    a claim skips a locked row. It locks the key's newest, so a claim of the head, on another
    node meanwhile, still gets it (with the head alone before it, it is the head: that claim
    waits for the next look)."""
    head, second, later = (new_event(order_key="k") for _ in range(3))
    async with PostgresJournal(pg_url, lease_s=30) as journal:
        for item in (head, second):
            await journal.ingest(item)
        raw = await asyncpg.connect(pg_url)
        try:
            tx = raw.transaction()
            await tx.start()
            await write_ingests(raw, [IngestOp(asyncio.Future(), later)], START)
            got = await journal.claim([head.jobs[0].id], "b")
            await tx.commit()
        finally:
            await raw.close()
        assert [c.job.id for c in got] == [head.jobs[0].id]


async def test_pg_connections_probe_a_silent_path_with_tcp_keepalive(pg_url: str) -> None:
    """Every pooled connection has TCP keepalive on, with short probes: a path to the server
    that goes silent (a failover to another address, a NAT dropping the flow, a frozen host)
    ends the connection in seconds instead of leaving a write or a heartbeat waiting for ever.
    (asyncpg has no option for it: the journal sets the socket's options itself.)"""
    async with PostgresJournal(pg_url, lease_s=30) as j, j.pool.acquire() as conn:
        sock = conn._con._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == db.KEEPALIVE_IDLE_S
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == db.KEEPALIVE_COUNT
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == (
            db.TCP_USER_TIMEOUT_MS
        )


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(90)
async def test_pg_a_stop_while_the_database_hangs_ends_within_its_budget_saying_why(
    tmp_path: Path, pg_url: str, procs: Procs
) -> None:
    """A SIGTERM while the database hangs: each write of the close waited out the minute's
    answer deadline, and the stop took 105 s, past the shipped unit's TimeoutStopSec=40 (a
    SIGKILL, with no word of why). ``webhookd serve`` now exits within ack_timeout_s + 1 +
    shutdown_grace_s + STOP_MARGIN_S of the drain's start, exit 1, saying so."""
    hop = HangingHop(pg_url)
    url = await hop.start()
    config = tmp_path / "webhookd.toml"
    config.write_text(
        config_text(
            f'url = "{url}"',
            '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n',
            server="ack_timeout_s = 1",
            workers="shutdown_grace_s = 0",
        )
    )
    try:
        daemon = await procs.serve(config)
        hop.flowing.clear()
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout_s=60) == 1
        took = time.monotonic() - started
        budget = 1 + 1 + 0 + STOP_MARGIN_S
        assert budget - 1 < took < budget + 5, took
        said = "stop took longer than 12s (a step of the start or the close did not end"
        assert any(said in line for line in daemon.lines), daemon.log
    finally:
        hop.flowing.set()
        await hop.close()


@pytest.mark.parametrize("journal", ["sqlite", "postgres"])
async def test_a_sender_made_key_of_3_kb_is_kept_as_its_digest_and_fails_no_commit(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    run_daemon: Any,
    target: Target,
    journal: str,
) -> None:
    """A dedup key, tenant and order key of 3,000 characters (a sender's ``id``): PostgreSQL
    refuses index entries over 2,704 bytes, and the refusal failed the group commit the
    webhook shared with others, 503 for all. Kept as their digests, every webhook is taken,
    the long one dedups, and its tenant is found as sent."""
    source = f"""
[sources.shop]
dedup = "json:id"
tenant = "json:t"
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/in"
ordered_by = "json:id"
"""
    async with contextlib.AsyncExitStack() as stack:
        url = None
        if journal == "postgres":
            server = request.getfixturevalue("pg_server_url")
            url = await stack.enter_async_context(fresh_database(server))
        running = await run_daemon(make_config(tmp_path, source, journal_url=url))
        long = secrets.token_hex(1500)  # random: PostgreSQL compresses a repeated one
        bodies = [json.dumps({"id": long, "t": long}), *(json.dumps({"id": n}) for n in range(5))]
        answers = await asyncio.gather(*(running.post("/hooks/shop", b) for b in bodies))
        assert [status for status, _ in answers] == [202] * 6, answers
        again = await running.post("/hooks/shop", bodies[0])
        assert again == (200, {"id": answers[0][1]["id"], "duplicate": True})
        doc = await event_state(running.http, running.admin_url, answers[0][1]["id"], "done")
        assert doc["dedup_key"].startswith("shop:sha256:") and len(doc["dedup_key"]) < 80
        async with running.http.get(
            f"{running.admin_url}/events", params={"tenant": long, "limit": "5"}
        ) as r:
            assert [e["id"] for e in (await r.json())["events"]] == [answers[0][1]["id"]]
        assert await running.stop() == 0  # before its database is dropped


def _as_owner(*args: str) -> list[str]:
    """``args`` as the server's owner runs them (``postgres`` when the tests run as root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@dataclass
class Standby:
    """A streaming standby that ``hot_standby`` started: its URL (its server's path), and a
    stop and a start, to take it away from its primary and bring it back."""

    url: str
    pg_ctl: list[str]  # pg_ctl -D its folder, as the server's owner
    options: str

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-o", self.options, "start"], check=True, capture_output=True)


@contextlib.contextmanager
def hot_standby(
    server_url: str, home: Path | None = None, name: str | None = None
) -> Iterator[Standby]:
    """A streaming standby of the server at ``server_url`` (pg_basebackup -R), on a port of its
    own, beside the server in ``home`` (by default the test server's); ``name`` is its
    ``cluster_name``, the name ``synchronous_standby_names`` knows it by. Stopped and deleted
    afterwards."""
    home = home or Path(os.environ["WEBHOOKD_TEST_PG_DIR"])
    bin_dir = Path((home / "bin").read_text().strip())
    data = home / f"standby-{secrets.token_hex(4)}"
    parts = urlsplit(server_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        _as_owner(
            str(bin_dir / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(parts.port), "-U", "postgres"),
            *("-D", str(data), "-R", "-X", "stream", "-c", "fast"),
        ),
        check=True,
        capture_output=True,
    )
    # A standby must allow at least as many connections as its primary (.ci/postgres.sh: 200).
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {home} -c max_connections=500"
    if name is not None:
        options += f" -c cluster_name={name}"
    pg_ctl = _as_owner(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", f"{data}.log", "-w")
    standby = Standby(
        urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}")), pg_ctl, options
    )
    try:
        standby.start()
        yield standby
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", str(data), f"{data}.log"], check=False)


async def test_pg_a_node_on_a_standby_is_refused_and_the_cli_reads_it(
    pg_server_url: str, pg_url: str
) -> None:
    """A node pointed at a hot standby by mistake was refused with "cannot execute CREATE
    TABLE in a read-only transaction", and every verb the same, so that an operator could not
    look at a replica before promoting it."""
    async with PostgresJournal(pg_url, heartbeat_s=3600) as primary:
        item = new_event()
        await primary.ingest(item)
    name = urlsplit(pg_url).path
    with hot_standby(pg_server_url) as standby_server:
        standby = urlunsplit(urlsplit(standby_server.url)._replace(path=name))

        async def replayed() -> bool:
            with contextlib.suppress(*DB_ERRORS):
                conn = await asyncpg.connect(standby)
                try:
                    return bool(await conn.fetchval("SELECT count(*) FROM events"))
                finally:
                    await conn.close()
            return False

        await poll(replayed, timeout_s=30, interval_s=0.1)
        with pytest.raises(JournalError, match=r"is a standby \(read-only, in recovery\): point"):
            async with PostgresJournal(standby, node=True):
                pass
        async with PostgresJournal(standby, node=False) as reader:
            assert (await reader.get_event(item.event.id)).event == item.event


STANDBY_NAME = "webhookd_standby"
SYNC_NAMES = f"FIRST 1 ({STANDBY_NAME})"


@pytest.fixture
async def sync_standby() -> AsyncIterator[tuple[str, Standby]]:
    """A server of the test's own whose commits wait for a synchronous standby (named in
    ``synchronous_standby_names``), and that standby: yields a fresh database's URL on the
    server and the standby, to stop (every commit then waits) and start again."""
    with own_pg_server() as (server_url, home), hot_standby(server_url, home, STANDBY_NAME) as sb:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{SYNC_NAMES}'")
            await admin.execute("SELECT pg_reload_conf()")

            async def synchronous() -> bool:
                return bool(
                    await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_replication"
                        " WHERE application_name = $1 AND sync_state = 'sync'",
                        STANDBY_NAME,
                    )
                )

            await poll(synchronous, timeout_s=30, interval_s=0.1)
            await admin.execute("CREATE DATABASE webhookd_sync")
        finally:
            await admin.close()
        yield urlunsplit(urlsplit(server_url)._replace(path="/webhookd_sync")), sb


async def _backends(admin: asyncpg.Connection) -> tuple[int, int, set[int]]:
    """The database's backends but ``admin``'s: how many, how many wait for a synchronous
    standby, and the ids of those running a statement (waiting, or at work)."""
    rows = await admin.fetch(
        "SELECT pid, state, wait_event FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return (
        len(rows),
        sum(r["wait_event"] == "SyncRep" for r in rows),
        {r["pid"] for r in rows if r["state"] == "active"},
    )


def _held_pids(*journals: PostgresJournal) -> set[int]:
    """The server process ids of every connection the journals' pools hold (the heartbeat's
    too)."""
    return {
        h._con.get_server_pid()
        for j in journals
        for pool in (j.pool, j._beat_pool)
        if pool is not None
        for h in pool.raw._holders
        if h._con is not None and not h._con.is_closed()
    }


async def test_pg_while_a_synchronous_standby_is_away_a_node_holds_no_more_backends_than_its_pool(
    sync_standby: tuple[str, Standby],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the synchronous standby is away every commit waits for it. A heartbeat or write cut
    at its deadline had its connection terminated, and its backend stayed on the server, waiting
    (a backend waiting for a standby or a lock does not see its client go), while the pool
    opened another: two nodes left 14 more backends in 100 s, more all the time, until
    max_connections. The cut now cancels the statement first: the backend answers and the
    connection goes back to the pool, so every backend waiting on the server is one a pool
    holds. Each node says once that it waits for synchronous replication, naming the
    standbys, and once that it is over when the standby is back; writes cut meanwhile were not
    acknowledged."""
    url, standby = sync_standby
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 2)  # a write's cut; the heartbeat's is 5 s
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    watch = await asyncpg.connect(url)
    async with (
        PostgresJournal(url, lease_s=3) as a,
        PostgresJournal(url, lease_s=3) as b,
    ):
        assert (await a.ingest(new_event())).duplicate is False
        await asyncio.to_thread(standby.stop)
        cut: list[NewEvent] = []

        async def ingest_cut(journal: PostgresJournal) -> None:
            item = new_event()
            with pytest.raises(JournalUnavailable, match="waiting for synchronous replication"):
                await journal.ingest(item)
            cut.append(item)

        async def bounded_until_stalled() -> bool:
            await asyncio.gather(ingest_cut(a), ingest_cut(b))
            count, _, active = await _backends(watch)
            # Every statement running on the server is one of the pools' connections'.
            assert active <= _held_pids(a, b), (active, _held_pids(a, b))
            assert count <= 2 * (postgres.POOL_SIZE + 2)  # and the listeners and heartbeats
            said = "journal unavailable: waiting for synchronous replication: the standbys"
            return len(cut) >= 8 and _count(caplog, said) >= 2

        await poll(bounded_until_stalled, timeout_s=60, interval_s=0)
        stalled = (
            "journal unavailable: waiting for synchronous replication: the standbys named in"
            f" synchronous_standby_names ('{SYNC_NAMES}') did not confirm a commit in"
        )
        assert _count(caplog, stalled) == 2  # once per node, not once per cut statement
        assert _count(caplog, "no answer") == 0
        assert a.last_write_error is not None and "synchronous replication" in a.last_write_error
        await asyncio.to_thread(standby.start)

        async def recovered() -> bool:
            _, waiting, _ = await _backends(watch)
            again = _count(caplog, "the synchronous standbys confirm commits again")
            return waiting == 0 and again == 2

        await poll(recovered, timeout_s=30, interval_s=0.1)
        assert (await b.ingest(new_event())).duplicate is False
        # Cut, each one answered as not taken; their commits were made on the primary all the
        # same, and a provider's retry of one is now the duplicate it is.
        retried = await a.ingest(new_event(key=cut[0].event.dedup_key))
        assert (retried.duplicate, retried.event_id) == (True, cut[0].event.id)
    await watch.close()


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


async def test_pg_a_cli_change_held_by_an_absent_synchronous_standby_says_why_then_what_became(
    sync_standby: tuple[str, Standby], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`webhookd pause` while the synchronous standby was away sat silent for the answer
    deadline, said "no answer from the database", and left its backend waiting on the server,
    so that the pause took effect later, whenever the standby came back. It now says within
    seconds that it waits, and for what; at the deadline it cancels its commit's wait, exits 1
    and says that the change is made on the primary, where it now is, and no backend of its is
    left behind."""
    url, standby = sync_standby
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 4)
    monkeypatch.setattr(postgres, "CLI_WAITING_S", 1)
    config = tmp_path / "webhookd.toml"
    shop = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
    config.write_text(config_text(f'url = "{url}"', shop))
    async with PostgresJournal(url, heartbeat_s=3600):  # made, as a node makes it at its start
        pass
    watch = await asyncpg.connect(url)
    try:
        await asyncio.to_thread(standby.stop)
        out = await cli("pause", "shop", "--config", str(config))
        assert out.exit_code == 1, out.output
        waiting, failed = out.stderr.splitlines()
        assert waiting == (
            "webhookd: waiting for the database (its commit waits for synchronous replication:"
            f" the standbys named in synchronous_standby_names ('{SYNC_NAMES}') have not"
            " confirmed it); giving up after 4 s"
        )
        assert failed == (
            "webhookd: error: journal write failed: waiting for synchronous replication: the"
            f" standbys named in synchronous_standby_names ('{SYNC_NAMES}') did not confirm a"
            " commit in 4 s; the change is made on the primary all the same, and reaches the"
            " standbys once they are back (a failover to one before then loses it)"
        )
        assert await watch.fetchval("SELECT count(*) FROM paused_sources") == 1
        _, waiting_backends, _ = await _backends(watch)
        assert waiting_backends == 0
        await asyncio.to_thread(standby.start)
        out = await cli("resume", "shop", "--config", str(config))
        assert out.exit_code == 0 and out.stdout == (
            "resumed shop: the nodes start its jobs again within a second\n"
        ), out.output
    finally:
        await watch.close()


async def test_pg_a_retry_of_a_webhook_cut_while_the_synchronous_standby_is_away_waits_for_it(
    sync_standby: tuple[str, Standby], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit cut in its wait for the synchronous standby stands on the primary (the cancel
    ends the wait, not the commit), and its webhook was answered 503. The provider's retry
    found the key taken and was answered as a duplicate at once, its own commit having written
    nothing to wait for: a 2xx for a webhook no standby had, which a failover to the standby
    loses. A batch that answers a duplicate now commits as one that journals a webhook does,
    waiting for the standby: the retry gets a 503 until the standby has the webhook."""
    url, standby = sync_standby
    monkeypatch.setattr(db, "ANSWER_DEADLINE_S", 2)
    async with PostgresJournal(url, heartbeat_s=3600) as journal:
        await asyncio.to_thread(standby.stop)
        item = new_event()
        with pytest.raises(JournalUnavailable, match="waiting for synchronous replication"):
            await journal.ingest(item)
        retry = new_event(key=item.event.dedup_key)
        with pytest.raises(JournalUnavailable, match="waiting for synchronous replication"):
            await journal.ingest(retry)
        await asyncio.to_thread(standby.start)
        again = await journal.ingest(new_event(key=item.event.dedup_key))
        assert (again.duplicate, again.event_id) == (True, item.event.id)
