"""The worker pool: backoff schedule, outcomes, timeouts, concurrency caps, waits, wake-ups,
drain and crash recovery — over a real journal file and a real loopback target.

Most tests drive the pool in burst mode (``run_until_idle``) with a ``ManualClock``: a retry's
``run_at`` is read back, the clock is moved there, and the pool is run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Running, Target, jobs_for, make_config, new_event
from procs import poll
from prometheus_client.parser import text_string_to_metric_families
from sched_support import leftover_counts, until

import webhookd
import webhookd.journal.sqlite as journal_module
from webhookd import actions as action_registry
from webhookd.actions.base import Action, Outcome, Resources
from webhookd.attempts import MAX_WAITS, backoff_s
from webhookd.clock import ManualClock
from webhookd.config import Config, RetryPolicy
from webhookd.hold import HOLD_MAX_S, HOLD_QUIET_S, HOLD_WINDOW_S
from webhookd.journal import Cap, CapClaim, Finished, Journal, NewEvent, Ready, Recorded
from webhookd.journal.batch import IngestOp
from webhookd.limiter import Lane as RateLane
from webhookd.limiter import build_lanes
from webhookd.metrics import Metrics
from webhookd.models import Event, Job, JobState, new_job_id
from webhookd.state import IntakeState
from webhookd.workers import SATURATED_RECHECK_S, WorkerPool


def forward_source(name: str, url: str, **options: str) -> str:
    """A source with one forward action; ``options`` are TOML values for the action's keys."""
    lines = "".join(f"{key} = {value}\n" for key, value in options.items())
    return f"""
[sources.{name}]
[[sources.{name}.actions]]
type = "forward"
url = "{url}/{name}"
{lines}"""


def new_item(cfg: Config, source: str, now: float, body: bytes = b"{}") -> NewEvent:
    """An event for ``source`` with one job per configured action, as the receiver makes it."""
    return NewEvent(new_event(source, now, body), jobs_for(cfg.sources[source]))


@dataclass
class Rig:
    """A worker pool wired to a real journal and real actions, on a manual clock."""

    cfg: Config
    journal: Journal
    pool: WorkerPool
    clock: ManualClock
    actions: dict[tuple[str, str], Action]

    async def ingest(self, source: str, body: bytes = b"{}") -> str:
        item = new_item(self.cfg, source, self.clock.time(), body)
        await self.journal.ingest(item)
        return item.event.id

    async def job(self, event_id: str) -> Job:
        [job] = (await self.journal.get_event(event_id)).jobs
        return job


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(extra: str, *, workers: str = "", rng: float = 1.0) -> Rig:
            cfg = make_config(tmp_path, extra, workers=workers)
            clock = ManualClock()
            journal = await stack.enter_async_context(Journal(cfg.journal.path, clock=clock))
            actions = action_registry.build(Resources(config=cfg, http=http))
            pool = WorkerPool(
                config=cfg,
                journal=journal,
                actions=actions,
                boot_id="boot_test",
                clock=clock,
                rng=lambda: rng,
            )
            return Rig(cfg, journal, pool, clock, actions)

        yield start


def test_backoff_is_exponential_jittered_and_capped() -> None:
    """`min(cap, base·factor^(n-1)) · U(0.5, 1)`: the bounds grow ×factor and stop at the cap."""
    policy = RetryPolicy(max_attempts=10, base_s=10.0, factor=3.0, cap_s=100.0)
    ceilings = [10.0, 30.0, 90.0, 100.0, 100.0]
    assert [backoff_s(policy, n, lambda: 1.0) for n in range(1, 6)] == ceilings
    assert [backoff_s(policy, n, lambda: 0.0) for n in range(1, 6)] == [c / 2 for c in ceilings]
    rng = random.Random(2).random
    for n, ceiling in enumerate(ceilings, 1):
        samples = [backoff_s(policy, n, rng) for _ in range(500)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling / 4  # jittered, not constant


def test_backoff_past_any_float_is_the_cap() -> None:
    """Thousands of attempts ("every minute for days"): base·factor^n overflows a float, and
    the wait is the cap, not an OverflowError that would leave the job running for ever."""
    policy = RetryPolicy(max_attempts=5000, base_s=10.0, factor=3.0, cap_s=60.0)
    assert backoff_s(policy, 4000, lambda: 1.0) == 60.0


def test_retry_and_reject_take_their_reason_as_text_and_after_s_as_a_number() -> None:
    """A handler's mistake shows in its own traceback, as a retry saying so."""
    assert webhookd.Retry(503).reason == "503"  # type: ignore[arg-type]
    assert webhookd.Reject(ValueError("bad")).reason == "bad"  # type: ignore[arg-type]
    for wrong in ("30", True, [30]):
        with pytest.raises(TypeError, match="takes seconds as a number"):
            webhookd.Retry("later", after_s=wrong)  # type: ignore[arg-type]


class RaisesUnstorable:
    """A handler's error with a byte kept by surrogateescape (no journal stores it as is) or a
    NUL (PostgreSQL's text holds none)."""

    def __init__(self, action: Action, text: str) -> None:
        self.config = action.config
        self.text = text

    async def run(self, event: Event, job: Job) -> Outcome:
        raise ValueError(self.text)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    ("text", "recorded"),
    [
        (b"bad \xff byte".decode("utf-8", "surrogateescape"), "bad \\udcff byte"),
        ("bad \x00 byte", "bad \\x00 byte"),
    ],
)
async def test_an_error_text_no_journal_can_store_is_recorded_escaped(
    make_rig: MakeRig, text: str, recorded: str
) -> None:
    """Its outcome used to be retried as a journal outage for ever, the job left running."""
    rig = await make_rig('[sources.h]\n[[sources.h.actions]]\ntype = "log"\n')
    rig.actions[("h", "log")] = RaisesUnstorable(rig.actions[("h", "log")], text)
    event_id = await rig.ingest("h")
    async with asyncio.timeout(10):
        await rig.pool.run_until_idle()
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.last_error == f"ValueError: {recorded}"


@pytest.mark.parametrize(("jobs", "done_at"), [("all", logging.INFO), ("failures", logging.DEBUG)])
async def test_log_jobs_failures_writes_done_jobs_at_debug_and_failures_as_before(
    make_rig: MakeRig, target: Target, caplog: pytest.LogCaptureFixture, jobs: str, done_at: int
) -> None:
    """``log.jobs = "failures"``: a done job's line goes to debug (a busy box's log is its
    failures), a retry's and a dead letter's stay warnings."""
    caplog.set_level(logging.DEBUG, logger="webhookd.workers")
    rig = await make_rig(
        '[sources.h]\n[[sources.h.actions]]\ntype = "log"\n'
        + forward_source("f", target.url, retry="{ max_attempts = 1 }")
        + f'[log]\njobs = "{jobs}"\n'
    )
    target.statuses = [500]
    await rig.ingest("h")
    await rig.ingest("f")
    async with asyncio.timeout(10):
        await rig.pool.run_until_idle()
    levels = {
        r.getMessage().split(" outcome=")[1].split()[0]: r.levelno
        for r in caplog.records
        if " outcome=" in r.getMessage()
    }
    assert levels == {"done": done_at, "dead": logging.WARNING}


