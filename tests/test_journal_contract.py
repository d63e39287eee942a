"""The journal contract, run against every backend: the SQLite file and PostgreSQL.

Every test here takes ``store`` (or ``journal``, opened on it) and so runs once per backend, as
huey runs one storage suite over all of its storages: a backend that fails one of these is not
done. Tests of one backend's internals live in test_journal.py (SQLite) and
test_journal_postgres.py, and say so in their names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_database
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from webhookd.clock import ManualClock
from webhookd.config import CATCH_ALL
from webhookd.errors import JournalError, NotFound
from webhookd.journal import (
    CAUSE_CHARS,
    EVENT_STATES,
    BaseJournal,
    Cancelled,
    Cap,
    Claimed,
    Finished,
    Journal,
    LaneAction,
    LaneCall,
    NewEvent,
    NewJob,
    Poisoned,
    Purged,
    Recorded,
    Recovery,
    Replayed,
    schema,
)
from webhookd.journal import reads as sqlite_reads
from webhookd.limiter import SHARED_LOG_S
from webhookd.models import (
    Event,
    JobState,
    LaneSpec,
    Priority,
    kept_digest,
    kept_long,
    new_event_id,
    new_job_id,
)

LEASE_S = 30.0
START = 1_700_000_000.0


@dataclass
class Store:
    """Where a test's journals live: one SQLite file or one PostgreSQL database, one clock."""

    kind: str
    where: str
    clock: ManualClock

    def journal(self) -> BaseJournal:
        """Another journal on the same store (not yet opened): another process, another node."""
        if self.kind == "sqlite":
            return Journal(self.where, clock=self.clock)
        from webhookd.journal.postgres import PostgresJournal

        # Heartbeats only when a test asks: the manual clock decides who is silent.
        return PostgresJournal(self.where, clock=self.clock, lease_s=LEASE_S, heartbeat_s=3600)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        yield Store("sqlite", str(tmp_path / "journal.db"), ManualClock(START))
        return
    server_url = request.getfixturevalue("pg_server_url")
    async with fresh_database(server_url) as url:
        yield Store("postgres", url, ManualClock(START))


@pytest.fixture
async def journal(store: Store) -> AsyncIterator[BaseJournal]:
    async with store.journal() as j:
        yield j


def new_event(
    body: bytes = b'{"a": 1}',
    key: str | None = None,
    source: str = "shop",
    jobs: int = 1,
    received_at: float = START,
    tenant: str = "t1",
    priority: Priority = Priority.NORMAL,
    order_key: str | None = None,
) -> NewEvent:
    event = Event(
        id=new_event_id(),
        source=source,
        received_at=received_at,
        dedup_key=key or f"{source}:{new_event_id()}",
        tenant=tenant,
        priority=priority,
        headers=(("Content-Type", "application/json"), ("X-Thing", "é")),
        body=body,
    )
    return NewEvent(
        event,
        tuple(NewJob(new_job_id(), f"forward-{i}", "forward", 3, order_key) for i in range(jobs)),
    )


async def claimed_one(journal: BaseJournal) -> tuple[NewEvent, str, Claimed]:
    """A new event with one job, journaled, and that job claimed: (event, job id, claim)."""
    item = new_event()
    await journal.ingest(item)
    [claimed] = await journal.claim([item.jobs[0].id], "b")
    return item, item.jobs[0].id, claimed


def finished(
    job_id: str,
    state: JobState,
    outcome: str,
    attempt: int = 1,
    now: float = START + 1,
    **kw: object,
) -> Finished:
    return Finished(
        job_id=job_id,
        attempt=attempt,
        state=state,
        started_at=now,
        finished_at=now,
        outcome=outcome,
        **kw,
    )  # type: ignore[arg-type]


# -- intake ----------------------------------------------------------------------------------


async def test_ingest_round_trips_raw_body_and_headers(journal: BaseJournal) -> None:
    """What was received is stored byte for byte: body, headers, source, tenant, priority."""
    body = b'{"emoji": "\\ud83d\\ude00", "raw": "\xff\xfe", "nul": "\x00"}'
    item = new_event(body=body)
    result = await journal.ingest(item)
    assert result.event_id == item.event.id and not result.duplicate
    detail = await journal.get_event(item.event.id)
    assert detail.event == item.event
    assert detail.state == "queued"
    assert [j.state for j in detail.jobs] == [JobState.QUEUED]


async def test_acknowledged_ingest_is_seen_by_another_journal(store: Store) -> None:
    """Once ingest returns, another process (another node) on the same store sees the event."""
    async with store.journal() as a, store.journal() as b:
        item = new_event()
        await a.ingest(item)
        assert (await b.get_event(item.event.id)).event.body == item.event.body


async def test_duplicate_key_returns_original_even_within_one_batch(journal: BaseJournal) -> None:
    """The same delivery twice, even in one group commit, creates one event and one set of jobs."""
    first, second, third = (new_event(key="shop:delivery-1") for _ in range(3))
    results = await asyncio.gather(*(journal.ingest(x) for x in (first, second, third)))
    assert [r.duplicate for r in results] == [False, True, True]
    assert {r.event_id for r in results} == {first.event.id}
    counts = await journal.counts()
    assert counts.events == 1 and counts.jobs_by_state["queued"] == 1


async def test_dedup_holds_across_journals_on_one_store(store: Store) -> None:
    """The same deliveries sent to two nodes at once are one event each, whichever node wins."""
    async with store.journal() as a, store.journal() as b:
        keys = [f"shop:delivery-{i}" for i in range(50)]
        to_a = [new_event(key=k) for k in keys]
        to_b = [new_event(key=k) for k in reversed(keys)]
        results = await asyncio.gather(*(a.ingest(x) for x in to_a), *(b.ingest(x) for x in to_b))
        assert sum(not r.duplicate for r in results) == 50
        by_key: dict[str, set[str]] = {}
        for item, r in zip([*to_a, *to_b], results, strict=True):
            by_key.setdefault(item.event.dedup_key, set()).add(r.event_id)
        assert all(len(ids) == 1 for ids in by_key.values())
        counts = await b.counts()
        assert counts.events == 50 and counts.jobs_by_state["queued"] == 50


def with_body_key(item: NewEvent, body_key: str) -> NewEvent:
    return NewEvent(item.event, item.jobs, body_key)


@pytest.mark.parametrize("one_batch", [False, True])
async def test_body_key_makes_a_fresh_delivery_id_a_duplicate(
    journal: BaseJournal, one_batch: bool
) -> None:
    """The same signed body under a new delivery id is a duplicate of the first event."""
    first = with_body_key(new_event(key="gh:delivery-1"), "gh:sha256:aa")
    replay = with_body_key(new_event(key="gh:delivery-2"), "gh:sha256:aa")
    if one_batch:
        results = list(await asyncio.gather(journal.ingest(first), journal.ingest(replay)))
    else:
        results = [await journal.ingest(first), await journal.ingest(replay)]
    assert [(r.event_id, r.duplicate) for r in results] == [
        (first.event.id, False),
        (first.event.id, True),
    ]
    # The duplicate's own delivery id names no event: a different body under it is new.
    other = with_body_key(new_event(key="gh:delivery-2"), "gh:sha256:bb")
    assert not (await journal.ingest(other)).duplicate
    # Either key of an event makes a later request its duplicate.
    again = with_body_key(new_event(key="gh:delivery-3"), "gh:sha256:bb")
    assert (await journal.ingest(again)).event_id == other.event.id
    same_id = with_body_key(new_event(key="gh:delivery-1"), "gh:sha256:cc")
    assert (await journal.ingest(same_id)).event_id == first.event.id
    assert (await journal.counts()).events == 2


async def test_copies_of_a_signed_body_under_one_fresh_id_at_once_name_the_original(
    journal: BaseJournal,
) -> None:
    """A signed body sent again under a fresh delivery id, many times in one group commit: the
    first copy took the fresh id, then was found the original's duplicate; the others named
    that first copy, an event that never existed (1,440 of 1,500 answers in a trial)."""
    first = with_body_key(new_event(key="gh:p1-orig"), "gh:sha256:aa")
    await journal.ingest(first)
    copies = [with_body_key(new_event(key="gh:p1-fresh"), "gh:sha256:aa") for _ in range(30)]
    results = await asyncio.gather(*(journal.ingest(c) for c in copies))
    assert {(r.event_id, r.duplicate) for r in results} == {(first.event.id, True)}
    assert (await journal.counts()).events == 1


async def test_group_commit_batches_concurrent_ingests(journal: BaseJournal) -> None:
    """Concurrent webhooks share transactions: far fewer commits than events."""
    before = journal.commits
    results = await asyncio.gather(*(journal.ingest(new_event()) for _ in range(300)))
    assert len({r.event_id for r in results}) == 300
    assert journal.commits - before < 100
    assert (await journal.counts()).events == 300
    assert journal.backlog_jobs == 300 == await journal.backlog()


async def test_each_durable_group_commit_reports_how_long_it_took(journal: BaseJournal) -> None:
    """``on_commit_seconds`` hears each group commit of ingests or outcomes once (what an ack
    waits for, for ``/metrics``), and nothing of a claim, whose commit is not synced."""
    times: list[float] = []
    journal.on_commit_seconds = times.append
    before = journal.commits
    items = [new_event() for _ in range(50)]
    await asyncio.gather(*(journal.ingest(item) for item in items))
    assert 1 <= len(times) == journal.commits - before
    job_id = items[0].jobs[0].id
    await journal.claim([job_id], "boot_a")
    assert len(times) == journal.commits - before - 1
    await journal.finish([finished(job_id, JobState.DONE, "done")])
    assert len(times) == journal.commits - before - 1
    assert all(0 < t < 60 for t in times)


async def test_commit_hands_new_jobs_to_the_dispatcher(journal: BaseJournal) -> None:
    """Each committed ingest batch announces its jobs at once (no polling delay)."""
    announced: list[str] = []
    journal.on_commit = lambda ready: announced.extend(r.id for r in ready)
    item = new_event(jobs=2)
    await journal.ingest(item)
    assert announced == [j.id for j in item.jobs]


# -- claims and outcomes ---------------------------------------------------------------------


class Taker:
    """The worker pool's side of a group commit (``Starter``): takes every job offered while
    it has room, and keeps what it was handed and what it got back."""

    boot_id = "boot_a"

    def __init__(self, room: int) -> None:
        self.room = room
        self.offered: list[list[str]] = []
        self.started: list[Claimed] = []
        self.released: set[str] = set()

    def room_at_commit(self) -> int:
        return self.room

    def reserve(self, items: Sequence[NewEvent]) -> frozenset[str]:
        self.offered.append([j.id for item in items for j in item.jobs])
        return frozenset(self.offered[-1])

    def settle(self, started: Sequence[Claimed], reserved: frozenset[str]) -> None:
        self.started += started
        self.released |= reserved - {c.job.id for c in started}


async def test_jobs_a_starter_takes_are_claimed_by_their_webhooks_commit(
    journal: BaseJournal,
) -> None:
    """An idle pool's new jobs are written running (one attempt counted) in the commit that
    journals their webhook, and handed to it after that commit: no claim of their own. They
    are then running jobs like any claimed one: not claimable, finished or put back by their
    claimer. A duplicate's jobs are given back; a group whose jobs do not all fit is offered
    none (the scheduler picks among them)."""
    taker = Taker(room=3)
    journal.starter = taker
    announced: list[str] = []
    journal.on_commit = lambda ready: announced.extend(r.id for r in ready)
    item = new_event(jobs=2)
    ids = [j.id for j in item.jobs]
    before = journal.commits
    await journal.ingest(item)
    assert journal.commits == before + 1 and announced == []
    assert [(c.job.id, c.job.state, c.job.attempts) for c in taker.started] == [
        (i, JobState.RUNNING, 1) for i in ids
    ]
    assert all(c.event == item.event for c in taker.started)
    detail = await journal.get_event(item.event.id)
    assert [(j.state, j.attempts) for j in detail.jobs] == [(JobState.RUNNING, 1)] * 2
    assert detail.state == "running" and journal.backlog_jobs == 2
    assert await journal.claim(ids, "boot_b") == []
    await journal.finish([finished(ids[0], JobState.DONE, "done")])
    await journal.unclaim([ids[1]])
    detail = await journal.get_event(item.event.id)
    assert [(j.state, j.attempts) for j in detail.jobs] == [
        (JobState.DONE, 1),
        (JobState.QUEUED, 0),
    ]

    duplicate = new_event(key=item.event.dedup_key)
    assert (await journal.ingest(duplicate)).duplicate
    assert taker.released == {duplicate.jobs[0].id} and len(taker.started) == 2

    too_many = new_event(jobs=4)
    await journal.ingest(too_many)
    assert len(taker.offered) == 2 and len(taker.started) == 2
    assert announced == [j.id for j in too_many.jobs]


