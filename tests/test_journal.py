"""The journal: durable ingest, dedup, group commit, claims, outcomes, recovery, replay, prune."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from webhookd.clock import ManualClock
from webhookd.errors import JournalError, NotFound
from webhookd.journal import MIGRATIONS, Finished, Journal, NewEvent, NewJob, Replayed
from webhookd.models import Event, JobState, Priority, new_event_id, new_job_id


def new_event(
    body: bytes = b'{"a": 1}',
    key: str | None = None,
    source: str = "shop",
    jobs: int = 1,
    received_at: float = 1_700_000_000.0,
) -> NewEvent:
    event = Event(
        id=new_event_id(),
        source=source,
        received_at=received_at,
        dedup_key=key or f"{source}:{new_event_id()}",
        tenant="t1",
        priority=Priority.NORMAL,
        headers=(("Content-Type", "application/json"), ("X-Thing", "é")),
        body=body,
    )
    return NewEvent(
        event, tuple(NewJob(new_job_id(), f"forward-{i}", "forward", 3) for i in range(jobs))
    )


def finished(
    job_id: str,
    state: JobState,
    outcome: str,
    attempt: int = 1,
    now: float = 1_700_000_001.0,
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


async def test_ingest_round_trips_raw_body_and_headers(journal: Journal) -> None:
    """What was received is stored byte for byte: body, headers, source, tenant, priority."""
    body = b'{"emoji": "\\ud83d\\ude00", "raw": "\xff\xfe"}'
    item = new_event(body=body)
    result = await journal.ingest(item)
    assert result.event_id == item.event.id and not result.duplicate
    detail = await journal.get_event(item.event.id)
    assert detail.event.body == body
    assert detail.event.headers == item.event.headers
    assert detail.state == "queued"
    assert [j.state for j in detail.jobs] == [JobState.QUEUED]


async def test_duplicate_key_returns_original_even_within_one_batch(journal: Journal) -> None:
    """The same delivery twice, even in one group commit, creates one event and one set of jobs."""
    first, second, third = (new_event(key="shop:delivery-1") for _ in range(3))
    results = await asyncio.gather(*(journal.ingest(x) for x in (first, second, third)))
    assert [r.duplicate for r in results] == [False, True, True]
    assert {r.event_id for r in results} == {first.event.id}
    counts = await journal.counts()
    assert counts.events == 1 and counts.jobs_by_state["queued"] == 1


def with_body_key(item: NewEvent, body_key: str) -> NewEvent:
    return NewEvent(item.event, item.jobs, body_key)


@pytest.mark.parametrize("one_batch", [False, True])
async def test_body_key_makes_a_fresh_delivery_id_a_duplicate(
    journal: Journal, one_batch: bool
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


async def test_group_commit_batches_concurrent_ingests(journal: Journal) -> None:
    """Concurrent webhooks share transactions: far fewer commits (fsyncs) than events."""
    before = journal.commits
    results = await asyncio.gather(*(journal.ingest(new_event()) for _ in range(300)))
    assert len({r.event_id for r in results}) == 300
    assert journal.commits - before < 100
    assert (await journal.counts()).events == 300


async def test_ingest_is_on_disk_when_acknowledged(tmp_path: Path) -> None:
    """Once ingest returns, another connection (another process) sees the event."""
    path = tmp_path / "j.db"
    async with Journal(path) as journal:
        item = new_event()
        await journal.ingest(item)
        with sqlite3.connect(path) as other:
            rows = other.execute("SELECT id FROM events").fetchall()
        assert rows == [(item.event.id,)]


async def test_commit_hands_new_jobs_to_the_dispatcher(journal: Journal) -> None:
    """Each committed ingest batch announces its jobs at once (no polling delay)."""
    announced: list[str] = []
    journal.on_commit = lambda ready: announced.extend(r.id for r in ready)
    item = new_event(jobs=2)
    await journal.ingest(item)
    assert announced == [j.id for j in item.jobs]


async def test_claim_counts_the_attempt_before_the_work(journal: Journal) -> None:
    """A claim commits state=running and attempts+1; a job can only be claimed once."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    claimed = await journal.claim([job_id], "boot_a")
    assert [c.job.attempts for c in claimed] == [1]
    assert claimed[0].event.body == item.event.body
    assert await journal.claim([job_id], "boot_a") == []
    detail = await journal.get_event(item.event.id)
    assert detail.jobs[0].state == JobState.RUNNING and detail.state == "running"


async def test_finish_records_attempt_and_wait_does_not_count(journal: Journal) -> None:
    """A rate-limit wait re-queues without using an attempt; a retry keeps it and logs the error."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    await journal.claim([job_id], "b")
    await journal.finish([finished(job_id, JobState.QUEUED, "wait", run_at=5.0, error="429")])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.attempts, job.state, job.history) == (0, JobState.QUEUED, ())
    await journal.claim([job_id], "b")
    await journal.finish([finished(job_id, JobState.QUEUED, "retry", run_at=6.0, error="500")])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert job.attempts == 1 and job.run_at == 6.0
    assert [(a.n, a.outcome, a.error) for a in job.history] == [(1, "retry", "500")]


async def test_recovery_requeues_then_poison_pills(journal: Journal) -> None:
    """Jobs left running by an earlier boot return to queued; the third interruption is dead."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    for boot in range(1, 4):
        await journal.claim([job_id], f"boot_{boot}")
        recovery = await journal.recover(f"boot_{boot + 1}", max_recoveries=3)
        expected = (0, 1) if boot == 3 else (1, 0)
        assert (recovery.requeued, recovery.dead) == expected
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert job.state == JobState.DEAD and "poison pill" in (job.last_error or "")
    assert [a.outcome for a in job.history] == ["interrupted"] * 3