async def test_a_down_targets_retry_lines_are_ten_a_minute_and_its_dead_lines_all_go_out(
    make_rig: MakeRig, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A target that is down fails every attempt of every webhook: each action's retry lines
    go out ten a minute, the rest counted in one line (at the period's end, or the drain's);
    dead letters' lines are never held back, and another action's retries have their own
    ten. The names a catch-all took share its action's ten: a sender chooses them."""
    caplog.set_level(logging.DEBUG, logger="webhookd.workers")
    rig = await make_rig(
        forward_source("f", target.url)
        + forward_source("g", target.url)
        + forward_source("d", target.url, retry="{ max_attempts = 1 }")
        + '[sources."*"]\n[[sources."*".actions]]\ntype = "forward"\n'
        + f'url = "{target.url}/any"\n'
    )
    target.default_status = 503
    for _ in range(15):
        await rig.ingest("f")
    for source in ("g", "d", "d", "d"):
        await rig.ingest(source)
    for n in range(12):
        item = new_item(rig.cfg, "*", rig.clock.time())
        event = dataclasses.replace(item.event, source=f"name{n}")
        await rig.journal.ingest(dataclasses.replace(item, event=event))
    async with asyncio.timeout(10):
        await rig.pool.run_until_idle()
    lines = [r.getMessage() for r in caplog.records if " outcome=" in r.getMessage()]
    retried = [line for line in lines if "outcome=retry" in line]
    assert sum("source=f " in line for line in retried) == 10
    assert sum("source=g " in line for line in retried) == 1
    assert sum("source=name" in line for line in retried) == 10
    assert sum("outcome=dead" in line for line in lines) == 3
    await rig.pool.drain(0.0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("suppressed=")]
    assert sorted(said) == [
        "suppressed=2 more job lines of */forward in the last 60 s, not logged one by one",
        "suppressed=5 more job lines of f/forward in the last 60 s, not logged one by one",
    ]


class Held:
    """An action whose attempts wait until ``release`` is set."""

    def __init__(self, action: Action, release: asyncio.Event, started: asyncio.Event) -> None:
        self.config = action.config
        self.release = release
        self.started = started

    async def run(self, event: Event, job: Job) -> Outcome:
        self.started.set()
        await self.release.wait()
        return Outcome.done({})

    async def aclose(self) -> None:
        return None


async def test_a_reload_that_gives_a_running_jobs_source_its_own_config_frees_its_cap(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    """A catch-all job counted under '*' (concurrency 1) is uncounted under '*' when it ends,
    even if a reload meanwhile gave its source name a config of its own: else the catch-all's
    cap stayed taken and none of its jobs ran again until a restart."""
    catch_all = (
        '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\nname = "a"\nconcurrency = 1\n'
    )
    rig = await make_rig(catch_all)
    release, started = asyncio.Event(), asyncio.Event()
    rig.actions[("*", "a")] = Held(rig.actions[("*", "a")], release, started)
    item = NewEvent(new_event("foo", rig.clock.time(), b"{}"), jobs_for(rig.cfg.sources["*"]))
    await rig.journal.ingest(item)
    running = asyncio.create_task(rig.pool.run_until_idle())
    await started.wait()
    own = make_config(
        tmp_path, catch_all + '[sources.foo]\n[[sources.foo.actions]]\ntype = "log"\n'
    )
    rig.pool.reconfigure(own, {**rig.actions, ("foo", "log"): rig.actions[("*", "a")]})
    release.set()
    await running
    later = NewEvent(new_event("bar", rig.clock.time(), b"{}"), jobs_for(rig.cfg.sources["*"]))
    await rig.journal.ingest(later)
    await rig.pool.run_until_idle()
    assert [j.state for j in (await rig.journal.get_event(later.event.id)).jobs] == [JobState.DONE]


async def test_a_job_the_window_still_holds_while_it_runs_leaves_no_count_behind(
    make_rig: MakeRig,
) -> None:
    """A refill read a catch-all job as soon as its webhook's commit was on disk, before the
    loop got to that commit's announcement, which put the job (picked and claimed meanwhile)
    back in the window: picked again while it ran, it was counted twice and uncounted once
    under '*', and once slow mode made its action's limit 1 no catch-all job started again."""
    rig = await make_rig('[sources."*"]\n[[sources."*".actions]]\ntype = "log"\nname = "a"\n')
    release, started = asyncio.Event(), asyncio.Event()
    rig.actions[("*", "a")] = Held(rig.actions[("*", "a")], release, started)
    journal, pool = rig.journal, rig.pool
    journal.on_commit = pool.notify  # commits reach the window, as in the daemon
    item = NewEvent(new_event("foo", rig.clock.time(), b"{}"), jobs_for(rig.cfg.sources["*"]))
    [job] = item.jobs
    written, announce = asyncio.Event(), asyncio.Event()
    in_thread, claim = journal._in_thread, journal.claim
    claims: list[list[str]] = []

    async def late(fn: Callable[..., Any], *args: Any) -> Any:
        result = await in_thread(fn, *args)
        if fn == journal._write_batch and any(
            isinstance(op, IngestOp) and op.item is item for op in args[0].ops
        ):
            written.set()  # on disk, and the loop busy elsewhere before it announces it
            await announce.wait()
        return result

    async def counted(job_ids: Any, boot_id: str) -> Any:
        claims.append(list(job_ids))
        return await claim(job_ids, boot_id)

    journal._in_thread = late  # type: ignore[method-assign]
    journal.claim = counted  # type: ignore[method-assign]
    dispatcher = asyncio.create_task(pool.run())
    await until(lambda: not pool._refill_now)  # its first sweep is read
    ingesting = asyncio.create_task(journal.ingest(item))
    await asyncio.wait_for(written.wait(), 10.0)
    pool.poke()  # a refill reads the journal now: the job is queued there
    await until(lambda: claims == [[job.id]])
    announce.set()
    await ingesting
    await asyncio.wait_for(started.wait(), 10.0)
    # The window holds no copy of it (else the dispatcher picks that one now, while it runs).
    await until(lambda: job.id not in pool.scheduler and pool.statistics().claiming == 0)
    release.set()
    await until(lambda: not pool._running)
    assert leftover_counts(pool) == {}
    pool.slow.add(("*", "a"))  # its attempts timed out: one job at a time
    later = NewEvent(new_event("bar", rig.clock.time(), b"{}"), jobs_for(rig.cfg.sources["*"]))
    await journal.ingest(later)
    await until(lambda: pool.statistics().outcomes.get("done") == 2)
    assert await pool.drain(10.0) == 0
    await dispatcher
    assert [j.state for j in (await journal.get_event(later.event.id)).jobs] == [JobState.DONE]


async def test_lanes_of_jobs_not_due_yet_do_not_keep_a_due_job_behind_them_from_the_window(
    make_rig: MakeRig,
) -> None:
    """More lanes hold queued jobs than the window has room: those first in the journal's
    order, whose jobs wait out a backoff, took the room at every refill, and a due job in a
    lane after them was never read (a catch-all's names each make lanes of their own)."""
    rig = await make_rig(
        '[sources.s]\n[[sources.s.actions]]\ntype = "log"\n', workers="concurrency = 2\nwindow = 4"
    )
    later = rig.clock.time() + 3600
    for tenant in "abcd":  # each a lane whose job is due in an hour
        event = new_event("s", later, b"{}", tenant=tenant)
        await rig.journal.ingest(NewEvent(event, jobs_for(rig.cfg.sources["s"])))
    due = NewEvent(
        new_event("s", rig.clock.time(), b"{}", tenant="z"), jobs_for(rig.cfg.sources["s"])
    )
    await rig.journal.ingest(due)
    dispatcher = asyncio.create_task(rig.pool.run())
    await until(lambda: rig.pool.statistics().outcomes.get("done") == 1, timeout_s=5)
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    assert [j.state for j in (await rig.journal.get_event(due.event.id)).jobs] == [JobState.DONE]
    assert leftover_counts(rig.pool) == {}


async def test_failing_target_is_retried_on_the_backoff_schedule_then_dead(
    target: Target, make_rig: MakeRig
) -> None:
    """A 500 is retried at exactly the backoff delays (never early) and gives up at max_attempts."""
    target.default_status = 500
    rig = await make_rig(
        forward_source(
            "flaky", target.url, retry="{ max_attempts = 4, base_s = 10, factor = 3, cap_s = 60 }"
        )
    )
    event_id = await rig.ingest("flaky")
    for n, delay in enumerate([10.0, 30.0, 60.0], 1):
        due = await rig.pool.run_until_idle()
        assert len(target.seen) == n
        assert due == pytest.approx(rig.clock.time() + delay)
        rig.clock.advance(delay - 0.01)
        assert await rig.pool.run_until_idle() == pytest.approx(due)
        assert len(target.seen) == n  # not a moment early
        rig.clock.advance(0.01)
    assert await rig.pool.run_until_idle() is None
    assert len(target.seen) == 4
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.DEAD, 4)
    assert (job.last_error or "").startswith("gave up after 4 attempt(s)")
    assert "answered 500" in (job.last_error or "")
    assert [a.outcome for a in job.history] == ["retry", "retry", "retry", "dead"]
    assert [a.detail["status"] for a in job.history if a.detail] == [500] * 4


async def test_a_late_announcement_of_a_job_queued_for_a_retry_does_not_start_it_early(
    target: Target, make_rig: MakeRig
) -> None:
    """A commit's announcement that comes once its job has run and been queued again for a
    retry (a stale copy in the window) starts no attempt before the backoff ends, and the
    pick the claim refuses leaves no count behind."""
    target.default_status = 500
    rig = await make_rig(forward_source("flaky", target.url, retry="{ base_s = 10 }"))
    announced: list[Ready] = []
    rig.journal.on_commit = announced.extend  # held back, to be heard late
    event_id = await rig.ingest("flaky")
    due = await rig.pool.run_until_idle()
    assert len(target.seen) == 1 and due == pytest.approx(rig.clock.time() + 10.0)
    rig.pool.notify(announced)  # the ingest's announcement, after the job's first attempt
    assert await rig.pool.run_until_idle() == pytest.approx(due)
    assert len(target.seen) == 1  # the backoff holds
    assert leftover_counts(rig.pool) == {}
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    rig.clock.advance(10.0)
    await rig.pool.run_until_idle()
    assert len(target.seen) == 2


@pytest.mark.parametrize(("retry_after", "expected_s"), [("120", 120.0), ("1", 10.0)])
async def test_retry_after_is_a_lower_bound_on_the_delay(
    target: Target, make_rig: MakeRig, retry_after: str, expected_s: float
) -> None:
    """Downstream's Retry-After postpones a retry beyond the backoff, never brings it forward."""
    target.default_status = 503
    target.headers = {"Retry-After": retry_after}
    rig = await make_rig(forward_source("busy", target.url, retry="{ base_s = 10 }"))
    await rig.ingest("busy")
    due = await rig.pool.run_until_idle()
    assert due == pytest.approx(rig.clock.time() + expected_s)


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [
        ("99999999", 300.0),  # three years: capped at retry.cap_s
        ("9" * 40, 300.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 300.0),  # an HTTP date far ahead: capped too
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),  # a date in the past: the backoff
        ("-5", 10.0),
        ("nan", 10.0),
        ("1e400", 10.0),
        ("soon", 10.0),
    ],
)
async def test_retry_after_is_capped_at_cap_s_and_bad_values_are_ignored(
    target: Target, make_rig: MakeRig, retry_after: str, expected_s: float
) -> None:
    """A 503 with `Retry-After: 99999999` parks the job for at most cap_s; garbage is ignored."""
    target.default_status = 503
    target.headers = {"Retry-After": retry_after}
    rig = await make_rig(forward_source("busy", target.url, retry="{ base_s = 10, cap_s = 300 }"))
    event_id = await rig.ingest("busy")
    due = await rig.pool.run_until_idle()
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.run_at == pytest.approx(rig.clock.time() + expected_s)
    assert due == job.run_at