async def test_claim_counts_the_attempt_before_the_work(journal: BaseJournal) -> None:
    """A claim commits state=running and attempts+1; a job can only be claimed once."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    claimed = await journal.claim([job_id], "boot_a")
    assert [c.job.attempts for c in claimed] == [1]
    assert claimed[0].event == item.event
    assert await journal.claim([job_id], "boot_a") == []
    detail = await journal.get_event(item.event.id)
    assert detail.jobs[0].state == JobState.RUNNING and detail.state == "running"


async def test_concurrent_claims_from_two_journals_take_each_job_once(store: Store) -> None:
    """Two nodes claiming the same jobs at once: every job is claimed by exactly one of them."""
    async with store.journal() as a, store.journal() as b:
        items = [new_event() for _ in range(40)]
        for item in items:
            await a.ingest(item)
        ids = [i.jobs[0].id for i in items]
        rounds = await asyncio.gather(
            *(j.claim(ids[k::4], f"boot_{k}") for k in range(4) for j in (a, b))
        )
        claimed = [c.job.id for got in rounds for c in got]
        assert sorted(claimed) == sorted(ids)


DEPLOY = Cap("action\x1fshop\x1fdeploy", 2)


async def test_a_claim_takes_no_job_before_it_is_due(store: Store) -> None:
    """A job queued again for a retry is not claimed before its run_at, by a plain or a capped
    claim, on any node (a copy of it read while it was due, before it ran, is held by some
    node's window): it stays queued with its attempts as they were, and is claimed once due."""
    async with store.journal() as a, store.journal() as b:
        item, job_id, _ = await claimed_one(a)
        retry_at = store.clock.time() + 60
        await a.finish([finished(job_id, JobState.QUEUED, "retry", run_at=retry_at)])
        store.clock.advance(59.5)
        for j in (a, b):
            got = await j.claim_capped([job_id], "boot", {job_id: (DEPLOY,)})
            assert (got.claimed, got.full) == ([], frozenset())
            assert await j.claim([job_id], "boot") == []
        job = (await b.get_event(item.event.id)).jobs[0]
        assert (job.state, job.attempts) == (JobState.QUEUED, 1)
        store.clock.advance(0.5)
        assert [c.job.attempts for c in await b.claim([job_id], "boot")] == [2]


async def test_capped_claims_count_the_running_jobs_of_every_journal(store: Store) -> None:
    """A cap's slots are shared by every node: a job past the cap stays queued with no attempt
    used, uncapped jobs in the same claim go, and a finished or unclaimed job frees its slot."""
    async with store.journal() as a, store.journal() as b:
        items = [new_event() for _ in range(5)]
        for item in items:
            await a.ingest(item)
        ids = [i.jobs[0].id for i in items]
        tenant = Cap("tenant\x1fshop\x1ft1", 5)
        got = await a.claim_capped(ids[:3], "boot_a", {i: (DEPLOY, tenant) for i in ids[:3]})
        assert [c.job.id for c in got.claimed] == ids[:2]
        assert got.full == {DEPLOY.key}
        got = await b.claim_capped(ids[2:], "boot_b", {ids[2]: (DEPLOY,), ids[3]: (tenant,)})
        assert ([c.job.id for c in got.claimed], got.full) == ([ids[3], ids[4]], {DEPLOY.key})
        refused = (await b.get_event(items[2].event.id)).jobs[0]
        assert (refused.state, refused.attempts) == (JobState.QUEUED, 0)
        await a.finish([finished(ids[0], JobState.DONE, "done")])
        got = await b.claim_capped([ids[2]], "boot_b", {ids[2]: (DEPLOY,)})
        assert ([c.job.id for c in got.claimed], got.full) == ([ids[2]], frozenset())
        await b.unclaim([ids[2]])
        await b.unclaim([ids[3], ids[4]])
        # The tenant's cap now counts a's one running job against a limit of 2.
        small = Cap(tenant.key, 2)
        got = await b.claim_capped(ids[2:], "boot_b", {i: (small,) for i in ids[2:]})
        assert ([c.job.id for c in got.claimed], got.full) == ([ids[2]], {small.key})


async def test_capped_claims_racing_from_two_journals_never_pass_the_cap(store: Store) -> None:
    """Eight claims at once from two nodes for one cap of 2: exactly two jobs run."""
    async with store.journal() as a, store.journal() as b:
        items = [new_event() for _ in range(16)]
        for item in items:
            await a.ingest(item)
        ids = [i.jobs[0].id for i in items]
        rounds = await asyncio.gather(
            *(
                j.claim_capped(ids[k::4], f"boot_{k}", {i: (DEPLOY,) for i in ids[k::4]})
                for k in range(4)
                for j in (a, b)
            )
        )
        assert sum(len(r.claimed) for r in rounds) == DEPLOY.limit
        assert all(r.full == {DEPLOY.key} for r in rounds if len(r.claimed) < 2)


async def test_finish_records_attempt_and_wait_does_not_count(journal: BaseJournal) -> None:
    """A rate-limit wait re-queues without using an attempt; a retry keeps it and logs the error."""
    item, job_id, _ = await claimed_one(journal)
    await journal.finish([finished(job_id, JobState.QUEUED, "wait", run_at=5.0, error="429")])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.attempts, job.state, job.history) == (0, JobState.QUEUED, ())
    await journal.claim([job_id], "b")
    await journal.finish([finished(job_id, JobState.QUEUED, "retry", run_at=6.0, error="500")])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert job.attempts == 1 and job.run_at == 6.0
    assert [(a.n, a.outcome, a.error) for a in job.history] == [(1, "retry", "500")]


def after_each_read(
    journal: BaseJournal, monkeypatch: pytest.MonkeyPatch, hook: Callable[[], Awaitable[None]]
) -> None:
    """Await ``hook`` after each read the journal's queries make (before the query goes on):
    a place to commit something between two reads of one answer."""

    def counted(read: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any) -> Any:
            rows = await read(*args)
            await hook()
            return rows

        return wrapped

    if isinstance(journal, Journal):
        monkeypatch.setattr(sqlite_reads, "fetch", counted(sqlite_reads.fetch))
    else:
        monkeypatch.setattr(journal, "fetch", counted(journal.fetch))  # type: ignore[attr-defined]


async def test_event_detail_is_one_snapshot_of_a_job_and_its_attempts(
    journal: BaseJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's attempt finishing while its event is read never shows the job still running
    beside that attempt already recorded: the retry is committed after each of the reads
    ``get_event`` makes in turn, and every answer is the job before it or after it."""
    retry: Finished | None = None  # committed right after read number ``at``
    at = count = 0

    async def after_read() -> None:
        nonlocal count, retry
        count += 1
        if retry is not None and count == at:
            await journal.finish([retry])
            retry = None

    after_each_read(journal, monkeypatch, after_read)
    landed = []  # whether the retry was committed while get_event was reading
    for after in range(1, 4):
        at = after
        item, job_id, _ = await claimed_one(journal)
        count = 0
        retry = finished(job_id, JobState.QUEUED, "retry", run_at=9.0, error="503")
        job = (await journal.get_event(item.event.id)).jobs[0]
        landed.append(retry is None)
        if retry is not None:  # get_event made fewer reads than ``at``
            await journal.finish([retry])
        history = [(a.n, a.outcome) for a in job.history]
        assert (job.state, job.attempts, history) in [
            (JobState.RUNNING, 1, []),
            (JobState.QUEUED, 1, [(1, "retry")]),
        ]
    assert landed == [True, True, False]  # after each of its two reads, then after it


async def test_an_event_pruned_while_it_is_read_is_not_found_never_shown_without_its_jobs(
    journal: BaseJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune committed after each of ``get_event``'s reads in turn: every answer is the
    whole event, with its job and attempt, or ``NotFound``."""
    keep = {"keep_done_s": 0.0, "keep_dead_s": 0.0, "keep_dedup_s": 0.0}
    prune_at = count = 0

    async def after_read() -> None:
        nonlocal count
        count += 1
        if count == prune_at:
            assert (await journal.prune(**keep)).events == 1

    after_each_read(journal, monkeypatch, after_read)
    answers = []
    for after in range(1, 3):
        prune_at = after
        item, job_id, _ = await claimed_one(journal)
        await journal.finish([finished(job_id, JobState.DONE, "done")])
        journal.clock.advance(1)  # type: ignore[attr-defined]
        count = 0
        try:
            detail = await journal.get_event(item.event.id)
        except NotFound:
            answers.append("not found")
        else:
            assert [(j.id, [a.outcome for a in j.history]) for j in detail.jobs] == [
                (job_id, ["done"])
            ]
            answers.append("whole")
    # Pruned after the jobs' read: gone by the event's. After the event's: read whole.
    assert answers == ["not found", "whole"]


async def test_done_and_dead_outcomes_keep_result_and_leave_the_backlog(
    journal: BaseJournal,
) -> None:
    """A done job keeps its result, a dead one its error; neither counts in the backlog."""
    ok, bad = new_event(), new_event()
    for item in (ok, bad):
        await journal.ingest(item)
    await journal.claim([ok.jobs[0].id, bad.jobs[0].id], "b")
    await journal.finish(
        [
            finished(ok.jobs[0].id, JobState.DONE, "done", result={"status": 200}),
            finished(bad.jobs[0].id, JobState.DEAD, "dead", error="404 Not Found"),
        ]
    )
    good = (await journal.get_event(ok.event.id)).jobs[0]
    dead = await journal.get_event(bad.event.id)
    assert (good.state, good.result) == (JobState.DONE, {"status": 200})
    assert (dead.state, dead.jobs[0].last_error) == ("dead", "404 Not Found")
    assert journal.backlog_jobs == 0 == await journal.backlog()
    assert await journal.event_ids_with_jobs("dead") == [bad.event.id]
    assert await journal.event_ids_with_jobs("dead", source="elsewhere") == []


async def test_a_stored_result_this_process_cannot_parse_is_read_as_its_text(
    journal: BaseJournal,
) -> None:
    """A result with an int past the 4,300 digits Python reads, journaled while a handler had
    lifted that limit for the whole daemon, failed every later read of its event (the events
    API answered 500, ``show`` and ``replay`` crashed) and would fail its job's claim: it is
    read as its text, saying why, and the rest of the event as it is."""
    done, dead = new_event(), new_event()
    for item in (done, dead):
        await journal.ingest(item)
    await journal.claim([done.jobs[0].id, dead.jobs[0].id], "b")
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        await journal.finish(
            [
                finished(done.jobs[0].id, JobState.DONE, "done", result={"n": 10**5000}),
                finished(dead.jobs[0].id, JobState.DEAD, "dead", result=10**5000, error="no"),
            ]
        )
    finally:
        sys.set_int_max_str_digits(limit)
    unread = "<not read as JSON here: Exceeds the limit (4300 digits) for integer string"
    job = (await journal.get_event(done.event.id)).jobs[0]
    assert job.state == JobState.DONE
    assert job.result.startswith(unread) and job.result.endswith(f'> {{"n":1{"0" * 5000}}}')
    # A dead job keeps its result through a replay (an openai answer): its claim reads it.
    await journal.replay([dead.event.id], dead_only=True)
    [claimed] = await journal.claim([dead.jobs[0].id], "b")
    assert claimed.job.result.startswith(unread) and claimed.job.result.endswith("0" * 5000)


async def test_every_dead_event_is_listed_page_by_page_however_many(
    journal: BaseJournal,
) -> None:
    """``replay --dead`` reads its events in pages past the last id: none is left out past a
    page's end, and one replayed and dead again before the next page is not met twice."""
    items = [new_event() for _ in range(5)]
    for item in items:
        await journal.ingest(item)
    jobs = [item.jobs[0].id for item in items]
    await journal.claim(jobs, "b")
    await journal.finish([finished(j, JobState.DEAD, "dead", error="404") for j in jobs])
    ids = sorted(item.event.id for item in items)
    assert await journal.event_ids_with_jobs("dead", limit=2, after=ids[1]) == ids[2:4]
    pages = []
    async for page in journal.pages_of_event_ids_with_jobs("dead", None, None, page_size=2):
        pages.append(page)
        await journal.replay(page)  # and each dies again at once
        again = [j.id for i in page for j in (await journal.get_event(i)).jobs]
        await journal.claim(again, "b")
        await journal.finish([finished(j, JobState.DEAD, "dead", error="404") for j in again])
    assert pages == [ids[0:2], ids[2:4], ids[4:]]


async def test_unclaim_returns_job_without_counting(journal: BaseJournal) -> None:
    """A job cancelled by a drain goes back to queued with its attempt not counted."""
    item, job_id, _ = await claimed_one(journal)
    await journal.unclaim([job_id])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)


