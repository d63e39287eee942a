"""Retention: expired rows go in small batches, free pages go back, the file stops growing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from ops_support import ingest

from webhookd.app import Daemon
from webhookd.clock import ManualClock
from webhookd.journal import (
    VACUUM_PAGES_MAX,
    VACUUM_PAGES_MIN,
    Finished,
    Journal,
    Pruned,
    vacuum_pages,
)
from webhookd.models import JobState
from webhookd.retention import prune_all

HOUR = 3600.0
KEEP = {"keep_done_s": 1 * HOUR, "keep_dead_s": 3 * HOUR, "keep_dedup_s": 2 * HOUR}


async def work_off(journal: Journal, job_ids: list[str], *, dead_every: int = 0) -> None:
    """Claim the jobs and record them finished: done, or dead for every ``dead_every``-th."""
    claimed = await journal.claim(job_ids, "boot")
    now = journal.clock.time()
    await journal.finish(
        [
            Finished(
                job_id=c.job.id,
                attempt=1,
                state=JobState.DEAD if dead_every and i % dead_every == 0 else JobState.DONE,
                started_at=now,
                finished_at=now,
                outcome="dead" if dead_every and i % dead_every == 0 else "done",
                result={"status": 200},
            )
            for i, c in enumerate(claimed)
        ]
    )


def table_counts(path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("events", "jobs", "attempts", "dedup")
        }


async def test_file_stops_growing_under_steady_load_with_pruning(tmp_path: Path) -> None:
    """Six simulated hours of steady traffic: past the retention window the size levels off."""
    clock = ManualClock()
    path = tmp_path / "journal.db"
    body = b'{"pad": "' + b"x" * 1500 + b'"}'
    sizes: list[int] = []
    async with Journal(path, clock=clock) as journal:
        for _hour in range(6):
            for _quarter in range(4):  # 300 webhooks every 15 minutes, worked off at once
                jobs = await ingest(journal, "shop", 300, body)
                await work_off(journal, jobs, dead_every=20)
                clock.advance(900)
                await prune_all(journal, **KEEP)  # the daemon's retention task
            sizes.append(await journal.size_bytes())
        counts = table_counts(path)
        free, _ = await journal.compact()
    # Done rows live an hour (1,200 events), dead ones three (5 % of them), plus one prune gap.
    assert counts["events"] <= 1200 + 3 * 60 + 300, counts
    assert counts["dedup"] <= 2 * 1200 + 200, counts
    assert free == 0
    # Steady state is reached after the longest retention (3 h): no growth from then on.
    assert sizes[5] <= sizes[3] * 1.05, sizes
    assert sizes[5] < sizes[0] * 4, sizes  # and it is bounded by the window, not by the load


async def test_prune_takes_small_batches_and_keeps_what_is_not_expired(tmp_path: Path) -> None:
    """Each prune call deletes at most one batch; unfinished and recent events stay; dead stay
    longer than done; dedup keys go after their own window."""
    clock = ManualClock()
    path = tmp_path / "journal.db"
    async with Journal(path, clock=clock) as journal:
        old_done = await ingest(journal, "shop", 1200)
        await work_off(journal, old_done)
        old_dead = await ingest(journal, "shop", 10)
        await work_off(journal, old_dead, dead_every=1)
        queued = await ingest(journal, "shop", 5)  # never worked: must survive
        clock.advance(1.5 * HOUR)
        recent = await ingest(journal, "shop", 7)
        await work_off(journal, recent)

        first = await journal.prune(**KEEP, batch=500)
        assert first.events == 500
        assert first.dedup == 0  # dedup keys live 2 h
        events, _ = await prune_all(journal, **KEEP)
        assert events == 700
        assert table_counts(path)["events"] == 10 + 5 + 7

        clock.advance(2.1 * HOUR)  # now the dead (3 h), the recent done and every dedup key
        events, dedup = await prune_all(journal, **KEEP)
        assert (events, dedup) == (10 + 7, 1222)
        left = table_counts(path)
        assert (left["events"], left["jobs"], left["dedup"]) == (5, 5, 0)  # the queued stay
        assert await journal.backlog() == 5
        assert set(queued) == await job_ids(path)


async def test_a_prune_from_another_process_rests_between_its_batches(tmp_path: Path) -> None:
    """``rest`` (``webhookd prune`` beside a daemon on SQLite) is awaited between batches, with
    how long the batch before took, and not after the last: the daemon's writer gets the file
    between two batches instead of waiting behind all of them."""
    clock = ManualClock()
    rests: list[float] = []

    async def rest(took_s: float) -> None:
        rests.append(took_s)

    async with Journal(tmp_path / "journal.db", clock=clock) as journal:
        assert journal.one_writer
        await work_off(journal, await ingest(journal, "shop", 1200))
        clock.advance(3 * HOUR)
        batches: list[Pruned] = []
        events, _ = await prune_all(journal, **KEEP, on_batch=batches.append, rest=rest)
    assert events == 1200
    # One rest after each batch that deleted something, none after the one that found none
    # (then compaction's steps, each but the last followed by one).
    assert len(rests) >= sum(1 for b in batches if b.events or b.dedup) >= 3
    assert all(took >= 0 for took in rests)


class _SlowBatches(Journal):
    """The real journal, each prune batch taking six seconds of ``clock``; the batch numbered
    ``hold_at`` (from 1) waits for ``go`` first."""

    clock: ManualClock
    hold_at = 0
    calls = 0

    async def prune(self, **kwargs: Any) -> Pruned:
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            await asyncio.Event().wait()  # until cancelled
        self.clock.advance(6)
        return await super().prune(**kwargs)


async def test_a_long_retention_round_says_how_far_it_has_got_and_when_a_stop_cuts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A round of batches taking 6 s each logs its progress every 10 s; a stop in the middle
    of one says what it pruned and that the rest waits for the next round."""
    clock = ManualClock()
    cfg = make_config(tmp_path, journal="keep_done_h = 1")
    daemon = Daemon(cfg, install_signals=False, clock=clock)
    caplog.set_level(logging.INFO, logger="webhookd")
    journal = _SlowBatches(tmp_path / "slow.db", clock=clock)
    journal.held = asyncio.Event()
    async with journal:
        await work_off(journal, await ingest(journal, "shop", 1200))
        clock.advance(3 * HOUR)
        assert await daemon._prune_round(journal) == (1200, 0)
        said = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
        # Batches of 500, 500, 200 and none, at 6, 12, 18 and 24 s: said at 12 s and 24 s.
        assert said == [
            "retention pruning: 1000 event(s), 0 dedup key(s) so far",
            "retention pruning: 1200 event(s), 0 dedup key(s) so far",
        ]

        caplog.clear()
        await work_off(journal, await ingest(journal, "shop", 1200))
        clock.advance(3 * HOUR)
        journal.calls, journal.hold_at = 0, 2
        round_ = asyncio.create_task(daemon._prune_round(journal))
        await journal.held.wait()
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
    said = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
    assert said == [
        "retention round cut short by the stop: 500 event(s), 0 dedup key(s) pruned; the rest,"
        " and the free pages, at the next round"
    ]