class AsksForAYear:
    """An action that fails asking to be retried much later, the way a handler's Retry may."""

    def __init__(self, action: Action, after_s: float) -> None:
        self.config = action.config
        self.after_s = after_s

    async def run(self, event: Event, job: Job) -> Outcome:
        raise webhookd.Retry("closed for the year", after_s=self.after_s)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("after_s", [365 * 86400.0, float("inf"), float("nan"), -1.0])
async def test_a_handlers_retry_after_is_capped_at_cap_s_too(
    make_rig: MakeRig, after_s: float
) -> None:
    """`Retry(after_s=…)` from any action waits at most cap_s; nan or negative means the backoff."""
    rig = await make_rig(
        '[sources.h]\n[[sources.h.actions]]\ntype = "log"\nretry = { base_s = 10, cap_s = 60 }\n'
    )
    rig.actions[("h", "log")] = AsksForAYear(rig.actions[("h", "log")], after_s)
    event_id = await rig.ingest("h")
    await rig.pool.run_until_idle()
    job = await rig.job(event_id)
    expected_s = 60.0 if after_s > 0 else 10.0
    assert (job.state, job.attempts, job.last_error) == (
        JobState.QUEUED,
        1,
        "closed for the year",
    )
    assert job.run_at == pytest.approx(rig.clock.time() + expected_s)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_dead_and_not_followed(
    target: Target, make_rig: MakeRig, status: int
) -> None:
    """A 3xx from the forward target is a dead job saying where it pointed; nothing follows it."""
    target.statuses = [status]  # the redirect's destination would answer 200
    target.headers = {"Location": f"{target.url}/elsewhere"}
    rig = await make_rig(forward_source("moved", target.url))
    event_id = await rig.ingest("moved")
    assert await rig.pool.run_until_idle() is None
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.DEAD, 1)
    assert job.last_error == (
        f"{target.url}/moved answered {status}: redirect to {target.url}/elsewhere not followed"
    )
    assert [s.path for s in target.seen] == ["/moved"]


async def test_a_304_is_dead_and_not_called_a_redirect(target: Target, make_rig: MakeRig) -> None:
    """A 3xx that points nowhere (304 Not Modified to a POST) is not a success, and no
    redirect either: the error says so rather than 'redirect to (nowhere) not followed'."""
    target.statuses = [304]
    rig = await make_rig(forward_source("cached", target.url))
    event_id = await rig.ingest("cached")
    assert await rig.pool.run_until_idle() is None
    job = await rig.job(event_id)
    assert (job.state, job.last_error) == (
        JobState.DEAD,
        f"{target.url}/cached answered 304, which is not a success",
    )


async def test_attempt_longer_than_timeout_is_cut_off_and_retried(
    target: Target, make_rig: MakeRig
) -> None:
    """A target that holds the request past `timeout_s` costs one attempt and is retried, its
    error naming the URL, as an answer's does."""
    target.hold = asyncio.Event()  # set at the target's teardown
    rig = await make_rig(forward_source("slow", target.url, timeout_s="0.2"))
    event_id = await rig.ingest("slow")
    due = await rig.pool.run_until_idle()
    assert due is not None and due > rig.clock.time()
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.last_error == f"timed out after 0.2s ({target.url}/slow)"  # where it went
    assert len(target.seen) == 1


@pytest.mark.parametrize(
    ("status", "state", "error"),
    [
        (410, JobState.DEAD, "answered 410 Gone: the endpoint is retired"),
        (400, JobState.DEAD, "answered 400"),
        (404, JobState.DEAD, "answered 404"),
        (408, JobState.QUEUED, "answered 408"),
        (425, JobState.QUEUED, "answered 425"),
        (429, JobState.QUEUED, "answered 429"),
        (500, JobState.QUEUED, "answered 500"),
        (503, JobState.QUEUED, "answered 503"),
    ],
)
async def test_status_codes_map_to_retry_or_dead(
    target: Target, make_rig: MakeRig, status: int, state: JobState, error: str
) -> None:
    """410 and other 4xx go straight to dead with the reason; 408/425/429/5xx are retried."""
    target.default_status = status
    rig = await make_rig(forward_source("hook", target.url))
    event_id = await rig.ingest("hook")
    await rig.pool.run_until_idle()
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (state, 1)
    assert (job.last_error or "").endswith(error)


async def capped_peak(rig: Rig, target: Target, sources: list[str], cap: int) -> None:
    """Run every job with the target holding; the pool starts ``cap`` and keeps the rest."""
    for source in sources:
        await rig.ingest(source)
    jobs = len(sources) * len(rig.cfg.sources[sources[0]].actions)
    target.hold = asyncio.Event()
    burst = asyncio.create_task(rig.pool.run_until_idle())
    await target.wait_for(lambda t: t.running == cap)
    stats = rig.pool.statistics()
    assert (stats.busy, stats.window) == (cap, jobs - cap)  # capped, not short of workers
    target.hold.set()
    assert await burst is None
    assert len(target.seen) == jobs
    assert target.peak_running == cap


async def test_action_concurrency_cap_is_never_exceeded(target: Target, make_rig: MakeRig) -> None:
    """An action's `concurrency = 2` keeps at most two of its jobs running, with workers free."""
    rig = await make_rig(forward_source("capped", target.url, concurrency="2"))
    await capped_peak(rig, target, ["capped"] * 6, cap=2)


async def test_source_concurrency_cap_spans_its_actions(target: Target, make_rig: MakeRig) -> None:
    """A source's `concurrency = 2` caps the running jobs of all its actions together."""
    rig = await make_rig(
        f"""
[sources.shop]
concurrency = 2
[[sources.shop.actions]]
type = "forward"
name = "a"
url = "{target.url}/a"
[[sources.shop.actions]]
type = "forward"
name = "b"
url = "{target.url}/b"
"""
    )
    await capped_peak(rig, target, ["shop"] * 3, cap=2)
    assert {s.path for s in target.seen} == {"/a", "/b"}


@contextlib.asynccontextmanager
async def hung_target(answer: asyncio.Event) -> AsyncIterator[str]:
    """The URL of a real loopback server that takes each request and answers only once
    ``answer`` is set: a downstream that hangs."""

    async def hang(request: web.BaseRequest) -> web.Response:
        await answer.wait()
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(hang))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        answer.set()
        await runner.cleanup()


class Peak:
    """The most attempts of ``action`` that ran at once (its ``run`` wrapped to count them)."""

    def __init__(self, action: Action) -> None:
        self.running = self.most = 0
        run = action.run

        async def counted(event: Event, job: Job) -> Outcome:
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                return await run(event, job)
            finally:
                self.running -= 1

        action.run = counted  # type: ignore[method-assign]


async def slow_gauge(rig: Rig) -> dict[tuple[str, str], float]:
    """``webhookd_action_slow`` as /metrics would show it: (source, action) → value."""
    body, _ = await Metrics(rig.journal, rig.pool, lanes=dict).render()
    return {
        (s.labels["source"], s.labels["action"]): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "webhookd_action_slow"
    }


async def test_an_action_whose_attempts_keep_timing_out_runs_one_job_at_a_time(
    target: Target, make_rig: MakeRig
) -> None:
    """A downstream that takes connections and never answers: once
    ``workers.slow_after_timeouts`` (3) attempts in a row end by ``timeout_s``, its action runs
    one job at a time, leaving the other workers to other sources, and shows in
    ``webhookd_action_slow``; its first answer lifts that."""
    answer = asyncio.Event()
    async with hung_target(answer) as url:
        rig = await make_rig(
            forward_source("slow", url, timeout_s="0.2") + forward_source("fine", target.url),
            workers="concurrency = 4",
        )
        peak = Peak(rig.actions[("slow", "forward")])
        for _ in range(3):
            await rig.ingest("slow")
        await rig.pool.run_until_idle()
        assert (peak.most, rig.pool.slow) == (3, {("slow", "forward")})
        assert await slow_gauge(rig) == {("slow", "forward"): 1}

        peak.most = 0
        held = [await rig.ingest("slow") for _ in range(4)]
        fine = await rig.ingest("fine")
        await rig.pool.run_until_idle()
        assert peak.most == 1  # the four one after another, with three workers free
        assert (await rig.job(fine)).state == JobState.DONE
        assert [(await rig.job(e)).attempts for e in held] == [1, 1, 1, 1]

        answer.set()
        answered = await rig.ingest("slow")
        await rig.pool.run_until_idle()
        assert (await rig.job(answered)).state == JobState.DONE
        assert (rig.pool.slow, await slow_gauge(rig)) == (set(), {})