async def test_an_attempt_a_drain_cut_off_is_recorded_and_not_counted(
    journal: BaseJournal,
) -> None:
    """The attempt a drain cut off mid-way (its target may have been called) is in the job's
    history, in the transaction that gives the job back; the count is not, so the job's next
    attempt has the same number. A cut attempt of a job no longer claimed adds nothing."""
    item, job_id, claimed = await claimed_one(journal)
    cut = finished(job_id, JobState.QUEUED, "interrupted", error="cut off", claim=claimed.claim)
    cut = dataclasses.replace(cut, detail={"counted": False})
    await journal.unclaim([job_id], [cut])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert [(a.n, a.outcome, a.error, a.detail) for a in job.history] == [
        (1, "interrupted", "cut off", {"counted": False})
    ]
    [again] = await journal.claim([job_id], "b2")
    assert again.job.attempts == 1
    await journal.finish([finished(job_id, JobState.DONE, "done", claim=again.claim)])
    await journal.unclaim([job_id], [cut])  # done by now: neither given back nor recorded
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert [(a.n, a.outcome) for a in job.history] == [(1, "interrupted"), (1, "done")]
    assert (job.state, job.attempts) == (JobState.DONE, 1)


async def test_a_result_a_cut_attempt_kept_is_the_jobs_and_none_leaves_the_earlier_one(
    journal: BaseJournal,
) -> None:
    """A cut attempt that kept a result (an openai answer whose then-forward the drain cut off)
    leaves it as the job's, for the next attempt to reuse; one that kept none leaves the job's
    earlier result alone."""
    item, job_id, claimed = await claimed_one(journal)
    answer = {"text": "a draft", "model": "m"}
    cut = finished(job_id, JobState.QUEUED, "interrupted", claim=claimed.claim)
    await journal.unclaim([job_id], [dataclasses.replace(cut, result=answer)])
    [again] = await journal.claim([job_id], "b2")
    assert again.job.result == answer
    await journal.unclaim([job_id], [dataclasses.replace(cut, claim=again.claim)])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.result) == (JobState.QUEUED, answer)


# -- recovery --------------------------------------------------------------------------------


async def test_recovery_requeues_a_dead_runners_jobs_then_poison_pills(store: Store) -> None:
    """Jobs left running by a process that died come back to queued; the third time, dead."""
    async with store.journal() as setup:
        item = new_event()
        await setup.ingest(item)
    job_id = item.jobs[0].id
    for run in range(1, 4):
        async with store.journal() as dying:
            assert len(await dying.claim([job_id], f"boot_{run}")) == 1
        store.clock.advance(LEASE_S + 1)  # past its lease (PostgreSQL); a new boot (SQLite)
        async with store.journal() as survivor:
            recovery = await survivor.recover(f"boot_{run}_next", max_recoveries=3)
        assert (recovery.requeued, recovery.dead) == ((0, 1) if run == 3 else (1, 0))
    job = item.jobs[0]
    assert recovery.poisoned == (Poisoned(item.event.source, job.action, item.event.id),)
    assert recovery.named() == f" ({item.event.id})"  # the start's log line names it
    async with store.journal() as j:
        job = (await j.get_event(item.event.id)).jobs[0]
    assert job.state == JobState.DEAD and "poison pill" in (job.last_error or "")
    assert [a.outcome for a in job.history] == ["interrupted"] * 3


def test_a_recoverys_line_names_five_poison_pills_and_counts_the_rest() -> None:
    pills = tuple(Poisoned("s", "a", f"evt_{i}") for i in range(7))
    assert Recovery(0, pills).named() == " (evt_0, evt_1, evt_2, evt_3, evt_4 and 2 more)"
    assert Recovery(3).named() == ""


async def test_recovery_leaves_the_running_processes_jobs_alone(journal: BaseJournal) -> None:
    """Recovery never takes a job from the process that is running it."""
    item = new_event()
    await journal.ingest(item)
    await journal.claim([item.jobs[0].id], "boot_now")
    recovery = await journal.recover("boot_now", 3)
    assert (recovery.requeued, recovery.dead) == (0, 0)
    assert (await journal.get_event(item.event.id)).state == "running"


async def test_nodes_lists_this_process_with_its_running_jobs(journal: BaseJournal) -> None:
    """``/stats`` shows the process on either backend: its host, pid and running jobs."""
    items = [new_event() for _ in range(3)]
    for item in items:
        await journal.ingest(item)
    await journal.claim([items[0].jobs[0].id, items[1].jobs[0].id], "boot_a")
    mine = [n for n in await journal.nodes() if n.this]
    assert len(mine) == 1
    node = mine[0]
    assert (node.host, node.pid, node.running, node.stale) == (
        socket.gethostname(),
        os.getpid(),
        2,
        False,
    )
    assert node.node_id.startswith("node_") and node.started_at <= node.heartbeat_at
    assert await journal.nodes(limit=0) == []


async def test_a_journals_identity_is_its_own_and_the_same_each_time_it_is_read(
    journal: BaseJournal, tmp_path: Path
) -> None:
    """``identity`` (what ``webhookd stats`` holds a daemon's ``/stats`` to): the same at each
    read, and another journal's is another."""
    mine = await journal.identity()
    assert mine == await journal.identity()
    assert mine.startswith("sqlite:" if isinstance(journal, Journal) else "postgresql:")
    async with Journal(tmp_path / "another.db") as another:
        assert await another.identity() != mine


# -- operator actions ------------------------------------------------------------------------


async def test_replay_requeues_dead_jobs_with_fresh_attempts(journal: BaseJournal) -> None:
    """Replay puts a dead event's jobs back to queued with attempts reset; unknown ids fail."""
    item, job_id, _ = await claimed_one(journal)
    await journal.finish([finished(job_id, JobState.DEAD, "dead", error="404")])
    assert await journal.replay([item.event.id]) == {item.event.id: Replayed(1, 0)}
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert [a.outcome for a in job.history] == ["dead"]  # history is kept
    with pytest.raises(NotFound):
        await journal.replay(["evt_nope"])


async def _delivered_dead_and_waiting(
    journal: BaseJournal,
) -> tuple[NewEvent, tuple[str, str, str], float]:
    """An event whose forward to one target was delivered, another went dead and a third waits
    out a backoff until the time returned: the event, its three job ids and that time."""
    item = new_event(jobs=3)
    await journal.ingest(item)
    delivered, dead, waiting = (j.id for j in item.jobs)
    await journal.claim([delivered, dead, waiting], "b")
    later = START + 3600
    await journal.finish(
        [
            finished(delivered, JobState.DONE, "done"),
            finished(dead, JobState.DEAD, "dead", error="404"),
            finished(waiting, JobState.QUEUED, "retry", run_at=later),
        ]
    )
    return item, (delivered, dead, waiting), later


async def test_a_replay_of_dead_letters_requeues_the_dead_jobs_alone(journal: BaseJournal) -> None:
    """``replay --dead`` and a source's replay-dead: of an event whose forward to one target
    was delivered, another went dead and a third waits out a backoff, only the dead one is
    queued again. Re-queuing the delivered one delivered the webhook to its target twice."""
    item, (delivered, dead, waiting), later = await _delivered_dead_and_waiting(journal)
    backlog = journal.backlog_jobs
    replayed = await journal.replay([item.event.id], dead_only=True)
    assert replayed == {item.event.id: Replayed(1, 0)}
    assert journal.backlog_jobs == backlog + 1 == await journal.backlog()
    jobs = {j.id: j for j in (await journal.get_event(item.event.id)).jobs}
    assert (jobs[dead].state, jobs[dead].attempts) == (JobState.QUEUED, 0)
    assert jobs[delivered].state == JobState.DONE
    assert (jobs[waiting].state, jobs[waiting].run_at) == (JobState.QUEUED, later)


async def test_a_replay_of_done_jobs_makes_the_deliveries_again_alone(
    journal: BaseJournal,
) -> None:
    """``replay --done`` (a target answered 2xx and lost what it was sent): of an event whose
    forward to one target was delivered, another went dead and a third waits out a backoff,
    only the delivered one is queued again, with fresh attempts; the others keep their state
    and their wait."""
    item, (delivered, dead, waiting), later = await _delivered_dead_and_waiting(journal)
    event_id = item.event.id
    assert await journal.event_ids_with_jobs("done") == [event_id]
    assert await journal.event_ids_with_jobs("done", action="forward-1") == []  # that one is dead
    backlog = journal.backlog_jobs
    assert await journal.replay([event_id], done_only=True) == {event_id: Replayed(1, 0)}
    assert journal.backlog_jobs == backlog + 1 == await journal.backlog()
    jobs = {j.id: j for j in (await journal.get_event(event_id)).jobs}
    assert (jobs[delivered].state, jobs[delivered].attempts) == (JobState.QUEUED, 0)
    assert jobs[dead].state == JobState.DEAD
    assert (jobs[waiting].state, jobs[waiting].run_at) == (JobState.QUEUED, later)
    assert await journal.event_ids_with_jobs("done") == []
    with pytest.raises(ValueError, match="one of them"):
        await journal.replay([event_id], dead_only=True, done_only=True)


async def test_a_replay_or_a_cancel_of_one_action_leaves_the_events_other_jobs_alone(
    journal: BaseJournal,
) -> None:
    """``--action``: a forward delivered again without the event's other jobs (a model asked
    again, a deploy run twice); each verb and each kind of job, on the action named alone."""
    item, (delivered, dead, waiting), later = await _delivered_dead_and_waiting(journal)
    event_id = item.event.id

    async def states() -> dict[str, tuple[str, float | None]]:
        jobs = (await journal.get_event(event_id)).jobs
        return {j.id: (j.state, j.run_at if j.state == JobState.QUEUED else None) for j in jobs}

    assert await journal.event_ids_with_jobs("dead", action="forward-1") == [event_id]
    assert await journal.event_ids_with_jobs("dead", action="forward-0") == []
    assert await journal.event_ids_with_jobs("queued", action="forward-2") == [event_id]
    # The delivered one queued again; the waiting one not hurried, the dead one left dead.
    assert await journal.replay([event_id], action="forward-0") == {event_id: Replayed(1, 0)}
    now = journal.clock.time()
    assert await states() == {
        delivered: (JobState.QUEUED, now),
        dead: (JobState.DEAD, None),
        waiting: (JobState.QUEUED, later),
    }
    assert await journal.replay([event_id], action="forward-2") == {event_id: Replayed(0, 1)}
    assert (await states())[waiting] == (JobState.QUEUED, now)
    assert await journal.cancel([event_id], action="forward-2") == {event_id: Cancelled(1, 0)}
    assert await journal.cancel([event_id], dead_only=True, action="forward-0") == {
        event_id: Cancelled(0, 0)
    }
    assert await journal.replay([event_id], dead_only=True, action="forward-1") == {
        event_id: Replayed(1, 0)
    }
    assert await states() == {
        delivered: (JobState.QUEUED, now),
        dead: (JobState.QUEUED, now),
        waiting: (JobState.CANCELLED, None),
    }
    assert journal.backlog_jobs == await journal.backlog() == 2
    assert await journal.replay([event_id], action="no-such") == {event_id: Replayed(0, 0)}


async def test_dismissing_dead_letters_cancels_the_dead_jobs_alone(journal: BaseJournal) -> None:
    """``cancel --dead``: of an event whose forward to one target was delivered, another went
    dead and a third waits out a backoff, only the dead one becomes ``cancelled``, keeping its
    attempts and error; the event leaves the dead letters, the backlog is unchanged, and a
    replay still runs the dismissed job again."""
    item, (delivered, dead, waiting), _ = await _delivered_dead_and_waiting(journal)
    assert await journal.event_ids_with_jobs("dead") == [item.event.id]
    backlog = journal.backlog_jobs
    assert await journal.cancel([item.event.id], dead_only=True) == {item.event.id: Cancelled(1, 0)}
    assert journal.backlog_jobs == backlog == await journal.backlog() == 1
    detail = await journal.get_event(item.event.id)
    jobs = {j.id: j for j in detail.jobs}
    assert (jobs[dead].state, jobs[dead].attempts, jobs[dead].last_error) == (
        JobState.CANCELLED,
        1,
        "404",
    )
    assert (jobs[delivered].state, jobs[waiting].state) == (JobState.DONE, JobState.QUEUED)
    assert detail.state != "dead" and await journal.event_ids_with_jobs("dead") == []
    assert (await journal.counts()).jobs_by_state.get("dead", 0) == 0
    # Nothing dead is left: a second dismissal changes nothing.
    assert await journal.cancel([item.event.id], dead_only=True) == {item.event.id: Cancelled(0, 0)}
    assert await journal.replay([item.event.id]) == {item.event.id: Replayed(2, 1)}
    assert (await journal.get_event(item.event.id)).jobs[1].state == JobState.QUEUED
    with pytest.raises(NotFound):
        await journal.cancel(["evt_nope"], dead_only=True)