async def test_recovery_leaves_this_boots_jobs_alone(journal: Journal) -> None:
    """Recovery only touches jobs of other boots (a job this process runs stays running)."""
    item = new_event()
    await journal.ingest(item)
    await journal.claim([item.jobs[0].id], "boot_now")
    assert await journal.recover("boot_now", 3) == type(await journal.recover("boot_now", 3))(0, 0)


async def test_unclaim_returns_job_without_counting(journal: Journal) -> None:
    """A job cancelled by a drain goes back to queued with its attempt not counted."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    await journal.claim([job_id], "b")
    await journal.unclaim([job_id])
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)


async def test_replay_requeues_dead_jobs_with_fresh_attempts(journal: Journal) -> None:
    """Replay puts a dead event's jobs back to queued with attempts reset; unknown ids fail."""
    item = new_event()
    await journal.ingest(item)
    job_id = item.jobs[0].id
    await journal.claim([job_id], "b")
    await journal.finish([finished(job_id, JobState.DEAD, "dead", error="404")])
    assert await journal.dead_event_ids() == [item.event.id]
    assert await journal.replay([item.event.id]) == {item.event.id: Replayed(1, 0)}
    job = (await journal.get_event(item.event.id)).jobs[0]
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert [a.outcome for a in job.history] == ["dead"]  # history is kept
    with pytest.raises(NotFound):
        await journal.replay(["evt_nope"])


async def test_replay_runs_a_waiting_queued_job_now_keeping_its_attempts(tmp_path: Path) -> None:
    """Replay makes a job parked in backoff due now, with its attempts and kept result intact."""
    clock = ManualClock()
    async with Journal(tmp_path / "journal.db", clock=clock) as journal:
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


async def test_ready_orders_by_priority_then_age_and_respects_run_at(journal: Journal) -> None:
    """Due jobs come highest priority first, oldest first; future ones wait."""
    low = new_event()
    high = new_event()
    object.__setattr__(low.event, "priority", Priority.LOW)
    object.__setattr__(high.event, "priority", Priority.HIGH)
    await journal.ingest(low)
    await journal.ingest(high)
    ready = await journal.ready(now=2e9, limit=10)
    assert [r.id for r in ready] == [high.jobs[0].id, low.jobs[0].id]
    assert await journal.ready(now=0, limit=10) == []
    assert await journal.next_run_at() == low.event.received_at


async def test_list_events_filters_by_derived_state(journal: Journal) -> None:
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


async def test_prune_keeps_what_is_not_expired(tmp_path: Path) -> None:
    """Done events go after keep_done, dead ones only after keep_dead, dedup keys after theirs."""
    clock = ManualClock(start=1_700_000_000.0)
    async with Journal(tmp_path / "j.db", clock=clock) as journal:
        done, dead = new_event(received_at=clock.time()), new_event(received_at=clock.time())
        for item in (done, dead):
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
        assert (pruned.events, pruned.dedup) == (1, 0)
        with pytest.raises(NotFound):
            await journal.get_event(done.event.id)
        clock.advance(86400)
        pruned = await journal.prune(**keep)
        assert (pruned.events, pruned.dedup) == (1, 2)
        assert (await journal.counts()).events == 0


async def test_schema_version_is_recorded_and_newer_files_refused(tmp_path: Path) -> None:
    """The file carries its schema version; a file from a newer webhookd is refused clearly."""
    path = tmp_path / "j.db"
    async with Journal(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(JournalError, match="newer"):
        async with Journal(path):
            pass


def test_ids_sort_by_creation() -> None:
    """External ids are sortable strings: later ids compare greater, and never repeat."""
    ids = [new_event_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_journal_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """The journal and its -wal and -shm are created 0600 under a permissive umask, and a file
    an older version left world-readable is tightened on open: other users cannot read bodies."""
    path = tmp_path / "j.db"
    old_umask = os.umask(0o022)
    try:
        async with Journal(path) as journal:
            await journal.ingest(new_event())
            names = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert {stat.S_IMODE(p.stat().st_mode) for p in names} == {0o600}
        path.chmod(0o644)
        async with Journal(path) as journal:
            await journal.ingest(new_event())
            assert {stat.S_IMODE(p.stat().st_mode) for p in names} == {0o600}
    finally:
        os.umask(old_umask)


async def test_series_counts_per_minute_and_the_backlog_at_each_minutes_end(
    tmp_path: Path,
) -> None:
    """The dashboard's charts: events by minute of arrival, jobs by minute of finishing (done
    and dead apart), and the jobs queued or running at each minute's end; per source too."""
    clock = ManualClock(1_700_000_000.0)  # 20 s into a minute
    async with Journal(tmp_path / "journal.db", clock=clock) as journal:
        now = clock.time()
        m0 = now - now % 60  # the current minute; the window is [m0 - 240, m0 + 60)
        old = new_event(received_at=m0 - 3600)  # before the window, still queued
        two = new_event(received_at=m0 - 230, jobs=2)  # minute 0
        one = new_event(received_at=m0 - 110)  # minute 2
        mail = new_event(source="mail", received_at=m0 + 5)  # minute 4, running now
        for item in (old, two, one, mail):
            await journal.ingest(item)
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

    # Read from the file, not from the process: a journal opened anew reads the same.
    async with Journal(tmp_path / "journal.db", clock=clock) as reopened:
        assert await reopened.series(now=now, minutes=5) == series