async def test_a_reload_keeps_the_slow_mode_of_an_action_that_still_reaches_its_target(
    tmp_path: Path, make_rig: MakeRig
) -> None:
    """An action with a ``file:`` secret is built anew by a reload that reads a new one, and
    still reaches the same hung target: it keeps its count of timeouts and runs on one job at
    a time (a reload with nothing changed sent every worker there again, each held for
    timeout_s). A new URL starts afresh."""
    key = tmp_path / "signing"
    async with hung_target(asyncio.Event()) as url, aiohttp.ClientSession() as http:

        def source(where: str) -> str:
            return forward_source("slow", where, timeout_s="0.2", secret=f'"file:{key}"')

        async def reload(where: str, secret: str) -> Peak:
            key.write_text(secret, encoding="utf-8")
            cfg = make_config(tmp_path, source(where), workers="concurrency = 4")
            actions = await action_registry.rebuild(
                Resources(config=cfg, http=http), rig.pool.actions
            )
            assert actions[("slow", "forward")] is not rig.pool.actions[("slow", "forward")]
            rig.pool.reconfigure(cfg, actions)
            return Peak(actions[("slow", "forward")])

        key.write_text("whsec_" + "A" * 32, encoding="utf-8")
        rig = await make_rig(source(url), workers="concurrency = 4")
        for _ in range(2):
            await rig.ingest("slow")
        await rig.pool.run_until_idle()
        assert rig.pool.slow == set()

        await reload(url, "whsec_" + "B" * 32)
        await rig.ingest("slow")  # the third timeout in a row, across the reload
        await rig.pool.run_until_idle()
        assert rig.pool.slow == {("slow", "forward")}

        peak = await reload(url, "whsec_" + "C" * 32)
        held = [await rig.ingest("slow") for _ in range(4)]
        await rig.pool.run_until_idle()
        assert (peak.most, rig.pool.slow) == (1, {("slow", "forward")})
        assert [(await rig.job(e)).attempts for e in held] == [1, 1, 1, 1]
        assert await slow_gauge(rig) == {("slow", "forward"): 1}

        await reload(url.replace("127.0.0.1", "localhost"), "whsec_" + "C" * 32)
        assert (rig.pool.slow, await slow_gauge(rig)) == (set(), {})


async def test_an_action_a_reload_takes_away_is_no_longer_marked_slow(make_rig: MakeRig) -> None:
    """webhookd_action_slow kept showing 1 for an action a reload removed."""
    rig = await make_rig('[sources.a]\n[[sources.a.actions]]\ntype = "log"\n')
    rig.pool.slow.add(("a", "log"))
    rig.pool.reconfigure(rig.cfg, {})
    assert rig.pool.slow == set()
    assert await slow_gauge(rig) == {}


async def test_a_cap_held_by_another_process_is_waited_for_without_spinning_or_attempts(
    target: Target, make_rig: MakeRig
) -> None:
    """With `concurrency = 1` and the slot held by another process (another node), the job
    stays queued with no attempt used, the pool does not ask the journal again before the
    recheck time, and it runs once the slot is free."""
    rig = await make_rig(forward_source("capped", target.url, concurrency="1"))
    first, second = await rig.ingest("capped"), await rig.ingest("capped")
    action = rig.cfg.sources["capped"].actions[0].name
    cap = Cap(f"action\x1fcapped\x1f{action}", 1)
    held = (await rig.journal.get_event(first)).jobs[0].id
    async with Journal(rig.cfg.journal.path, clock=rig.clock) as other:
        assert len((await other.claim_capped([held], "boot_other", {held: (cap,)})).claimed) == 1
        asks: list[frozenset[str]] = []
        claim_capped = rig.journal.claim_capped

        async def counted(*args: Any) -> CapClaim:
            result = await claim_capped(*args)
            asks.append(result.full)
            return result

        rig.journal.claim_capped = counted  # type: ignore[method-assign]
        await rig.pool.run_until_idle()
        await rig.pool.run_until_idle()  # the cap is known full: the journal is not asked
        assert asks == [{cap.key}]
        assert ((await rig.job(second)).state, (await rig.job(second)).attempts) == ("queued", 0)
        await other.finish(
            [Finished(held, 1, JobState.DONE, rig.clock.time(), rig.clock.time(), "done")]
        )
        rig.clock.advance(SATURATED_RECHECK_S)
        assert await rig.pool.run_until_idle() is None
    assert asks == [{cap.key}, frozenset()]
    assert ((await rig.job(second)).state, (await rig.job(second)).attempts) == ("done", 1)
    assert len(target.seen) == 1


async def test_a_capped_actions_jobs_follow_each_other_without_refused_claims(
    target: Target, make_rig: MakeRig
) -> None:
    """With `concurrency = 1`, the cap's next job is claimed once the last one's outcome is on
    disk, not as soon as its action returned: no claim is refused (and the cap set aside for
    the recheck time) on the way, however slow the commit."""
    rig = await make_rig(forward_source("capped", target.url, concurrency="1"))
    ids = [await rig.ingest("capped") for _ in range(3)]
    refused: list[frozenset[str]] = []
    claim_capped, real_finish = rig.journal.claim_capped, rig.journal.finish

    async def counted(*args: Any) -> CapClaim:
        result = await claim_capped(*args)
        if result.full:
            refused.append(result.full)
        return result

    async def slow_finish(results: Any) -> Recorded:  # the dispatcher runs meanwhile
        for _ in range(5):
            await asyncio.sleep(0)
        return await real_finish(results)

    rig.journal.claim_capped = counted  # type: ignore[method-assign]
    rig.journal.finish = slow_finish  # type: ignore[method-assign]
    dispatcher = asyncio.create_task(rig.pool.run())
    rig.pool.poke()
    await target.wait_for(lambda t: len(t.seen) == 3)
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    assert refused == []
    assert [(await rig.job(i)).state for i in ids] == ["done"] * 3


async def test_a_job_another_process_claimed_first_does_not_cost_the_next_one_its_slot(
    target: Target, make_rig: MakeRig
) -> None:
    """The window still holds a job another process (another node) has since claimed: the
    claim comes back without it, and the slot it was picked for goes to the next job in the
    same dispatch, not at the next wake (on two nodes, a flooding tenant's jobs took those
    turns: 50-60 of them started before another tenant's new ones)."""
    rig = await make_rig(forward_source("shop", target.url), workers="concurrency = 1")
    rig.journal.on_commit = rig.pool.notify  # commits reach the window, as in the daemon
    taken, waiting = await rig.ingest("shop"), await rig.ingest("shop")
    async with Journal(rig.cfg.journal.path, clock=rig.clock) as other:
        job = (await rig.job(taken)).id
        assert [c.job.id for c in await other.claim([job], "boot_other")] == [job]
        assert await rig.pool.run_until_idle() is None  # nothing left queued
    assert (await rig.job(waiting)).state == "done"
    assert (await rig.job(taken)).state == "running"  # the other process's, untouched
    assert len(target.seen) == 1


class WaitsOnce:
    """An action that is not ready the first time (a lane cooling down), then succeeds."""

    def __init__(self, action: Action) -> None:
        self.config = action.config
        self.calls = 0

    async def run(self, event: Event, job: Job) -> Outcome:
        self.calls += 1
        if self.calls == 1:
            return Outcome.wait("lane cooling down", after_s=30.0)
        return Outcome.done({"ok": True})

    async def aclose(self) -> None:
        return None


async def test_wait_outcome_reschedules_without_using_an_attempt(make_rig: MakeRig) -> None:
    """`Outcome.wait` puts the job back for `after_s` with its attempt count unchanged."""
    rig = await make_rig('[sources.paced]\n[[sources.paced.actions]]\ntype = "log"\n')
    stub = WaitsOnce(rig.actions[("paced", "log")])
    rig.actions[("paced", "log")] = stub
    event_id = await rig.ingest("paced")
    due = await rig.pool.run_until_idle()
    assert due == pytest.approx(rig.clock.time() + 30.0)
    job = await rig.job(event_id)
    assert (job.state, job.attempts, job.history) == (JobState.QUEUED, 0, ())
    rig.clock.advance(30.0)
    assert await rig.pool.run_until_idle() is None
    job = await rig.job(event_id)
    assert (job.state, job.attempts, stub.calls) == (JobState.DONE, 1, 2)
    assert [a.outcome for a in job.history] == ["done"]


class KeepsWorkThenFails:
    """Leaves a result with its first failure (work done before it failed, as an openai answer
    whose then-forward failed), then fails with none (as a timeout does); the third attempt
    returns the result it finds on the job."""

    def __init__(self, action: Action) -> None:
        self.config = action.config
        self.seen: list[Any] = []

    async def run(self, event: Event, job: Job) -> Outcome:
        self.seen.append(job.result)
        if len(self.seen) == 1:
            return Outcome.retry("downstream failed", result={"work": 1})
        if len(self.seen) == 2:
            raise ConnectionError("cut off")
        return Outcome.done(job.result)

    async def aclose(self) -> None:
        return None