async def test_a_dismissal_is_undone_by_replaying_the_dismissed_jobs_alone(
    journal: BaseJournal,
) -> None:
    """``replay --dismissed``: a dismissed dead job is marked (``dismissed_at``), so it runs
    again alone, the event's delivered job left done; a job cancelled before it ran is no
    dismissal, and a replay clears the mark."""
    item, (delivered, dead, waiting), _ = await _delivered_dead_and_waiting(journal)
    other = new_event()
    await journal.ingest(other)
    await journal.cancel([other.event.id])  # cancelled while queued: not a dismissal
    assert await journal.event_ids_with_jobs("dismissed") == []
    await journal.cancel([item.event.id], dead_only=True)
    jobs = {j.id: j for j in (await journal.get_event(item.event.id)).jobs}
    assert jobs[dead].dismissed_at == jobs[dead].finished_at is not None
    assert jobs[delivered].dismissed_at is None and jobs[waiting].dismissed_at is None
    assert await journal.event_ids_with_jobs("dismissed") == [item.event.id]
    assert await journal.event_ids_with_jobs("dismissed", source="elsewhere") == []
    both = [item.event.id, other.event.id]
    backlog = journal.backlog_jobs
    assert await journal.replay(both, dismissed_only=True) == {
        item.event.id: Replayed(1, 0),
        other.event.id: Replayed(0, 0),
    }
    assert journal.backlog_jobs == backlog + 1 == await journal.backlog()
    jobs = {j.id: j for j in (await journal.get_event(item.event.id)).jobs}
    assert (jobs[dead].state, jobs[dead].attempts, jobs[dead].dismissed_at) == (
        JobState.QUEUED,
        0,
        None,
    )
    assert jobs[delivered].state == JobState.DONE
    assert (await journal.get_event(other.event.id)).jobs[0].state == JobState.CANCELLED
    assert await journal.event_ids_with_jobs("dismissed") == []
    with pytest.raises(ValueError, match="one of them"):
        await journal.replay(both, dead_only=True, dismissed_only=True)


async def test_a_cancel_is_undone_by_replaying_the_cancelled_jobs_alone(
    journal: BaseJournal,
) -> None:
    """``replay --cancelled``: jobs a ``cancel`` cancelled (a ``cancel --queued`` that stopped a
    mass replay of dead letters, say) run again alone, with fresh attempts; the event's
    delivered job stays done, and a dismissed dead letter is ``--dismissed``'s, not this."""
    item, (delivered, dead, waiting), _ = await _delivered_dead_and_waiting(journal)
    queued = new_event()
    await journal.ingest(queued)  # its job still queued
    await journal.cancel([item.event.id])  # the queued job
    assert await journal.event_ids_with_jobs("cancelled") == [item.event.id]
    assert await journal.event_ids_with_jobs("cancelled", source="elsewhere") == []
    both = [item.event.id, queued.event.id]
    backlog = journal.backlog_jobs
    assert await journal.replay(both, cancelled_only=True) == {
        item.event.id: Replayed(1, 0),
        queued.event.id: Replayed(0, 0),
    }
    assert journal.backlog_jobs == backlog + 1 == await journal.backlog()
    jobs = {j.id: j for j in (await journal.get_event(item.event.id)).jobs}
    assert (jobs[waiting].state, jobs[waiting].attempts) == (JobState.QUEUED, 0)
    assert (jobs[delivered].state, jobs[dead].state) == (JobState.DONE, JobState.DEAD)
    assert await journal.event_ids_with_jobs("cancelled") == []
    await journal.cancel([item.event.id], dead_only=True)  # a dismissal: not a cancel's
    assert await journal.event_ids_with_jobs("cancelled") == []
    assert await journal.replay([item.event.id], cancelled_only=True) == {
        item.event.id: Replayed(0, 0)
    }
    with pytest.raises(ValueError, match="one of them"):
        await journal.replay(both, dismissed_only=True, cancelled_only=True)


async def test_unfinished_jobs_are_counted_by_source_and_action(journal: BaseJournal) -> None:
    """What a config must still be able to run: queued and running jobs by (source, action);
    finished ones are not counted."""
    first, second = new_event(jobs=2), new_event(source="mail", jobs=1)
    await journal.ingest(first)
    await journal.ingest(second)
    done, running = (j.id for j in first.jobs)
    await journal.claim([done, running], "b")
    await journal.finish([finished(done, JobState.DONE, "done")])
    assert await journal.unfinished_by_action() == {
        ("shop", "forward-1"): 1,
        ("mail", "forward-0"): 1,
    }


async def test_dead_jobs_are_grouped_by_the_start_of_their_error(journal: BaseJournal) -> None:
    """``webhookd stats``' dead letters by cause: per source, action and the first
    ``CAUSE_CHARS`` of the last error (an order id past them does not split a cause), most
    jobs first, with when the latest went dead."""
    long = "x" * CAUSE_CHARS
    errors = [long + " order 1", long + " order 2", "answered 404", None]
    for n, error in enumerate(errors):
        item = new_event(jobs=1)
        await journal.ingest(item)
        [job] = item.jobs
        await journal.claim([job.id], "b")
        await journal.finish([finished(job.id, JobState.DEAD, "dead", now=START + n, error=error)])
    causes = await journal.dead_causes()
    assert [(c.source, c.action, c.error, c.jobs) for c in causes] == [
        ("shop", "forward-0", long, 2),
        ("shop", "forward-0", None, 1),  # the latest first among equals
        ("shop", "forward-0", "answered 404", 1),
    ]
    assert causes[0].last_at == START + 1 and causes[1].last_at == START + 3
    assert len(await journal.dead_causes(limit=1)) == 1
    # With the configured names given, the others (a catch-all's) are one cause, not one each.
    for n, source in enumerate(("name1", "name2", "name3")):
        item = new_event(source=source, jobs=1)
        await journal.ingest(item)
        [job] = item.jobs
        await journal.claim([job.id], "b")
        dead = finished(job.id, JobState.DEAD, "dead", now=START + 10 + n, error="answered 503")
        await journal.finish([dead])
    folded = await journal.dead_causes(limit=2, names={"shop"}, other="*")
    assert [(c.source, c.action, c.error, c.jobs) for c in folded] == [
        ("*", "forward-0", "answered 503", 3),
        ("shop", "forward-0", long, 2),
    ]
    # With the catch-all's actions given, only their jobs are its own: others keep their names.
    mine = await journal.dead_causes(
        limit=1, names={"shop"}, other="*", other_actions={"forward-0"}
    )
    assert [(c.source, c.jobs) for c in mine] == [("*", 3)]
    others = await journal.dead_causes(limit=6, names={"shop"}, other="*", other_actions={"log"})
    assert [c.source for c in others if c.error == "answered 503"] == ["name3", "name2", "name1"]


async def test_counts_fold_the_names_past_the_most_in_the_database(journal: BaseJournal) -> None:
    """``counts()`` reads each kept name (the configured sources) whatever its jobs, and of the
    others the ``most`` with the most jobs, ties by name in code point order as ``sources_shown``
    ranks them; the rest come back summed under ``*``, so a catch-all that took a million names
    costs a short answer. The totals by state are whole either way."""
    sources = ["kept", "Big", "big", "b", "c", "d"]  # "Big" < "b" < "big" by code point
    jobs = {"kept": 1, "Big": 2, "big": 2, "b": 1, "c": 1, "d": 1}
    items = [new_event(source=s, jobs=jobs[s]) for s in sources]
    for item in items:
        await journal.ingest(item)
    [job] = items[-1].jobs
    await journal.claim([job.id], "b")
    await journal.finish([finished(job.id, JobState.DEAD, "dead")])
    counts = await journal.counts(keep=("kept", "absent"), most=3)
    assert counts.jobs_by_source == {
        "kept": {"queued": 1},
        "Big": {"queued": 2},
        "big": {"queued": 2},
        "b": {"queued": 1},
        "*": {"queued": 1, "dead": 1},
    }
    assert counts.jobs_by_state["queued"] == 7 and counts.jobs_by_state["dead"] == 1
    assert set((await journal.counts(most=0)).jobs_by_source) == {"*"}
    everything = await journal.counts(keep=sources)
    assert {s: sum(by.values()) for s, by in everything.jobs_by_source.items()} == jobs


async def test_replay_and_cancel_keep_the_backlog_tally_in_step(journal: BaseJournal) -> None:
    """The receiver's backpressure reads ``backlog_jobs``: a replay counts the jobs it queues
    again, and a cancel the queued jobs it takes out, so the tally neither drifts up nor goes
    below zero when the replayed jobs finish."""
    item, job_id, _ = await claimed_one(journal)
    await journal.finish([finished(job_id, JobState.DONE, "done")])
    assert journal.backlog_jobs == 0
    await journal.replay([item.event.id])
    assert journal.backlog_jobs == 1 == await journal.backlog()
    await journal.cancel([item.event.id])
    assert journal.backlog_jobs == 0 == await journal.backlog()
    await journal.replay([item.event.id])
    await journal.claim([job_id], "boot_b")
    await journal.finish([finished(job_id, JobState.DONE, "done")])
    assert journal.backlog_jobs == 0 == await journal.backlog()


async def test_replay_runs_a_waiting_queued_job_now_keeping_its_attempts(store: Store) -> None:
    """Replay makes a job parked in backoff due now, with its attempts and kept result intact."""
    clock = store.clock
    async with store.journal() as journal:
        item = new_event(jobs=3, received_at=clock.time())
        await journal.ingest(item)
        parked, dead, due = (j.id for j in item.jobs)
        await journal.claim([parked, dead], "b")
        far = clock.time() + 99_999_999
        await journal.finish(
            [
                finished(parked, JobState.QUEUED, "retry", run_at=far, result={"kept": 1}),
                finished(dead, JobState.DEAD, "dead", error="404"),
            ]
        )
        clock.advance(5)
        assert [r.id for r in await journal.ready(clock.time(), 10)] == [due]
        counts = await journal.replay([item.event.id])
        assert counts == {item.event.id: Replayed(requeued=1, run_now=1)}
        jobs = {j.id: j for j in (await journal.get_event(item.event.id)).jobs}
        ready = {r.id for r in await journal.ready(clock.time(), 10)}
    assert ready == {parked, dead, due}
    assert (jobs[parked].state, jobs[parked].attempts) == (JobState.QUEUED, 1)
    assert (jobs[parked].run_at, jobs[parked].result) == (clock.time(), {"kept": 1})
    assert (jobs[dead].state, jobs[dead].attempts) == (JobState.QUEUED, 0)


async def test_cancel_stops_queued_jobs_leaves_running_ones_and_replay_undoes_it(
    store: Store,
) -> None:
    """Cancel takes a due job and one parked for its retry out of the queue for good (no claim
    takes them); a running job finishes its attempt, and is not queued for a retry after it;
    replay runs them all again, as jobs no longer cancelled."""
    clock = store.clock
    async with store.journal() as daemon, store.journal() as cli:
        item = new_event(jobs=3, received_at=clock.time())
        await daemon.ingest(item)
        due, parked, running = (j.id for j in item.jobs)
        await daemon.claim([parked, running], "b")
        far = clock.time() + 3600
        await daemon.finish([finished(parked, JobState.QUEUED, "retry", run_at=far, error="503")])
        other = new_event()
        await daemon.ingest(other)
        assert await cli.event_ids_with_jobs("queued") == sorted([item.event.id, other.event.id])

        with pytest.raises(NotFound):  # an unknown id changes nothing, whatever came before it
            await cli.cancel([item.event.id, "evt_nope"])
        assert len(await daemon.ready(far + 1, 10)) == 3

        assert await cli.cancel([item.event.id]) == {item.event.id: Cancelled(2, 1)}
        assert [r.id for r in await daemon.ready(far + 1, 10)] == [other.jobs[0].id]
        assert await daemon.claim([due, parked], "b") == []
        assert await daemon.event_ids_with_jobs("queued") == [other.event.id]
        assert await daemon.backlog() == 2  # the running job and the other event's
        detail = await daemon.get_event(item.event.id)
        jobs = {j.id: j for j in detail.jobs}
        assert detail.state == "running"
        assert (jobs[due].state, jobs[parked].state) == (JobState.CANCELLED, JobState.CANCELLED)
        assert (jobs[parked].attempts, jobs[parked].last_error) == (1, "503")  # kept
        assert (jobs[due].finished_at, jobs[running].finished_at) == (clock.time(), None)

        # The running job's attempt fails: its retry is not queued, it is cancelled, and the
        # finish says so (a plain one says nothing).
        recorded = await daemon.finish([finished(running, JobState.QUEUED, "retry", run_at=far)])
        assert recorded == Recorded(cancelled=frozenset({running}))
        detail = await daemon.get_event(item.event.id)
        assert detail.state == "cancelled" and [r.id for r in await daemon.ready(far + 1, 9)] == [
            other.jobs[0].id
        ]
        assert [a.outcome for a in detail.jobs[2].history] == ["retry"]
        assert await cli.cancel([item.event.id]) == {item.event.id: Cancelled(0, 0)}
        assert await cli.cancel([other.event.id]) == {other.event.id: Cancelled(1, 0)}
        assert (await daemon.get_event(other.event.id)).state == "cancelled"

        assert await cli.replay([item.event.id]) == {item.event.id: Replayed(3, 0)}
        ready = {r.id for r in await daemon.ready(clock.time(), 10)}
        assert ready == {due, parked, running}
        replayed = await daemon.get_event(item.event.id)
        assert [j.finished_at for j in replayed.jobs] == [None, None, None]
        # Replayed, a job is no longer cancelled: a failed attempt queues its retry again.
        await daemon.claim([running], "b")
        retried = await daemon.finish(
            [finished(running, JobState.QUEUED, "retry", run_at=clock.time())]
        )
        assert retried == Recorded()
        assert running in {r.id for r in await daemon.ready(clock.time(), 10)}