class _WalkRecorded(Journal):
    """The real journal, noting where each ``prune`` call starts its walk."""

    starts: list[float | None]

    async def prune(self, **kwargs: Any) -> Pruned:
        self.starts.append(kwargs.get("start_at"))
        return await super().prune(**kwargs)


async def test_a_pass_walks_past_the_events_kept_for_dead_jobs_once(tmp_path: Path) -> None:
    """Old events kept for their dead jobs come first in the walk; after the first batch of a
    pass, each batch starts where the one before stopped instead of walking them again (a pass
    over 50,000 expired events behind 100,000 kept took 15 s of CPU, now 2.6)."""
    clock = ManualClock()
    journal = _WalkRecorded(tmp_path / "journal.db", clock=clock)
    journal.starts = []
    async with journal:
        await work_off(journal, await ingest(journal, "shop", 30), dead_every=1)
        clock.advance(60)
        done_at = clock.time()
        await work_off(journal, await ingest(journal, "shop", 1200))
        clock.advance(1.5 * HOUR)
        events, _ = await prune_all(journal, **KEEP)
        assert events == 1200
        assert journal.starts == [None, done_at, done_at, clock.time() - KEEP["keep_done_s"]]
        assert table_counts(tmp_path / "journal.db")["events"] == 30


async def job_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return {r[0] for r in conn.execute("SELECT id FROM jobs")}


async def test_a_replayed_event_is_not_pruned_under_it(tmp_path: Path) -> None:
    """A dead event replayed after it expired is queued again, so retention leaves it alone."""
    clock = ManualClock()
    async with Journal(tmp_path / "journal.db", clock=clock) as journal:
        jobs = await ingest(journal, "shop", 3)
        await work_off(journal, jobs, dead_every=1)
        clock.advance(4 * HOUR)
        dead = await journal.event_ids_with_jobs("dead")
        await journal.replay(dead[:1])
        events, _ = await prune_all(journal, **KEEP)
        assert events == 2
        assert (await journal.get_event(dead[0])).state == "queued"


def test_an_incremental_vacuum_takes_as_many_pages_as_fit_in_its_time() -> None:
    """Its cost per page grows with the free list (seconds per 1,000 pages after a prune of a
    million events): past its 50 ms the next call takes half as many pages, down to a floor;
    well under it, twice as many, up to the 1,000 of a steady day."""
    pages = VACUUM_PAGES_MAX
    seen = []
    for _ in range(10):
        pages = vacuum_pages(pages, 2.9)
        seen.append(pages)
    assert seen[:3] == [500, 250, 125] and pages == VACUUM_PAGES_MIN
    assert vacuum_pages(100, 0.03) == 100  # within its time: as it was
    for _ in range(10):
        pages = vacuum_pages(pages, 0.001)
    assert pages == VACUUM_PAGES_MAX