async def test_an_attempt_that_ends_with_no_result_keeps_the_one_an_earlier_attempt_left(
    make_rig: MakeRig,
) -> None:
    """An attempt that ends without a result (a timeout, an exception) does not wipe what an
    earlier attempt kept: else the next one would pay for that work again."""
    rig = await make_rig(
        '[sources.s]\n[[sources.s.actions]]\ntype = "log"\nretry = { base_s = 1, cap_s = 1 }\n'
    )
    stub = KeepsWorkThenFails(rig.actions[("s", "log")])
    rig.actions[("s", "log")] = stub
    event_id = await rig.ingest("s")
    while (due := await rig.pool.run_until_idle()) is not None:
        rig.clock.advance(due - rig.clock.time())
    job = await rig.job(event_id)
    assert stub.seen == [None, {"work": 1}, {"work": 1}]
    assert (job.state, job.attempts, job.result) == (JobState.DONE, 3, {"work": 1})
    assert [a.outcome for a in job.history] == ["retry", "retry", "done"]


class WaitsItsTurn:
    """An action turned away ``turns`` times (``why``: ``paced``, its lane's own pace, a
    backlog ahead of it; ``held``, its lane out of quota; None, a 429 from the service), then
    given one 429 more when ``then_429``, then run."""

    def __init__(self, action: Action, turns: int, why: str | None, then_429: bool = False):
        self.config = action.config
        self.turns = turns + then_429
        self.why = why
        self.then_429 = then_429
        self.calls = 0

    async def run(self, event: Event, job: Job) -> Outcome:
        self.calls += 1
        if self.calls > self.turns:
            return Outcome.done({"ok": True})
        if self.why is None or (self.then_429 and self.calls == self.turns):
            return Outcome.wait("429 from the service", after_s=1.0)
        return Outcome.wait("lane busy", after_s=1.0, **{self.why: True})

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("paced", [True, False])
async def test_a_lanes_own_pace_never_makes_a_job_give_up_but_429s_do_count(
    make_rig: MakeRig, paced: bool
) -> None:
    """A job turned away by its lane's pace more than MAX_WAITS times (a long backlog on a
    tight lane) still runs when its turn comes; one turned away by 429s that often starts
    using its attempts."""
    rig = await make_rig('[sources.p]\n[[sources.p.actions]]\ntype = "log"\n')
    stub = WaitsItsTurn(rig.actions[("p", "log")], MAX_WAITS + 5, "paced" if paced else None)
    rig.actions[("p", "log")] = stub
    event_id = await rig.ingest("p")
    for _ in range(MAX_WAITS + 6):
        await rig.pool.run_until_idle()
        rig.clock.advance(1.0)
    job = await rig.job(event_id)
    outcomes = [a.outcome for a in job.history]  # a wait is no attempt: none in the history
    if paced:
        assert (job.state, outcomes) == (JobState.DONE, ["done"])
    else:  # past MAX_WAITS a 429 is a failed attempt, retried on the backoff
        assert outcomes[0] == "retry" and "429 from the service" in (job.history[0].error or "")


@pytest.mark.parametrize("why", ["paced", "held"])
async def test_waits_of_a_lanes_pace_or_quota_do_not_count_towards_the_429s(
    make_rig: MakeRig, why: str
) -> None:
    """More than MAX_WAITS turns waited for the lane (a long backlog, a quota outage), then
    a 429: the 429 is a wait like any first one, not a failed attempt."""
    rig = await make_rig('[sources.p]\n[[sources.p.actions]]\ntype = "log"\n')
    stub = WaitsItsTurn(rig.actions[("p", "log")], MAX_WAITS + 5, why, then_429=True)
    rig.actions[("p", "log")] = stub
    event_id = await rig.ingest("p")
    for _ in range(MAX_WAITS + 7):
        await rig.pool.run_until_idle()
        rig.clock.advance(1.0)
    job = await rig.job(event_id)
    assert stub.calls == MAX_WAITS + 7
    assert (job.state, [a.outcome for a in job.history]) == (JobState.DONE, ["done"])


async def test_commit_wakes_the_dispatcher_without_waiting_for_the_sweep(
    tmp_path: Path, target: Target, run_daemon: Callable[..., Any]
) -> None:
    """With a 30 s sweep, a posted webhook still reaches the target at once: commits wake it."""
    cfg = make_config(tmp_path, forward_source("fast", target.url), workers="sweep_interval_s = 30")
    running: Running = await run_daemon(cfg)
    started = time.monotonic()
    status, _ = await running.post("/hooks/fast", b'{"a": 1}')
    assert status == 202
    await target.wait_for(lambda t: len(t.seen) == 1, timeout_s=10)
    print(f"\nposted → delivered in {(time.monotonic() - started) * 1000:.1f} ms")


async def test_jobs_queued_before_the_start_run_at_once_not_after_a_sweep_interval(
    target: Target, make_rig: MakeRig
) -> None:
    """A restart with jobs waiting in the journal: the pool's first round runs as it starts,
    not one ``workers.sweep_interval_s`` later."""
    rig = await make_rig(forward_source("waiting", target.url), workers="sweep_interval_s = 30")
    await rig.ingest("waiting")  # nothing wired: as if journaled by the run before
    dispatcher = asyncio.create_task(rig.pool.run())
    try:
        await target.wait_for(lambda t: len(t.seen) == 1, timeout_s=10)
    finally:
        rig.pool.stop()
        await dispatcher


class HeldOpen:
    """An action that says when it starts (with the journal's commit count at that moment)
    and returns once let go."""

    def __init__(self, action: Action, journal: Journal) -> None:
        self.config = action.config
        self.journal = journal
        self.started: asyncio.Queue[tuple[Job, int]] = asyncio.Queue()
        self.go = asyncio.Event()

    async def run(self, event: Event, job: Job) -> Outcome:
        self.started.put_nowait((job, self.journal.commits))
        await self.go.wait()
        return Outcome.done({"ok": True})

    async def aclose(self) -> None:
        return None


async def idle_rig(make_rig: MakeRig, extra: str = "", workers: str = "") -> tuple[Rig, HeldOpen]:
    """A pool wired to its journal as the daemon wires them, idle: it has read the (empty)
    journal once. Source ``s``'s ``log`` action is held open."""
    rig = await make_rig(
        '[sources.s]\n[[sources.s.actions]]\ntype = "log"\n' + extra, workers=workers
    )
    rig.journal.on_commit = rig.pool.notify
    rig.journal.starter = rig.pool
    assert await rig.pool.run_until_idle() is None
    held = HeldOpen(rig.actions[("s", "log")], rig.journal)
    rig.actions[("s", "log")] = held
    return rig, held


async def test_an_idle_pools_new_job_starts_at_its_commit_without_a_claim_of_its_own(
    make_rig: MakeRig,
) -> None:
    """Commit → job start on an idle pool (DESIGN §6, p50 ≤ 1 ms): the job is written claimed
    by this boot in the commit that journals its webhook, and starts once that commit is done,
    with no claim's transaction in between."""
    rig, held = await idle_rig(make_rig)
    before = rig.journal.commits
    event_id = await rig.ingest("s")
    job, commits = await held.started.get()
    assert commits == before + 1
    assert (job.state, job.attempts) == (JobState.RUNNING, 1)
    with contextlib.closing(sqlite3.connect(rig.cfg.journal.path)) as db:
        rows = db.execute("SELECT state, attempts, boot_id, claimed_at FROM jobs").fetchall()
    assert rows == [("running", 1, "boot_test", rig.clock.time())]
    assert rig.pool.statistics().busy == 1
    held.go.set()
    assert await rig.pool.drain(10.0) == 0
    job = await rig.job(event_id)
    assert (job.state, job.attempts, [a.outcome for a in job.history]) == (
        JobState.DONE,
        1,
        ["done"],
    )


async def test_a_new_job_waits_for_a_claim_unless_it_would_be_the_next_pick_anyway(
    make_rig: MakeRig,
) -> None:
    """Only jobs that would start at once anyway start at their commit: none while the
    workers are busy, a job waits in the window or a retry is due, the receiver answers a
    burst, or the pool drains; nor a job with a cap (counted by its claim across nodes), an
    ordered one (only the journal knows if an older job of its key is unfinished) or one of a
    paused source. Those are written queued and go through the scheduler."""
    rig, held = await idle_rig(
        make_rig,
        '[sources.capped]\nconcurrency = 1\n[[sources.capped.actions]]\ntype = "log"\n'
        '[sources.ordered]\n[[sources.ordered.actions]]\ntype = "log"\nordered_by = "json:k"\n'
        '[sources.paused]\n[[sources.paused.actions]]\ntype = "log"\n',
        workers="concurrency = 2",
    )
    pool, clock = rig.pool, rig.clock
    await rig.journal.pause("paused")
    assert await pool.run_until_idle() is None  # the pool has read the pause
    assert pool.room_at_commit() == 2
    await rig.ingest("s")
    await held.started.get()
    assert pool.room_at_commit() == 1  # one of two workers is busy
    pool._claiming_jobs = 1
    assert pool.room_at_commit() == 0  # and the other's job is being claimed
    pool._claiming_jobs = 0

    def item(source: str, order_key: str | None = None) -> NewEvent:
        event = new_event(source, clock.time())
        return NewEvent(event, jobs_for(rig.cfg.sources[source], order_key))

    for one in [item("capped"), item("ordered", "k1"), item("paused")]:
        assert pool.reserve([one]) == frozenset()
    assert pool.room_at_commit() == 1

    pool.scheduler.add(Ready(new_job_id(), "s", "log", 1, "", None, 0))
    assert pool.room_at_commit() == 0  # a job waits in the window
    pool.scheduler = pool._new_scheduler()
    pool._next_due = clock.time()
    assert pool.room_at_commit() == 0  # a retry is due
    pool._next_due = None
    pool.intake = IntakeState()
    pool.intake.busy_at = clock.monotonic()
    assert pool.room_at_commit() == 0  # a burst is being answered
    clock.advance(HOLD_WINDOW_S)
    assert pool.room_at_commit() == 1

    one = item("s")
    [job] = one.jobs
    assert pool.reserve([one]) == {job.id}
    assert pool.room_at_commit() == 0  # its slot is kept for it until the commit settles
    pool.settle([], frozenset({job.id}))  # the commit failed (or it was a duplicate)
    assert pool.room_at_commit() == 1

    draining = asyncio.create_task(pool.drain(10.0))
    assert pool.reserve([item("s")])  # taken just before the drain began
    await asyncio.sleep(0)
    assert pool.room_at_commit() == 0  # draining
    await asyncio.sleep(0)
    assert not draining.done()  # a drain waits for jobs being written claimed
    pool.settle([], frozenset(pool._reserved))
    held.go.set()
    assert await draining == 0