async def test_purge_deletes_events_whole_and_leaves_one_with_a_running_job(
    store: Store,
) -> None:
    """Purge deletes an event now, whatever its jobs' states (queued, parked for a retry,
    done, dead), with their attempts and its dedup key: the same delivery again is a new
    event. One whose job runs is left whole; an unknown id changes nothing."""
    clock = store.clock
    async with store.journal() as daemon, store.journal() as cli:
        gone = dataclasses.replace(
            new_event(jobs=3, received_at=clock.time(), key="shop:alice"),
            body_key="shop:signed-body",  # what a signed body's signature covers: a second key
        )
        busy = new_event(received_at=clock.time())
        for item in (gone, busy):
            await daemon.ingest(item)
        queued, parked, finished_job = (j.id for j in gone.jobs)
        await daemon.claim([parked, finished_job, busy.jobs[0].id], "b")
        far = clock.time() + 3600
        await daemon.finish(
            [
                finished(parked, JobState.QUEUED, "retry", run_at=far, error="503"),
                finished(finished_job, JobState.DEAD, "dead", error="410"),
            ]
        )
        with pytest.raises(NotFound):
            await cli.purge([gone.event.id, "evt_nope"])
        assert (await daemon.get_event(gone.event.id)).jobs[1].attempts == 1

        assert await cli.purge([gone.event.id, busy.event.id]) == {
            gone.event.id: Purged(3, 2),
            busy.event.id: Purged(0, 0, running=1),
        }
        with pytest.raises(NotFound):
            await daemon.get_event(gone.event.id)
        assert (await daemon.get_event(busy.event.id)).state == "running"
        assert await daemon.claim([queued, parked], "b") == []
        assert await cli.backlog() == 1  # the running job's
        again = new_event(key="shop:alice")
        assert (await daemon.ingest(again)).duplicate is False  # its dedup keys went with it
        resent = dataclasses.replace(new_event(key="shop:other"), body_key="shop:signed-body")
        assert (await daemon.ingest(resent)).duplicate is False


async def test_cancel_by_filter_finds_events_whose_only_live_job_is_running(
    journal: BaseJournal,
) -> None:
    """``cancel --queued --source S`` finds what ``cancel <id>`` would act on: an event whose
    jobs are all running (a worker waiting for a lane, a delivery in flight) as well as one
    with a queued job, in id order, a page at a time."""
    busy, waiting, both = new_event(), new_event(), new_event(jobs=2)
    for item in (busy, waiting, both):
        await journal.ingest(item)
    await journal.claim([busy.jobs[0].id, both.jobs[0].id], "b")
    ids = sorted(item.event.id for item in (busy, waiting, both))
    assert await journal.event_ids_with_jobs("queued") == sorted([waiting.event.id, both.event.id])
    assert await journal.event_ids_with_jobs("unfinished") == ids
    pages = journal.pages_of_event_ids_with_jobs("unfinished", None, None, page_size=2)
    assert [page async for page in pages] == [ids[:2], ids[2:]]
    assert await journal.cancel([busy.event.id]) == {busy.event.id: Cancelled(0, 1)}


async def test_a_job_cancelled_while_it_runs_is_not_queued_again_by_a_drain_or_a_recovery(
    store: Store,
) -> None:
    """Cancelled while running, a job's attempt ends as it ends (done stays done), but a
    retry, a drain's unclaim or a recovery after its process died (even its last, which
    would send it to dead as a poison pill) cancels it instead."""
    clock = store.clock
    async with store.journal() as setup:
        item = new_event(jobs=4, received_at=clock.time())
        await setup.ingest(item)
    done, retried, drained, lost = ids = [j.id for j in item.jobs]
    async with store.journal() as dying, store.journal() as cli:
        assert len(await dying.claim(ids, "boot_a")) == 4
        assert await cli.cancel([item.event.id]) == {item.event.id: Cancelled(0, 4)}
        pending = (await cli.get_event(item.event.id)).jobs
        assert [(j.state, j.cancel_requested) for j in pending] == [(JobState.RUNNING, True)] * 4
        later = clock.time() + 60
        await dying.finish(
            [
                finished(done, JobState.DONE, "done"),
                finished(retried, JobState.QUEUED, "retry", run_at=later, error="503"),
            ]
        )
        await dying.unclaim([drained])
    clock.advance(LEASE_S + 1)  # ``lost`` was still running: past its lease, a new boot
    async with store.journal() as survivor:
        # At its last recovery an unmarked job would be a poison pill; a cancelled one is not.
        recovery = await survivor.recover("boot_b", max_recoveries=1)
        assert (recovery.requeued, recovery.dead, recovery.cancelled) == (0, 0, 1)
        jobs = {j.id: j for j in (await survivor.get_event(item.event.id)).jobs}
        assert await survivor.ready(clock.time() + 3600, 10) == []
    assert [jobs[i].state for i in ids] == [JobState.DONE] + [JobState.CANCELLED] * 3
    assert not any(j.cancel_requested for j in jobs.values())
    assert [a.outcome for a in jobs[lost].history] == ["interrupted"]
    assert (jobs[retried].last_error, jobs[drained].attempts) == ("503", 0)


async def test_a_replay_withdraws_a_cancel_made_while_a_job_runs(journal: BaseJournal) -> None:
    """Replayed after it was cancelled while running, a job whose attempt fails retries."""
    item, job_id, _ = await claimed_one(journal)
    assert await journal.cancel([item.event.id]) == {item.event.id: Cancelled(0, 1)}
    assert await journal.replay([item.event.id]) == {item.event.id: Replayed(0, 0)}
    await journal.finish([finished(job_id, JobState.QUEUED, "retry", run_at=START)])
    assert [r.id for r in await journal.ready(START + 10, 10)] == [job_id]


async def test_pause_holds_a_sources_jobs_for_every_journal(store: Store) -> None:
    """A pause made by one process (the CLI) is seen by another and resume undoes it."""
    async with store.journal() as daemon, store.journal() as cli:
        item = new_event(source="shop")
        await daemon.ingest(item)
        assert await cli.pause("shop") is True
        assert await cli.pause("shop") is False
        paused = await daemon.paused_sources()
        assert paused == {"shop"}
        assert await daemon.ready(2e9, 10, paused=paused) == []
        assert await daemon.next_run_at(paused) is None
        assert await cli.resume("shop") is True
        assert await cli.resume("shop") is False
        assert [r.id for r in await daemon.ready(2e9, 10)] == [item.jobs[0].id]


# -- reads -----------------------------------------------------------------------------------


async def test_key_owner_names_the_event_a_dedup_key_belongs_to(journal: BaseJournal) -> None:
    """A delivery's dedup key leads back to its event, and a duplicate does not move it."""
    first = new_event(key="shop:delivery-1")
    await journal.ingest(first)
    await journal.ingest(new_event(key="shop:delivery-1"))  # the provider's retry
    owner = await journal.key_owner("shop:delivery-1")
    assert owner is not None and owner[0] == first.event.id and owner[1] > 0
    assert await journal.key_owner("shop:delivery-2") is None
    assert await journal.key_owner("mail:delivery-1") is None


async def test_event_by_key_finds_a_delivery_id_kept_as_its_digest(journal: BaseJournal) -> None:
    """A delivery id over 256 characters, or read from a credential header, is kept as its
    digest: the key as the provider sent it still leads to its event (as a tenant does)."""
    long_id = "d" * 300
    long_one = new_event(key=f"shop:{kept_long(long_id)}")  # as the receiver journals it
    credential = new_event(key=f"api:{kept_digest('tok-1')}")
    for item in (long_one, credential):
        await journal.ingest(item)
    for sent, item in ((f"shop:{long_id}", long_one), ("api:tok-1", credential)):
        found = await journal.event_by_key(sent)
        assert found is not None and found[2] is not None
        assert (found[0], found[2].event.id) == (item.event.id, item.event.id)
    assert await journal.event_by_key(f"mail:{long_id}") is None


async def test_ready_orders_by_priority_then_age_and_respects_run_at(
    journal: BaseJournal,
) -> None:
    """Due jobs come highest priority first, oldest first; future ones wait."""
    low = new_event(priority=Priority.LOW)
    high = new_event(priority=Priority.HIGH)
    await journal.ingest(low)
    await journal.ingest(high)
    ready = await journal.ready(now=2e9, limit=10)
    assert [r.id for r in ready] == [high.jobs[0].id, low.jobs[0].id]
    assert await journal.ready(now=2e9, limit=10, exclude=[high.jobs[0].id]) == ready[1:]
    assert await journal.ready(now=0, limit=10) == []
    assert await journal.next_run_at() == low.event.received_at
    assert await journal.next_run_at(after=low.event.received_at) is None


async def test_an_ordered_key_runs_one_job_at_a_time_in_arrival_order(
    journal: BaseJournal,
) -> None:
    """Jobs sharing an order key wait for the older one to finish, also across a retry."""
    first, second = new_event(order_key="cust-1"), new_event(order_key="cust-1")
    other = new_event(order_key="cust-2")
    for item in (first, second, other):
        await journal.ingest(item)
    heads = {r.id for r in await journal.ready(2e9, 10)}
    assert heads == {first.jobs[0].id, other.jobs[0].id}
    assert await journal.claim([second.jobs[0].id], "b") == []  # not its turn
    await journal.claim([first.jobs[0].id], "b")
    await journal.finish([finished(first.jobs[0].id, JobState.QUEUED, "retry", run_at=START + 60)])
    # Waiting for its retry, the first still holds the key.
    assert {r.id for r in await journal.ready(2e9, 10)} == {first.jobs[0].id, other.jobs[0].id}
    journal.clock.advance(60)  # type: ignore[attr-defined]  # its retry is due
    await journal.claim([first.jobs[0].id], "b")
    await journal.finish([finished(first.jobs[0].id, JobState.DONE, "done", attempt=2)])
    assert {r.id for r in await journal.ready(2e9, 10)} == {second.jobs[0].id, other.jobs[0].id}


async def marked_behind(store: Store) -> set[str]:
    """The ids of the jobs the journal has marked behind their order key's head (``behind``),
    read from the store directly: the marks are the journal's own business, kept by triggers."""
    return {r[0] for r in await _rows(store, "SELECT id FROM jobs WHERE behind IS NOT NULL")}