async def test_new_jobs_wait_while_the_receiver_is_busy_and_start_once_it_has_caught_up(
    make_rig: MakeRig,
) -> None:
    """Intake first: while the receiver has had a burst waiting within HOLD_WINDOW_S, no job
    starts (a 40,000-webhook burst is acked in about half the time); once it has caught up,
    they start. A hold ends after HOLD_MAX_S even if the receiver stays busy, and jobs then run
    for as long again whatever it has waiting, so an endless flood cannot starve them."""
    rig = await make_rig('[sources.s]\n[[sources.s.actions]]\ntype = "log"\n')
    intake = IntakeState()
    pool = rig.pool
    pool.intake = intake
    rig.journal.on_commit = pool.notify  # as the daemon wires them: commits fill the window
    clock = rig.clock

    intake.waiting = 1  # the receiver always has a webhook waiting for its commit here
    intake.busy_at = clock.monotonic()
    first = await rig.ingest("s")
    assert await pool._dispatch_once() == 0
    assert pool.statistics().holding and (await rig.job(first)).state == JobState.QUEUED
    clock.advance(HOLD_WINDOW_S / 2)
    assert await pool._dispatch_once() == 0  # still within the window
    clock.advance(HOLD_WINDOW_S)
    assert await pool._dispatch_once() == 1  # caught up: the job starts
    assert not pool.holding

    # Busy without a break: held for HOLD_MAX_S, then run for as long again.
    intake.busy_at = clock.monotonic()
    second = await rig.ingest("s")
    assert await pool._dispatch_once() == 0
    clock.advance(HOLD_MAX_S)
    intake.busy_at = clock.monotonic()
    assert await pool._dispatch_once() == 1
    assert not pool.holding
    third = await rig.ingest("s")
    clock.advance(HOLD_MAX_S - 1.0)
    intake.busy_at = clock.monotonic()
    assert await pool._dispatch_once() == 1  # the rest after a full hold: not held again yet
    clock.advance(1.0)
    intake.busy_at = clock.monotonic()
    fourth = await rig.ingest("s")
    assert await pool._dispatch_once() == 0  # rested: the next burst holds jobs again
    assert await pool.drain(10.0) == 0
    for event_id in (first, second, third):
        assert (await rig.job(event_id)).state == JobState.DONE
    assert (await rig.job(fourth)).state == JobState.QUEUED


async def test_jobs_start_once_a_burst_has_ended_without_waiting_out_the_holds_window(
    make_rig: MakeRig,
) -> None:
    """A burst is over when the receiver has had no webhook waiting for its commit and has
    answered no new event for HOLD_QUIET_S: the held jobs start then, not HOLD_WINDOW_S after
    the last crowd. A moment with nothing waiting between answers is not the end."""
    rig = await make_rig('[sources.s]\n[[sources.s.actions]]\ntype = "log"\n')
    intake = IntakeState()
    pool = rig.pool
    pool.intake = intake
    rig.journal.on_commit = pool.notify
    clock = rig.clock

    intake.busy_at = clock.monotonic()
    event_id = await rig.ingest("s")
    assert await pool._dispatch_once() == 0  # a first look finds nothing quiet yet
    intake.waiting = 3
    assert await pool._dispatch_once() == 0  # held: webhooks wait for their commit
    intake.waiting, intake.accepted = 0, intake.accepted + 3  # answered
    assert await pool._dispatch_once() == 0
    clock.advance(HOLD_QUIET_S / 2)
    assert await pool._dispatch_once() == 0
    intake.accepted += 1  # one more answered: the burst goes on
    clock.advance(HOLD_QUIET_S / 2)
    assert await pool._dispatch_once() == 0
    clock.advance(HOLD_QUIET_S / 2)
    assert await pool._dispatch_once() == 0  # quiet for half of HOLD_QUIET_S since
    clock.advance(HOLD_QUIET_S)
    assert clock.monotonic() - intake.busy_at < HOLD_WINDOW_S
    assert await pool._dispatch_once() == 1  # quiet for longer than HOLD_QUIET_S: over
    assert not pool.holding
    assert await pool.drain(10.0) == 0
    assert (await rig.job(event_id)).state == JobState.DONE


async def test_a_slot_is_free_once_the_action_returns_not_once_its_outcome_is_on_disk(
    make_rig: MakeRig,
) -> None:
    """With one worker, the next job runs while the last one's outcome is still being
    committed: a slow commit does not leave the pool idle, and both outcomes are kept."""
    rig = await make_rig(
        '[sources.s]\n[[sources.s.actions]]\ntype = "log"\n', workers="concurrency = 1"
    )
    gate, both_ran = asyncio.Event(), asyncio.Event()
    recording: list[Any] = []
    real_finish = rig.journal.finish

    async def slow_finish(results: Any) -> Recorded:  # a disk taking its time to commit
        recording.extend(results)
        if len(recording) == 2:
            both_ran.set()
        await gate.wait()
        return await real_finish(results)

    rig.journal.finish = slow_finish  # type: ignore[method-assign]
    events = [await rig.ingest("s"), await rig.ingest("s")]
    dispatcher = asyncio.create_task(rig.pool.run())
    rig.pool.poke()
    await asyncio.wait_for(both_ran.wait(), 10.0)
    assert rig.pool.statistics().busy == 0
    gate.set()
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    for event_id in events:
        job = await rig.job(event_id)
        assert (job.state, [a.outcome for a in job.history]) == (JobState.DONE, ["done"])


async def test_a_backlog_on_one_lane_is_read_in_a_few_big_refills_not_one_per_claim(
    make_rig: MakeRig,
) -> None:
    """Webhooks arriving faster than one tenant's jobs run are taken from the journal in big
    top-ups: the dispatcher does not re-read the journal before every claim."""
    rig = await make_rig(
        '[sources.s]\n[[sources.s.actions]]\ntype = "log"\n', workers="concurrency = 16"
    )
    rig.journal.on_commit = rig.pool.notify
    reads = 0
    real_ready_in_lanes = rig.journal.ready_in_lanes

    async def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_ready_in_lanes(*args)

    rig.journal.ready_in_lanes = counted  # type: ignore[method-assign]
    jobs = 1000
    all_done = asyncio.Event()
    rig.pool.on_finish.append(
        lambda *_: all_done.set() if rig.pool.outcomes["done"] >= jobs else None
    )
    dispatcher = asyncio.create_task(rig.pool.run())
    rig.pool.poke()
    for start in range(0, jobs, 100):  # arriving in commits of 100 while the pool works
        items = [new_item(rig.cfg, "s", rig.clock.time()) for _ in range(start, start + 100)]
        await asyncio.gather(*(rig.journal.ingest(item) for item in items))
    await asyncio.wait_for(all_done.wait(), 60.0)
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    assert (await rig.journal.counts()).jobs_by_state["done"] == jobs
    assert reads <= jobs // 40, f"{reads} refills for {jobs} jobs"


async def test_lanes_held_back_by_a_cap_leave_the_window_to_jobs_that_can_run(
    make_rig: MakeRig,
) -> None:
    """Four tenants' backlogs of a source capped at one running job would fill the window
    (1,000 jobs, 256 a lane at 32 workers): each keeps a worker-sized share of it instead, and
    another source's new jobs get the free workers while the capped job runs."""
    rig = await make_rig(
        '[sources.a]\nconcurrency = 1\n[[sources.a.actions]]\ntype = "log"\n'
        '[sources.b]\n[[sources.b.actions]]\ntype = "log"\n'
    )
    rig.journal.on_commit = rig.pool.notify
    held = HeldOpen(rig.actions[("a", "log")], rig.journal)
    rig.actions[("a", "log")] = held
    backlog = [
        NewEvent(
            new_event("a", rig.clock.time(), tenant=f"t{n % 4}"), jobs_for(rig.cfg.sources["a"])
        )
        for n in range(4 * 260)
    ]
    for start in range(0, len(backlog), 100):
        await asyncio.gather(*(rig.journal.ingest(item) for item in backlog[start : start + 100]))
    dispatcher = asyncio.create_task(rig.pool.run())
    await held.started.get()  # a's one slot is taken, its other jobs wait
    fair_share = 2 * rig.cfg.workers.concurrency
    b_jobs = 3 * rig.cfg.workers.concurrency
    b_done = asyncio.Event()
    rig.pool.on_finish.append(
        lambda *_: b_done.set() if rig.pool.outcomes["done"] >= b_jobs else None
    )
    for start in range(0, b_jobs, 16):
        await asyncio.gather(*(rig.ingest("b") for _ in range(start, start + 16)))
    await asyncio.wait_for(b_done.wait(), 30.0)
    window = rig.pool.scheduler.lanes()
    assert all(n <= fair_share for lane, n in window.items() if lane[1] == "a"), window
    assert held.started.empty()  # a's cap held all along
    held.go.set()
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    counts = await rig.journal.counts()
    assert counts.jobs_by_source["b"] == {"done": b_jobs}