async def test_jobs_behind_their_keys_head_are_marked_and_released_by_every_transition(
    store: Store, journal: BaseJournal
) -> None:
    """A job queued behind an unfinished job of its order key is marked, and a refill leaves
    it unread; whatever ends a key's head (done, dead, a cancel) releases the next job, and a
    job leaving the queue keeps no mark. A mark never stands without an older unfinished job:
    one would hold its job back for ever."""
    keyed = [new_event(order_key="k") for _ in range(5)]
    other, plain = new_event(order_key="z"), new_event()
    for item in keyed[:2]:
        await journal.ingest(item)
    # Several of one key in one commit: each sees the ones before it.
    await asyncio.gather(*(journal.ingest(item) for item in (*keyed[2:4], other, plain)))
    job = [item.jobs[0].id for item in keyed]
    assert await marked_behind(store) == set(job[1:4])
    lane = (int(Priority.NORMAL), "shop", "t1")

    async def offered() -> set[str]:
        return {r.id for r in await journal.ready_in_lanes(2e9, [(lane, 50)])}

    heads = {job[0], other.jobs[0].id, plain.jobs[0].id}
    assert await offered() == heads

    async def waits(item: NewEvent) -> str | None:  # what show and the events API say
        return (await journal.get_event(item.event.id)).jobs[0].waiting_for

    assert [await waits(item) for item in (*keyed[:4], other, plain)] == [
        None,
        job[0],
        job[0],
        job[0],
        None,
        None,
    ]
    await journal.claim([job[0]], "b")
    await journal.finish([finished(job[0], JobState.QUEUED, "retry", run_at=START + 60)])
    assert await marked_behind(store) == set(job[1:4])  # a retry still holds its key
    store.clock.advance(60)  # its retry is due
    await journal.claim([job[0]], "b")
    await journal.finish([finished(job[0], JobState.DEAD, "dead", attempt=2)])
    assert await marked_behind(store) == {job[2], job[3]}
    assert await offered() == heads - {job[0]} | {job[1]}
    assert await waits(keyed[2]) == job[1]  # the key's head now
    await journal.cancel([keyed[2].event.id])  # a marked job cancelled: its mark goes with it
    assert await marked_behind(store) == {job[3]}
    await journal.cancel([keyed[1].event.id])  # the head cancelled: the next is released
    assert await marked_behind(store) == set()
    assert job[3] in await offered()
    # A dead job replayed is queued unmarked: as the oldest, it is its key's head again.
    await journal.replay([keyed[0].event.id])
    assert await marked_behind(store) == set()
    assert await offered() == heads
    await journal.ingest(keyed[4])
    assert await marked_behind(store) == {job[4]}
    await journal.claim([job[0]], "b")
    assert await waits(keyed[3]) == job[0]  # a job of its key running comes first


# A walk through the queue: any order of what can happen to an ordered job, as (what, argument).
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("ingest"), st.sampled_from(["a", "a", "b", None])),
        st.tuples(st.just("run"), st.sampled_from(["done", "dead", "retry", "keep"])),
        st.tuples(st.just("end"), st.sampled_from(["done", "dead", "retry"])),
        st.tuples(st.sampled_from(["cancel", "replay"]), st.integers(0, 8)),
        st.tuples(st.sampled_from(["recover", "unclaim"]), st.none()),
    ),
    max_size=40,
)
_WALKS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Walks every run takes, whatever else is drawn: a marked job cancelled, then its key's head.
_CANCELS = [("ingest", "a")] * 3 + [("cancel", 1), ("ingest", None), ("cancel", 0)]
_DEATHS = [("ingest", "a")] * 3 + [("run", "dead"), ("replay", 0), ("run", "keep"), ("end", "done")]


@_WALKS
@given(_STEPS)
@example(_CANCELS)
@example(_DEATHS)
def test_sqlite_behind_marks_never_hold_back_a_head_whatever_happens(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, Any]]
) -> None:
    """After any sequence of ingests, claims, outcomes, cancels, replays, recoveries and drains,
    every job marked behind has an older unfinished job of its key, and a refill offers
    exactly the jobs the ordering rule lets start, worked out from the rows without the marks."""
    path = str(tmp_path_factory.mktemp("behind") / "j.db")
    asyncio.run(_walk(Store("sqlite", path, ManualClock(START)), steps))


@pytest.mark.timeout(300)
@settings(_WALKS, max_examples=25)  # a fresh database each: ~0.4 s
@given(_STEPS)
@example(_CANCELS)
@example(_DEATHS)
def test_pg_behind_marks_never_hold_back_a_head_whatever_happens(
    pg_server_url: str, steps: list[tuple[str, Any]]
) -> None:
    """As the SQLite test above, on PostgreSQL, whose triggers are its own."""

    async def walk() -> None:
        async with fresh_database(pg_server_url) as url:
            await _walk(Store("postgres", url, ManualClock(START)), steps)

    asyncio.run(walk())


async def _walk(store: Store, steps: list[tuple[str, Any]]) -> None:
    lane = (int(Priority.NORMAL), "shop", "t1")
    events: list[str] = []
    boot = 1
    async with store.journal() as journal:
        for what, arg in steps:
            running = [
                r[0] for r in await _rows(store, "SELECT id, 1 FROM jobs WHERE state = 'running'")
            ]
            if what == "ingest":
                item = new_event(order_key=arg)
                events.append(item.event.id)
                await journal.ingest(item)
            elif what == "run":
                offered = await journal.ready_in_lanes(2e9, [(lane, 50)])
                claimed = await journal.claim([offered[0].id], f"b{boot}") if offered else []
                if claimed and arg != "keep":
                    await journal.finish([_outcome(claimed[0], arg)])
            elif what == "end" and running:
                await journal.finish([_outcome(running[0], arg)])
            elif what in ("cancel", "replay") and events:
                event_id = events[arg % len(events)]
                await (journal.cancel if what == "cancel" else journal.replay)([event_id])
            elif what == "recover":
                boot += 1
                store.clock.advance(10 * LEASE_S)  # PostgreSQL: the earlier claims' lease is out
                await journal.recover(f"b{boot}", max_recoveries=2)
            elif what == "unclaim" and running:
                await journal.unclaim(running)
            offered_ids = {r.id for r in await journal.ready_in_lanes(2e9, [(lane, 50)])}
            assert offered_ids == await _may_start(store), (what, arg)


def _outcome(claimed: Claimed | str, outcome: str) -> Finished:
    job_id, claim = (claimed, "") if isinstance(claimed, str) else (claimed.job.id, claimed.claim)
    state = {"done": JobState.DONE, "dead": JobState.DEAD, "retry": JobState.QUEUED}[outcome]
    return finished(job_id, state, outcome, run_at=START + 60, claim=claim)


async def _rows(store: Store, sql: str) -> list[Any]:
    """``sql``'s rows, read from the store directly (a connection of its own)."""
    if store.kind == "sqlite":
        with contextlib.closing(sqlite3.connect(store.where)) as conn:
            return conn.execute(sql).fetchall()
    import asyncpg

    conn = await asyncpg.connect(store.where)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def _may_start(store: Store) -> set[str]:
    """The queued jobs the ordering rule lets start, worked out from every job's row; first,
    that no job is marked behind without an older unfinished job of its key (held for ever)."""
    rows = await _rows(store, "SELECT id, order_key, state, seq, behind FROM jobs")
    unfinished = [r for r in rows if r[2] in ("queued", "running")]

    def older_or_running(key: str, seq: int) -> bool:
        return any(
            r[1] == key and (r[3] < seq or r[2] == "running") for r in unfinished if r[3] != seq
        )

    for job_id, key, state, seq, behind in rows:
        if behind is not None:
            assert state == "queued" and any(r[1] == key and r[3] < seq for r in unfinished), (
                f"{job_id} is marked behind no unfinished job"
            )
    return {
        r[0]
        for r in unfinished
        if r[2] == "queued" and (r[1] is None or not older_or_running(r[1], r[3]))
    }


async def test_lanes_list_and_fill_per_priority_source_and_tenant(journal: BaseJournal) -> None:
    """The scheduler's lane reads: lanes in order from a cursor, and up to n due jobs of each."""
    items = [
        new_event(source="a", tenant="t1"),
        new_event(source="a", tenant="t1"),
        new_event(source="a", tenant="t2"),
        new_event(source="b", tenant="t1", priority=Priority.HIGH),
    ]
    for item in items:
        await journal.ingest(item)
    lanes = await journal.queued_lanes(None, 10)
    assert lanes == [(0, "b", "t1"), (1, "a", "t1"), (1, "a", "t2")]
    assert await journal.queued_lanes(lanes[0], 1) == [(1, "a", "t1")]
    got = await journal.ready_in_lanes(2e9, [((1, "a", "t1"), 1), ((1, "a", "t2"), 5)])
    assert [r.id for r in got] == [items[0].jobs[0].id, items[2].jobs[0].id]
    backlog = {b.lane: b.queued for b in await journal.lane_backlog()}
    assert backlog == {(0, "b", "t1"): 1, (1, "a", "t1"): 2, (1, "a", "t2"): 1}


async def test_a_lanes_due_jobs_come_longest_due_first_past_those_in_backoff(
    journal: BaseJournal,
) -> None:
    """A retry waiting out its backoff sits first in its lane by arrival, but a refill hands
    out the due jobs behind it, and each lane's jobs longest due first once the retry is due
    too; ``next_run_at`` names when it will be."""
    retried, fresh = new_event(source="a"), new_event(source="a", received_at=START + 20)
    for item in (retried, fresh):
        await journal.ingest(item)
    lane = (int(Priority.NORMAL), "a", "t1")
    await journal.claim([retried.jobs[0].id], "b")
    await journal.finish(
        [finished(retried.jobs[0].id, JobState.QUEUED, "retry", run_at=START + 30)]
    )
    got = await journal.ready_in_lanes(START + 25, [(lane, 5)])
    assert [r.id for r in got] == [fresh.jobs[0].id]
    assert await journal.next_run_at(after=START + 25) == START + 30
    got = await journal.ready_in_lanes(START + 60, [(lane, 5)])
    assert [r.id for r in got] == [fresh.jobs[0].id, retried.jobs[0].id]
    assert [r.id for r in await journal.ready_in_lanes(START + 60, [(lane, 1)])] == [
        fresh.jobs[0].id
    ]


async def test_list_events_filters_by_derived_state(journal: BaseJournal) -> None:
    """Listing by state uses the event's derived state (dead if any job is dead)."""
    ok, bad = new_event(jobs=2), new_event(jobs=2)
    for item in (ok, bad):
        await journal.ingest(item)
    ids = [j.id for j in ok.jobs + bad.jobs]
    await journal.claim(ids, "b")
    await journal.finish(
        [finished(i, JobState.DONE, "done") for i in ids[:3]]
        + [finished(ids[3], JobState.DEAD, "dead")]
    )
    assert [e.id for e in await journal.list_events(state="dead")] == [bad.event.id]
    assert [e.id for e in await journal.list_events(state="done")] == [ok.event.id]
    assert [e.id for e in await journal.list_events(limit=1)] == [bad.event.id]
    assert [e.id for e in await journal.list_events(before=bad.event.id)] == [ok.event.id]
    assert [e.jobs for e in await journal.list_events()] == [2, 2]
    assert await journal.list_events(source="nope") == []


async def test_list_events_finds_the_bodies_that_hold_some_bytes(journal: BaseJournal) -> None:
    """``contains`` matches raw body bytes, newest first, with the other filters and a cursor;
    no character in it is a wildcard."""
    text = new_event(body='{"order": "ord_123", "name": "Zoë"}'.encode())
    other = new_event(body=b'{"order": "ord_456"}', source="mail")
    binary = new_event(body=b"\x00\xff\x1f\x8b ord_123")
    for item in (text, other, binary):
        await journal.ingest(item)

    async def found(**filters: Any) -> list[str]:
        return [e.id for e in await journal.list_events(**filters)]

    assert await found(contains=b"ord_123") == [binary.event.id, text.event.id]
    assert await found(contains=b"ord_123", limit=1) == [binary.event.id]
    assert await found(contains=b"ord_123", before=binary.event.id) == [text.event.id]
    assert await found(contains="Zoë".encode()) == [text.event.id]
    assert await found(contains=b"\x00\xff") == [binary.event.id]
    assert await found(contains=b"ord_456", source="shop") == []
    assert await found(contains=b"ord_456", since=START + 1) == []
    assert await found(contains=b"ord%") == await found(contains=b"ord?") == []


async def test_a_tenant_filter_finds_the_tenant_as_sent_even_one_kept_as_a_digest(
    journal: BaseJournal,
) -> None:
    """Listing and the bulk verbs' selection take a tenant as it was sent: one read from a
    credential header is kept as its digest, and still found by what the operator knows."""
    plain = new_event(tenant="acme")
    digested = new_event(tenant=kept_digest("key-vip"), source="api")
    other = new_event(tenant="globex")
    for item in (plain, digested, other):
        await journal.ingest(item)
    jobs = [item.jobs[0].id for item in (plain, digested, other)]
    await journal.claim(jobs, "b")
    await journal.finish([finished(j, JobState.DEAD, "dead", error="404") for j in jobs])

    async def listed(**filters: Any) -> list[str]:
        return [e.id for e in await journal.list_events(**filters)]

    assert await listed(tenant="acme") == [plain.event.id]
    assert await listed(tenant="key-vip") == [digested.event.id]
    assert await listed(tenant="key-vip", source="shop") == []
    assert await listed(tenant="acme", state="dead", since=START) == [plain.event.id]
    assert await listed(tenant="nobody") == []
    assert await journal.event_ids_with_jobs("dead", tenant="key-vip") == [digested.event.id]
    assert await journal.event_ids_with_jobs("dead", tenant="acme", source="api") == []
    pages = [p async for p in journal.pages_of_event_ids_with_jobs("dead", None, None, "globex")]
    assert pages == [[other.event.id]]


async def test_the_bulk_selection_takes_a_window_since_one_time_until_another(
    journal: BaseJournal,
) -> None:
    """``replay --dead --since A --until B`` (an outage's window): an event received at
    ``since`` is in it, one received at ``until`` is not, so windows laid end to end take each
    event once; a queued job's event (``cancel --queued``'s) is windowed alike."""
    items = [new_event(received_at=START + offset) for offset in (0, 10, 20, 30)]
    for item in items:
        await journal.ingest(item)
    dead = [item.jobs[0].id for item in items[:3]]
    journal.clock.advance(20)  # type: ignore[attr-defined]  # the last of them is due
    await journal.claim(dead, "b")
    await journal.finish([finished(j, JobState.DEAD, "dead", error="404") for j in dead])
    at_0, at_10, at_20, at_30 = (item.event.id for item in items)

    async def dead_in(since: float | None, until: float | None) -> list[str]:
        return await journal.event_ids_with_jobs("dead", since=since, until=until)

    assert await dead_in(START, START + 20) == sorted([at_0, at_10])
    assert await dead_in(START + 20, START + 40) == [at_20]
    assert await dead_in(None, START + 10) == [at_0]
    assert await dead_in(START + 10, START + 10) == []
    assert await dead_in(START + 5, None) == sorted([at_10, at_20])
    assert await journal.event_ids_with_jobs("unfinished", until=START + 30) == []
    assert await journal.event_ids_with_jobs("unfinished", until=START + 31) == [at_30]
    pages = journal.pages_of_event_ids_with_jobs(
        "dead", None, START + 10, page_size=1, until=START + 30
    )
    assert [p async for p in pages] == [[i] for i in sorted([at_10, at_20])]


async def test_paging_by_before_visits_every_event_once_even_when_ids_and_commits_disagree(
    journal: BaseJournal,
) -> None:
    """An event committed after one with a younger id (another node's clock behind) is still
    on exactly one page: the cursor follows the listing's order, not the ids'."""
    early, late, last = new_event_id(), new_event_id(), new_event_id()
    items = [new_event(), new_event(), new_event()]
    for item, event_id in zip(items, (late, early, last), strict=True):
        await journal.ingest(
            dataclasses.replace(item, event=dataclasses.replace(item.event, id=event_id))
        )
    pages, cursor = [], None
    while page := await journal.list_events(limit=1, before=cursor):
        pages.append(page[0].id)
        cursor = page[0].id
    assert pages == [last, early, late]
    # A cursor pruned meanwhile falls back to the ids: what is older than it by id.
    assert [e.id for e in await journal.list_events(before=new_event_id())] == [last, early, late]


async def test_positions_list_what_was_journaled_between_two(journal: BaseJournal) -> None:
    """``position()`` is 0 before the first event and grows with each one journaled, whatever
    its receive time; ``positions`` lists those between two positions, filtered as asked."""
    assert await journal.position() == 0
    one = new_event(received_at=START + 60)
    await journal.ingest(one)
    first = await journal.position()
    two, three = new_event(source="mail"), new_event(received_at=START - 3600)
    await journal.ingest(two)
    await journal.ingest(three)
    last = await journal.position()
    assert 0 < first < last

    async def ids(**filters: Any) -> list[str]:
        return [e.id for e in await journal.list_events(**filters)]

    assert await ids(positions=(0, first)) == [one.event.id]
    assert await ids(positions=(first, last)) == [three.event.id, two.event.id]
    assert await ids(positions=(first, last), source="shop") == [three.event.id]
    assert await ids(positions=(first, last), limit=1) == [three.event.id]
    assert await ids(positions=(last, last)) == []