async def test_a_walk_past_lanes_that_may_not_start_reaches_the_lanes_behind_them(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More lanes than a refill reads, none of whose jobs may start (a capped source's tenants,
    or the catch-all's names, which a sender chooses), ahead of another source's: a refill
    read only such jobs, none started, nothing ended to wake the dispatcher, and the walk
    reached the other source's lane once a sweep (3,000 such lanes left 2,000 of its jobs 24
    done in 90 s). The walk now goes on at once to the lanes behind them, and the window is
    shared among the lanes whose jobs may start: b's lane, read beside a's, took a share as
    small as theirs (the window over the lanes read), a few jobs a visit."""
    monkeypatch.setattr(webhookd.workers, "MAX_LANES_PER_REFILL", 16)
    rig = await make_rig(
        '[sources.a]\nconcurrency = 1\n[[sources.a.actions]]\ntype = "log"\n'
        '[sources.b]\n[[sources.b.actions]]\ntype = "log"\n',
        workers="window = 64",
    )
    b_read: list[int] = []
    real_ready_in_lanes = rig.journal.ready_in_lanes

    async def counted(*args: Any) -> Any:
        rows = await real_ready_in_lanes(*args)
        if any(job.source == "b" for job in rows):
            b_read.append(sum(job.source == "b" for job in rows))
        return rows

    rig.journal.ready_in_lanes = counted  # type: ignore[method-assign]
    held = HeldOpen(rig.actions[("a", "log")], rig.journal)
    rig.actions[("a", "log")] = held
    tenants = 40  # refills' worth of a's lanes, each a job that may not start
    await asyncio.gather(
        *(
            rig.journal.ingest(
                NewEvent(
                    new_event("a", rig.clock.time(), tenant=f"t{n:02}"),
                    jobs_for(rig.cfg.sources["a"]),
                )
            )
            for n in range(tenants + 1)
        )
    )
    dispatcher = asyncio.create_task(rig.pool.run())
    await held.started.get()  # a's one slot is taken: its other lanes may not start
    b_jobs = 24
    b_done = asyncio.Event()
    rig.pool.on_finish.append(
        lambda *_: b_done.set() if rig.pool.outcomes["done"] >= b_jobs else None
    )
    # Written by another process: read by refills alone, and no sweep comes on this clock.
    await asyncio.gather(*(rig.ingest("b") for _ in range(b_jobs)))
    rig.pool.poke()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(b_done.wait(), 10.0)
    assert rig.pool.outcomes["done"] == b_jobs, (
        f"{rig.pool.outcomes['done']} of b's {b_jobs} jobs ran in 10 s behind {tenants} lanes"
        " of which no job may start"
    )
    # Its first visit took what the workers can run, not the window's 64 over 16 lanes read.
    assert b_read[0] == b_jobs, b_read
    held.go.set()
    assert await rig.pool.drain(10.0) == 0
    await dispatcher


@pytest.mark.parametrize(
    ("tenants", "per_tenant", "workers"),
    [(20, 60, ""), (1, 200, "window = 64")],
    ids=["20-capped-tenants", "window-of-64"],
)
async def test_a_window_of_capped_lanes_leaves_room_for_another_sources_backlog(
    make_rig: MakeRig, tenants: int, per_tenant: int, workers: str
) -> None:
    """A source capped at one running job, with 20 tenants' backlogs (each lane within its
    share of the window, 50 of 1,000) or one tenant's in a window of 64: its lanes, of which
    no job may start, keep at most half the window, and another source's backlog, written by
    another process, runs on the 31 idle workers in top-ups as the window empties, not one job
    a sweep. The blocked jobs a trim dropped are not read again by the refills after it."""
    rig = await make_rig(
        '[sources.a]\nconcurrency = 1\n[[sources.a.actions]]\ntype = "log"\n'
        '[sources.b]\n[[sources.b.actions]]\ntype = "log"\n',
        workers=workers,
    )
    held = HeldOpen(rig.actions[("a", "log")], rig.journal)
    rig.actions[("a", "log")] = held
    backlog = [  # queued before the start: the first refill fills the window with them
        NewEvent(
            new_event("a", rig.clock.time(), tenant=f"t{n % tenants}"),
            jobs_for(rig.cfg.sources["a"]),
        )
        for n in range(tenants * per_tenant)
    ]
    for start in range(0, len(backlog), 100):
        await asyncio.gather(*(rig.journal.ingest(item) for item in backlog[start : start + 100]))
    a_read = 0
    refills = asyncio.Queue[None]()
    real_ready_in_lanes = rig.journal.ready_in_lanes

    async def counted(*args: Any) -> Any:
        nonlocal a_read
        rows = await real_ready_in_lanes(*args)
        a_read += sum(job.source == "a" for job in rows)
        refills.put_nowait(None)
        return rows

    rig.journal.ready_in_lanes = counted  # type: ignore[method-assign]
    dispatcher = asyncio.create_task(rig.pool.run())
    await held.started.get()  # a's one slot is taken, its other jobs wait
    capacity = rig.cfg.workers.window
    assert len(rig.pool.scheduler) == capacity - 1  # the window is full of a's jobs
    b_jobs = 300  # several refills' worth: the window's free half is topped up as it empties
    b_done = asyncio.Event()
    rig.pool.on_finish.append(
        lambda *_: b_done.set() if rig.pool.outcomes["done"] >= b_jobs else None
    )
    # Written by another process (a replay, another node): read by refills alone.
    for start in range(0, b_jobs, 100):
        await asyncio.gather(*(rig.ingest("b") for _ in range(start, start + 100)))
    rig.journal.on_commit = rig.pool.notify
    rig.pool.poke()
    # No sweep comes on the manual clock: each of b's jobs is read by a top-up.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(b_done.wait(), 10.0)
    window = rig.pool.scheduler.lanes()
    assert rig.pool.outcomes["done"] == b_jobs, (
        f"{rig.pool.outcomes['done']} of b's {b_jobs} jobs ran in 10 s with 31 workers idle;"
        f" the window holds {sum(window.values())} jobs, {window.get((1, 'b', ''), 0)} of b"
    )
    assert sum(n for lane, n in window.items() if lane[1] == "a") <= capacity // 2, window
    while not refills.empty():
        refills.get_nowait()
    a_read = 0
    for _ in range(3):  # refills while a's lanes are still blocked read none of a's jobs
        rig.pool.poke()
        await refills.get()
    assert a_read == 0
    assert held.started.empty()  # a's cap held all along
    held.go.set()
    assert await rig.pool.drain(10.0) == 0
    await dispatcher
    counts = await rig.journal.counts()
    assert counts.jobs_by_source["b"] == {"done": b_jobs}


class LaneCaller:
    """Stands for an ``openai`` action: its call comes to the lane, noting how long the line it
    joins is, and waits its turn there."""

    def __init__(self, lane: RateLane, enough: int) -> None:
        self.lane = lane
        self.longest_line = 0
        self.calls = 0
        self.enough = enough
        self.came = asyncio.Event()  # once ``enough`` calls have come

    async def run(self, event: Event, job: Job) -> Outcome:
        # A call that finds others waiting joins the line behind them (nothing runs between
        # this and its place in the line); one that finds none counts as a line of one.
        self.longest_line = max(self.longest_line, self.lane.waiting + 1)
        self.calls += 1
        if self.calls >= self.enough:
            self.came.set()
        await self.lane.acquire(1, max_wait_s=120, key=job.id)
        return Outcome.done()

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(("rpm", "workers", "calls"), [(450, 32, 40), (60, 16, 8)])
async def test_a_lanes_line_holds_at_most_most_waiting_of_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rpm: int, workers: int, calls: int
) -> None:
    """Model calls queued far past what their lane admits hold at most ``most_waiting`` workers
    in its line (two seconds of its rpm, at least 4), the line's first fill included: the
    dispatcher runs another round as soon as one started something, and each counts the jobs
    picked before whose calls have not come to the lane yet. Before, a round saw the line as it
    was before the last round's tasks ran, and 30 of 32 workers waited in a line of 15."""
    monkeypatch.setenv("WORKERS_TEST_KEY", "sk-test")
    lane_source = f"""
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:WORKERS_TEST_KEY"
base_url = "http://127.0.0.1:9/v1"
model = "gpt-4o-mini"
prompt = "hi"
max_tokens = 10
lane = "llm"

[lanes.llm]
rpm = {rpm}
burst_s = 1
"""
    cfg = make_config(tmp_path, lane_source, workers=f"concurrency = {workers}")
    lanes = build_lanes(cfg.lanes)
    caller = LaneCaller(lanes["llm"], calls)
    async with Journal(cfg.journal.path) as journal:
        items = [new_item(cfg, "mail", journal.clock.time()) for _ in range(2 * calls + workers)]
        await asyncio.gather(*(journal.ingest(item) for item in items))
        pool = WorkerPool(
            config=cfg,
            journal=journal,
            actions={("mail", "openai"): caller},
            boot_id="boot_test",
            rate_lanes=lanes,
        )
        dispatcher = asyncio.create_task(pool.run())
        try:
            await asyncio.wait_for(caller.came.wait(), 30.0)
        finally:
            await pool.drain(0)
            await dispatcher
    most = lanes["llm"].most_waiting
    assert caller.longest_line <= most, (
        f"{caller.longest_line} of {workers} workers waited in the line at once"
        f" (most_waiting = {most})"
    )


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's busy timeout at 1 s instead of 5 s, for the journals this test opens: a test of
    what a write held past it does waits it out, and the behaviour is the same at any length."""
    monkeypatch.setattr(journal_module, "_BUSY_TIMEOUT_MS", 1000)
    monkeypatch.setattr(
        journal_module,
        "_PRAGMAS",
        tuple(
            "PRAGMA busy_timeout = 1000" if p.startswith("PRAGMA busy_timeout") else p
            for p in journal_module._PRAGMAS
        ),
    )


async def one_job_running(target: Target, make_rig: MakeRig) -> tuple[Rig, asyncio.Task[None], str]:
    """A dispatching pool whose one job is held by the target: (rig, dispatcher, event id)."""
    rig = await make_rig(forward_source("slow", target.url))
    rig.journal.on_commit = rig.pool.notify
    dispatcher = asyncio.create_task(rig.pool.run())
    target.hold = asyncio.Event()
    event_id = await rig.ingest("slow")
    await target.wait_for(lambda t: t.running == 1)
    return rig, dispatcher, event_id


async def test_burst_mode_after_a_stop_starts_nothing_and_returns(make_rig: MakeRig) -> None:
    """Burst mode once the pool is stopped (a drain) claims nothing: it returns once nothing
    runs, saying when the queued job is due. It went on claiming and giving back a job queued
    again by the drain, for ever, when the drain's re-queue committed before its next look."""
    rig = await make_rig('[sources.s]\n[[sources.s.actions]]\ntype = "log"\n')
    event_id = await rig.ingest("s")
    commits = rig.journal.commits
    rig.pool.stop()
    async with asyncio.timeout(10):  # a failure here spins for ever; this bounds it
        due = await rig.pool.run_until_idle()
    assert due == rig.clock.time()
    assert rig.journal.commits == commits  # no claim given back
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)