async def test_list_events_by_a_rare_state_is_what_a_walk_over_every_event_finds(
    journal: BaseJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite lists a state few events are in starting from the jobs in that state, and one
    many are in by walking the events newest first (PostgreSQL's planner makes that choice by
    itself). Both give the same answer: order, limit, cursor and source filter included."""
    items = [new_event(source="ab"[i % 2], jobs=1 + i % 2) for i in range(40)]
    for item in items:
        await journal.ingest(item)
    states = itertools.cycle(
        [JobState.DONE, JobState.DEAD, None, JobState.RUNNING, JobState.DONE, JobState.CANCELLED]
    )
    ends: list[Finished] = []
    for item, state in zip(items, states, strict=False):
        ids = [job.id for job in item.jobs]
        if state is not None:
            await journal.claim(ids, "boot")
        if state not in (None, JobState.RUNNING):
            ends += [finished(i, state, str(state)) for i in ids]
    await journal.finish(ends)
    queries = [
        {"state": state, **extra}
        for state in EVENT_STATES
        for extra in ({}, {"limit": 3}, {"source": "b"}, {"before": items[20].event.id})
    ]
    from_jobs = [await journal.list_events(**q) for q in queries]  # type: ignore[arg-type]
    monkeypatch.setattr(schema, "FEW_STATE_JOBS", 0)  # every state counts as common now
    walked = [await journal.list_events(**q) for q in queries]  # type: ignore[arg-type]
    assert from_jobs == walked
    assert all(from_jobs[i] for i in range(0, len(queries), 4)), "every state has events"


async def test_counts_and_activity_describe_the_journal(store: Store) -> None:
    """Stats: jobs by state and source, oldest queued, events, recent receipts and outcomes."""
    async with store.journal() as journal:
        a, b = new_event(source="a", received_at=START), new_event(source="b", received_at=START)
        for item in (a, b):
            await journal.ingest(item)
        await journal.claim([a.jobs[0].id], "b")
        await journal.finish([finished(a.jobs[0].id, JobState.DONE, "done", now=START)])
        counts = await journal.counts()
        assert counts.events == 2 and counts.oldest_due_at == START
        assert (counts.jobs_by_state["done"], counts.jobs_by_state["queued"]) == (1, 1)
        assert counts.jobs_by_source == {"a": {"done": 1}, "b": {"queued": 1}}
        activity = await journal.activity(60)
        assert (activity.received, dict(activity.attempts_by_outcome)) == (2, {"done": 1})
        assert await journal.storage_bytes() > 0
        # b's job fails and waits out its backoff: queued, but not due, so not backlog's age.
        await journal.claim([b.jobs[0].id], "b")
        now = journal.clock.time()
        retry = finished(b.jobs[0].id, JobState.QUEUED, "retry", now=now, run_at=now + 600)
        await journal.finish([retry])
        assert (await journal.counts()).oldest_due_at is None
        assert [(x.lane[1], x.queued, x.oldest_due_at) for x in await journal.lane_backlog()] == [
            ("b", 1, None)
        ]
        assert await journal.oldest_queued_event_ids(5, exclude_source="webhookd") == []


async def test_lane_calls_are_what_the_attempts_of_a_lanes_actions_kept_of_the_window(
    store: Store,
) -> None:
    """What a restarted daemon's lanes start with (``lane_calls``): for each lane, the call of
    each attempt of its actions that ended in the window, when it left and what it counts, as
    its detail says, else at the attempt's end, of its answer's usage, else of the action's
    max_tokens (an attempt a crash cut off, recovered at the next start, among them); an
    attempt that posted an answer kept from before made none. A catch-all's action goes by
    the names it takes, not a configured source's; of each lane the latest ``most``."""

    async def attempt(
        journal: BaseJournal,
        source: str,
        action: str,
        state: JobState,
        outcome: str,
        at: float,
        **kw: object,
    ) -> None:
        item = new_event(source=source, jobs=0)
        item = NewEvent(item.event, (NewJob(new_job_id(), action, "openai", 3),))
        await journal.ingest(item)
        [claimed] = await journal.claim([item.jobs[0].id], "boot_before")
        done = finished(item.jobs[0].id, state, outcome, now=START + at, claim=claimed.claim)
        await journal.finish([dataclasses.replace(done, finished_at=START + at + 1.0, **kw)])

    async with store.journal() as dying:  # a crash with a call under way
        crashed = new_event(source="mail", jobs=0)
        crashed = NewEvent(crashed.event, (NewJob(new_job_id(), "draft", "openai", 3),))
        await dying.ingest(crashed)
        await dying.claim([crashed.jobs[0].id], "boot_crashed")
    store.clock.advance(LEASE_S + 1)  # past its lease (PostgreSQL); a new boot (SQLite)
    restarted_at = store.clock.time()
    async with store.journal() as journal:
        await journal.recover("boot_restarted", max_recoveries=3)
        done, queued, dead = JobState.DONE, JobState.QUEUED, JobState.DEAD
        usage = {"text": "a draft", "model": "m", "usage": {"total_tokens": 99}}
        await attempt(journal, "mail", "draft", done, "done", -20.0)  # ended before the window
        kept = {"lane_call_s": 0.25, "lane_tokens": 321}
        await attempt(journal, "mail", "draft", done, "done", 10.0, detail=kept)
        await attempt(journal, "mail", "draft", done, "done", 12.0, result=usage)
        refused = {"status": 429, "code": "rate_limit_exceeded"}
        await attempt(journal, "mail", "draft", dead, "dead", 14.0, detail=refused)
        await attempt(journal, "mail", "draft", queued, "retry", 16.0, detail={"status": 503})
        reused = {"then": {"status": 502}, "answer_reused": True}
        await attempt(journal, "mail", "draft", queued, "retry", 18.0, detail=reused)
        await attempt(journal, "mail", "other", done, "done", 19.0, detail=kept)  # no lane
        await attempt(journal, "gh", "sum", done, "done", 20.0, detail=kept)
        latest = {"lane_call_s": 0.5, "lane_tokens": 7}
        await attempt(journal, "gitlab", "sum", done, "done", 22.0, detail=latest)
        await attempt(journal, "shop", "sum", done, "done", 24.0, detail=kept)  # its own "sum"
        wanted = [
            LaneAction("mail", "draft", "llm", 100, 200),
            LaneAction(CATCH_ALL, "sum", "all", 1, 50),
        ]
        calls = await journal.lane_calls(wanted, START, named={"mail", "shop"})
        assert await journal.lane_calls([], START) == {}
    assert calls == {
        "llm": [
            LaneCall(START + 10.25, 321),
            LaneCall(START + 13.0, 99),  # its end, its answer's usage
            LaneCall(START + 15.0, 0),  # refused: the lane gave its tokens back
            LaneCall(START + 17.0, 200),  # its end, the action's max_tokens
            LaneCall(restarted_at, 200),  # cut off by the crash: counted as late as it can be
        ],
        "all": [LaneCall(START + 22.5, 7)],
    }


async def test_a_group_commit_takes_in_the_webhooks_queued_a_turn_later(
    journal: BaseJournal,
) -> None:
    """Webhooks queued one turn of the loop after the writer woke for the first ones share
    their commit (under load, a group of connections answered together sends its next
    webhooks a few turns later; without the wait the groups settled at half the connections)."""
    before = journal.commits
    first = [journal.submit_ingest(new_event(body=b'{"n": %d}' % n)) for n in range(3)]
    await asyncio.sleep(0)
    second = [journal.submit_ingest(new_event(body=b'{"n": %d}' % n)) for n in range(3, 6)]
    results = await asyncio.gather(*first, *second)
    assert not any(r.duplicate for r in results)
    assert journal.commits - before == 1


# -- retention -------------------------------------------------------------------------------


async def test_prune_keeps_what_is_not_expired(store: Store) -> None:
    """Done events go after keep_done, dead ones only after keep_dead, dedup keys after theirs."""
    clock = store.clock
    async with store.journal() as journal:
        done, dead = new_event(received_at=clock.time()), new_event(received_at=clock.time())
        queued = new_event(received_at=clock.time())
        for item in (done, dead, queued):
            await journal.ingest(item)
        await journal.claim([done.jobs[0].id, dead.jobs[0].id], "b")
        await journal.finish(
            [
                finished(done.jobs[0].id, JobState.DONE, "done", now=clock.time()),
                finished(dead.jobs[0].id, JobState.DEAD, "dead", now=clock.time()),
            ]
        )
        keep = {"keep_done_s": 3600.0, "keep_dead_s": 86400.0, "keep_dedup_s": 7200.0}
        assert (await journal.prune(**keep)).events == 0
        clock.advance(3601)
        pruned = await journal.prune(**keep)
        assert (pruned.events, pruned.jobs, pruned.dedup) == (1, 1, 0)
        with pytest.raises(NotFound):
            await journal.get_event(done.event.id)
        clock.advance(86400)
        pruned = await journal.prune(**keep)
        assert (pruned.events, pruned.dedup) == (1, 3)
        assert (await journal.counts()).events == 1  # the queued one is never pruned
        assert await journal.maintain() >= 0


async def test_dedup_keys_stamped_ahead_of_the_clock_are_pruned_a_keep_after_it_steps_back(
    store: Store,
) -> None:
    """Keys made while the clock was a day ahead still dedup once it is stepped back, and are
    taken as made then: pruned ``keep_dedup_s`` later, not a day and that, and the keys that
    came after them with them (on SQLite such a head held every later key's pruning until its
    own time came)."""
    clock = store.clock
    keep = {"keep_done_s": 3600.0, "keep_dead_s": 3600.0, "keep_dedup_s": 7200.0}
    async with store.journal() as journal:
        ahead = [new_event(received_at=START + 86400) for _ in range(3)]
        later = [new_event(received_at=START) for _ in range(2)]
        for item in (*ahead, *later):
            await journal.ingest(item)
        assert (await journal.prune(**keep, batch=3)).dedup == 0
        clock.advance(7201)
        assert (await journal.key_owner(ahead[0].event.dedup_key)) is not None  # still dedups
        pruned = 0
        while (round_ := await journal.prune(**keep, batch=3)).dedup or round_.events:
            pruned += round_.dedup
        assert pruned == 5
        assert await journal.key_owner(ahead[0].event.dedup_key) is None


async def test_a_step_of_the_clock_moves_queued_jobs_times_where_one_clock_wrote_them(
    store: Store,
) -> None:
    """A step of the wall clock moves every queued job's run_at as far on SQLite (their order
    kept, a retry's wait as planned); a cluster's journal leaves them (None)."""
    clock = store.clock
    async with store.journal() as journal:
        waiting, due = new_event(received_at=clock.time()), new_event(received_at=clock.time())
        for item in (waiting, due):
            await journal.ingest(item)
        await journal.claim([waiting.jobs[0].id], "b")
        retry_at = clock.time() + 30
        await journal.finish(
            [
                finished(
                    waiting.jobs[0].id, JobState.QUEUED, "retry", now=clock.time(), run_at=retry_at
                )
            ]
        )
        for step in (-3600.0, 7200.0):
            clock.step_wall(step)
            moved = await journal.clock_stepped(step)
            run_at = (await journal.get_event(waiting.event.id)).jobs[0].run_at
            if store.kind == "sqlite":
                assert moved == 2
                assert run_at == pytest.approx(clock.time() + 30)
                assert await journal.next_run_at(frozenset(), after=clock.time()) == (
                    pytest.approx(clock.time() + 30)
                )
            else:
                assert moved is None and run_at == pytest.approx(retry_at)


async def test_jobs_planned_further_ahead_than_any_wait_are_brought_due_once(
    journal: BaseJournal,
) -> None:
    """A job due a year ahead (a clock a year ahead planned it) is due by ``latest``; one
    within it is left; a second call moves nothing."""
    clock = journal.clock
    far, near = new_event(received_at=clock.time()), new_event(received_at=clock.time())
    for item in (far, near):
        await journal.ingest(item)
    await journal.claim([far.jobs[0].id, near.jobs[0].id], "b")
    await journal.finish(
        [
            finished(
                far.jobs[0].id,
                JobState.QUEUED,
                "retry",
                now=clock.time(),
                run_at=clock.time() + 365 * 86400,
            ),
            finished(
                near.jobs[0].id,
                JobState.QUEUED,
                "retry",
                now=clock.time(),
                run_at=clock.time() + 60,
            ),
        ]
    )
    latest = clock.time() + 3600
    assert await journal.bring_due_by(latest) == 1
    assert (await journal.get_event(far.event.id)).jobs[0].run_at == pytest.approx(latest)
    assert (await journal.get_event(near.event.id)).jobs[0].run_at == pytest.approx(
        clock.time() + 60
    )
    assert await journal.bring_due_by(latest) == 0


async def test_prune_works_in_bounded_batches(journal: BaseJournal) -> None:
    """Each prune call deletes at most ``batch`` events: no long transaction on a big backlog."""
    items = [new_event() for _ in range(7)]
    for item in items:
        await journal.ingest(item)
    ids = [i.jobs[0].id for i in items]
    await journal.claim(ids, "b")
    await journal.finish([finished(i, JobState.DONE, "done") for i in ids])
    keep = {"keep_done_s": 0.0, "keep_dead_s": 0.0, "keep_dedup_s": 0.0}
    journal.clock.advance(1)  # type: ignore[attr-defined]
    sizes = []
    while (pruned := await journal.prune(**keep, batch=3)).events or pruned.dedup:
        sizes.append(pruned.events)
    assert sizes == [3, 3, 1]


async def test_prune_walks_on_from_where_the_batch_before_stopped(journal: BaseJournal) -> None:
    """Events kept for a dead job sit before the expired ones: a batch starts at the ``walked_to``
    of the one before (so the kept ones are looked at once per pass, not once per batch), and
    an expired event before ``start_at`` is left for the next pass."""
    items = [new_event(received_at=START + n, body=b'{"n": %d}' % n) for n in range(6)]
    for item in items:
        await journal.ingest(item)
    ids = [i.jobs[0].id for i in items]
    journal.clock.advance(5)  # type: ignore[attr-defined]  # the last of them is due
    await journal.claim(ids, "b")
    await journal.finish(
        [finished(i, JobState.DEAD if n < 2 else JobState.DONE, "x") for n, i in enumerate(ids)]
    )
    journal.clock.advance(95)  # type: ignore[attr-defined]
    keep = {"keep_done_s": 50.0, "keep_dead_s": 3600.0, "keep_dedup_s": 3600.0}

    later = await journal.prune(**keep, batch=10, start_at=START + 4)
    assert later.events == 2  # the last two; the two expired before START + 4 stay
    assert later.walked_to == journal.clock.time() - 50  # the walk reached its end
    first = await journal.prune(**keep, batch=1)
    assert (first.events, first.walked_to) == (1, START + 2)  # past the two kept dead ones
    second = await journal.prune(**keep, batch=1, start_at=first.walked_to)
    assert (second.events, second.walked_to) == (1, START + 3)
    last = await journal.prune(**keep, batch=1, start_at=second.walked_to)
    assert last.events == 0
    assert (await journal.counts()).events == 2  # the dead ones


async def test_series_counts_per_minute_and_the_backlog_at_each_minutes_end(store: Store) -> None:
    """The dashboard's charts: events by minute of arrival, jobs by minute of finishing (done
    and dead apart), and the jobs queued or running at each minute's end; per source too."""
    now = store.clock.time()  # 20 s into a minute
    m0 = now - now % 60  # the current minute; the window is [m0 - 240, m0 + 60)
    old = new_event(received_at=m0 - 3600)  # before the window, still queued
    two = new_event(received_at=m0 - 230, jobs=2)  # minute 0
    one = new_event(received_at=m0 - 110)  # minute 2
    mail = new_event(source="mail", received_at=m0 + 5)  # minute 4, running now
    async with store.journal() as journal:
        for item in (old, two, one, mail):
            await journal.ingest(item)
        ended = [two.jobs[0].id, two.jobs[1].id, one.jobs[0].id]
        assert len(await journal.claim(ended, "boot")) == 3  # an outcome needs a claim to fence
        await journal.finish(
            [
                finished(two.jobs[0].id, JobState.DONE, "done", now=m0 - 200),  # minute 0
                finished(two.jobs[1].id, JobState.DEAD, "dead", now=m0 - 50),  # minute 3
                finished(one.jobs[0].id, JobState.DONE, "done", now=m0 + 1),  # minute 4
            ]
        )
        assert len(await journal.claim([mail.jobs[0].id], "boot")) == 1

        series = await journal.series(now=now, minutes=5)
        assert (series.start, series.step_s) == (m0 - 240, 60)
        assert series.accepted == (1, 0, 1, 0, 1)
        assert series.finished == (1, 0, 0, 0, 1)
        assert series.dead == (0, 0, 0, 1, 0)
        # At each minute's end: old throughout; two's second job until it died in minute 3;
        # one from minute 2 until done in minute 4; mail from minute 4 on.
        assert series.backlog == (2, 2, 3, 2, 2)

        only_mail = await journal.series(now=now, minutes=5, source="mail")
        assert only_mail.accepted == (0, 0, 0, 0, 1)
        assert only_mail.finished == only_mail.dead == (0, 0, 0, 0, 0)
        assert only_mail.backlog == (0, 0, 0, 0, 1)

    # Read from the store, not from the process: a journal opened anew reads the same.
    async with store.journal() as reopened:
        assert await reopened.series(now=now, minutes=5) == series


async def test_filtered_actions_are_kept_with_the_event(journal: BaseJournal) -> None:
    """An event keeps the names of the actions its ``when`` filtered; with none it has no jobs
    and reads as done."""
    base = new_event(jobs=0)
    item = NewEvent(base.event, (), filtered=("deploy", "notify"))
    await journal.ingest(item)
    detail = await journal.get_event(item.event.id)
    assert detail.filtered == ("deploy", "notify") and detail.state == "done"
    plain = new_event()
    await journal.ingest(plain)
    assert (await journal.get_event(plain.event.id)).filtered == ()


async def test_an_events_query_is_kept_as_sent_and_comes_back_with_its_claimed_job(
    journal: BaseJournal,
) -> None:
    """The URL query an event was received with is read back as it was written, by the
    event's page and by the claim that hands its job to a worker; an event without one has
    ``""``."""
    sent = new_event()
    item = NewEvent(dataclasses.replace(sent.event, query="store=eu&note=a%20b+c"), sent.jobs)
    plain = new_event()
    for one in (item, plain):
        await journal.ingest(one)
    assert (await journal.get_event(item.event.id)).event.query == "store=eu&note=a%20b+c"
    assert (await journal.get_event(plain.event.id)).event.query == ""
    claimed = await journal.claim([item.jobs[0].id, plain.jobs[0].id], "b")
    assert {c.event.id: c.event.query for c in claimed} == {
        item.event.id: "store=eu&note=a%20b+c",
        plain.event.id: "",
    }


async def test_expired_events_and_the_oldest_queued_are_counted_and_named(store: Store) -> None:
    """What a prune would delete is counted beforehand (a progress bar), and the oldest queued
    work is named by event, leaving out the source asked (a backlog alert)."""
    async with store.journal() as journal:
        gone = new_event(received_at=START - 7200)
        kept = new_event(received_at=START - 7200)
        alert = new_event(source="webhookd", received_at=START - 10)
        late = new_event(received_at=START - 5)
        for item in (gone, kept, alert, late):
            await journal.ingest(item)
        assert len(await journal.claim([gone.jobs[0].id], "boot")) == 1
        await journal.finish([finished(gone.jobs[0].id, JobState.DONE, "done", now=START - 7000)])
        assert await journal.expired_events(keep_done_s=3600, keep_dead_s=3600) == 1
        oldest = await journal.oldest_queued_event_ids(2, exclude_source="webhookd")
        assert oldest == [kept.event.id, late.event.id]


async def test_only_a_journal_nodes_share_keeps_lane_buckets_and_grants_each_once(
    store: Store, journal: BaseJournal
) -> None:
    """PostgreSQL keeps lanes' buckets for all its nodes (a fresh lane's burst is granted once,
    the next node is told when to ask again); the SQLite file leaves lanes in memory."""
    spec = LaneSpec("llm", 60, None, 3.0, SHARED_LOG_S, 60.0)
    if store.kind == "sqlite":
        assert not journal.shares_lanes
        with pytest.raises(JournalError):
            await journal.reserve_lane(spec, need=(1, 0), want=(10, 0))
        return
    assert journal.shares_lanes
    async with store.journal() as other:
        first = await journal.reserve_lane(spec, need=(1, 0), want=(10, 0))
        second = await other.reserve_lane(spec, need=(1, 0), want=(10, 0))
    assert (first.requests, second.requests) == (3, 0)
    assert second.retry_s == pytest.approx(1.0)


async def test_dead_between_counts_the_jobs_that_went_dead_in_a_window(
    journal: BaseJournal,
) -> None:
    """What a start tells of dead jobs the last run left untold: those gone dead after one time
    and before another, by source, the latest few in the order they died, not the alerts'."""
    died = []
    for n, source in enumerate(("shop", "shop", "git", "webhookd", "shop")):
        item = new_event(source=source)
        await journal.ingest(item)
        [job] = item.jobs
        await journal.claim([job.id], "b")
        await journal.finish(
            [finished(job.id, JobState.DEAD, "dead", now=START + 10 * n, error=f"no {n}")]
        )
        died.append((item.event.id, source, job.action, f"no {n}"))
    window = await journal.dead_between(START + 5, START + 45, 2, "webhookd")
    assert window.by_source == {"shop": 2, "git": 1}
    assert window.latest == [died[2], died[4]]
    assert (await journal.dead_between(START + 35, START + 45, 5, "webhookd")).by_source == {
        "shop": 1
    }
    nothing = await journal.dead_between(START + 40, START + 40, 5, "webhookd")
    assert (nothing.by_source, nothing.latest) == ({}, [])