async def test_drain_cancels_a_job_past_the_grace_without_counting_its_attempt(
    target: Target, make_rig: MakeRig
) -> None:
    """A job still running when the grace ends is cancelled and re-queued with its attempt
    not counted; the attempt is recorded (its target had the request), saying so."""
    rig, dispatcher, stuck = await one_job_running(target, make_rig)
    assert await rig.pool.drain(0.2) == 1
    await dispatcher
    job = await rig.job(stuck)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    [cut] = job.history
    assert (cut.n, cut.outcome, cut.detail) == (1, "interrupted", {"counted": False})
    assert cut.error == (
        "cut off by the drain after workers.shutdown_grace_s (0.2 s), its target may have had"
        " the request; not counted: the job runs again as this attempt"
    )


async def test_a_drain_that_cannot_re_queue_says_so_and_leaves_the_job_for_a_recovery(
    target: Target, make_rig: MakeRig, caplog: pytest.LogCaptureFixture, short_busy_timeout: None
) -> None:
    """With the journal unwritable as the grace ends (another process holding its write lock
    past busy_timeout), the cut-short job stays claimed, and the log says that, and what will
    recover it, rather than that it was re-queued."""
    rig, dispatcher, stuck = await one_job_running(target, make_rig)
    lock = sqlite3.connect(rig.cfg.journal.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        assert await rig.pool.drain(0.0) == 1
    finally:
        lock.close()
    await dispatcher
    assert rig.pool.left_claimed == 1
    assert (await rig.job(stuck)).state == JobState.RUNNING  # the next start's recovery's
    [said] = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert said.startswith(
        "drain: 1 job(s) still running after 0s were cut off, and could not be re-queued ("
    )
    # A SQLite journal has no lease and no other node: only its next start re-queues them.
    assert said.endswith("): recovered by the next start")


async def test_a_drain_says_which_jobs_had_finished_but_could_not_record_their_outcome(
    target: Target, make_rig: MakeRig, caplog: pytest.LogCaptureFixture, short_busy_timeout: None
) -> None:
    """A job whose delivery went through while the journal could not take its outcome is no
    job that "did not finish": the drain says it finished, that it runs again, and so that the
    delivery is made twice (and records no cut-off attempt for it)."""
    rig, dispatcher, event_id = await one_job_running(target, make_rig)
    lock = sqlite3.connect(rig.cfg.journal.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        assert target.hold is not None
        target.hold.set()  # delivered; its outcome waits for the lock
        await poll(lambda: _logged(caplog, "not recorded yet"), timeout_s=20)
        assert await rig.pool.drain(0.0) == 1
    finally:
        lock.close()
    await dispatcher
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain: 1")]
    assert said.startswith(
        "drain: 1 job(s) finished but their outcome was not recorded in time (unless it lands"
        " yet, each runs again: a delivery it made is made twice), and could not be re-queued ("
    )
    assert len(target.seen) == 1
    job = await rig.job(event_id)  # no cut-off attempt recorded for it
    assert [a.outcome for a in job.history] == [] and job.state == JobState.RUNNING


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_drain_lets_a_job_finish_within_the_grace(target: Target, make_rig: MakeRig) -> None:
    """A job that completes during the grace period is recorded done, nothing is cancelled."""
    rig, dispatcher, event_id = await one_job_running(target, make_rig)
    draining = asyncio.create_task(rig.pool.drain(30.0))
    target.hold.set()
    assert await draining == 0
    await dispatcher
    job = await rig.job(event_id)
    assert (job.state, job.attempts) == (JobState.DONE, 1)


async def test_jobs_left_running_by_another_boot_are_recovered_or_poison_pilled(
    tmp_path: Path, target: Target, run_daemon: Callable[..., Any]
) -> None:
    """At start, a job an earlier boot left running is re-queued and delivered; one interrupted
    for the third time goes to dead as a poison pill and is never run again."""
    cfg = make_config(tmp_path, forward_source("hook", target.url))
    async with Journal(cfg.journal.path) as journal:
        once, thrice = (new_item(cfg, "hook", time.time(), body) for body in (b"1", b"3"))
        for item in (once, thrice):
            await journal.ingest(item)
        [pill] = thrice.jobs
        for boot in ("boot_a", "boot_b"):
            await journal.claim([pill.id], boot)
            await journal.recover(f"{boot}_next", cfg.workers.max_recoveries)
        await journal.claim([once.jobs[0].id, pill.id], "boot_c")

    running: Running = await run_daemon(cfg)
    await target.wait_for(lambda t: len(t.seen) == 1)
    assert running.daemon.journal is not None
    assert await running.stop() == 0
    async with Journal(cfg.journal.path) as journal:
        [recovered] = (await journal.get_event(once.event.id)).jobs
        [poisoned] = (await journal.get_event(thrice.event.id)).jobs
    assert [s.headers["webhook-id"] for s in target.seen] == [once.event.id]
    assert recovered.state == JobState.DONE
    assert [a.outcome for a in recovered.history] == ["interrupted", "done"]
    assert poisoned.state == JobState.DEAD
    assert "poison pill" in (poisoned.last_error or "")
    assert [a.outcome for a in poisoned.history] == ["interrupted"] * 3


async def test_a_pool_started_while_a_source_is_paused_runs_none_of_its_jobs(
    target: Target, make_rig: MakeRig
) -> None:
    """A node started after ``webhookd pause`` holds the source's new jobs from its first
    round (not from its first sweep a second later), while other sources' jobs run."""
    rig = await make_rig(forward_source("held", target.url) + forward_source("open", target.url))
    await rig.journal.pause("held")
    rig.journal.on_commit = rig.pool.notify
    running = asyncio.create_task(rig.pool.run())
    try:
        await rig.ingest("held")
        await rig.ingest("open")
        await target.wait_for(lambda t: len(t.seen) >= 1, timeout_s=20)
        assert [s.path for s in target.seen] == ["/open"]
        assert (await rig.journal.counts()).jobs_by_state["queued"] == 1
    finally:
        rig.pool.stop()
        rig.pool.poke()
        await running


async def test_jobs_of_a_paused_source_do_not_wake_the_dispatcher(tmp_path: Path) -> None:
    """Webhooks keep coming to a paused source and their jobs stay queued: a commit of such
    jobs only gives the dispatcher a round with nothing to do, so it does not wake it (at
    thousands of webhooks a second that was a round per commit). A job of another source does."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    async with Journal(cfg.journal.path) as journal:
        pool = WorkerPool(config=cfg, journal=journal, actions={}, boot_id="boot")
        pool.paused = frozenset({"a"})
        pool.notify([Ready("job_1", "a", "log", 1, "", None, 1)])
        assert not pool._wake.is_set()
        assert len(pool.scheduler) == 0
        pool.notify([Ready("job_2", "b", "log", 1, "", None, 2)])
        assert pool._wake.is_set()
        assert len(pool.scheduler) == 1
