"""Lanes shared by nodes through one PostgreSQL journal: the bucket row, reserved in chunks.

Each "node" is a ``PostgresJournal`` with a ``Lane`` on it, all on one simulated clock: a
lane's sleep waits until the test's driver moves the clock to its end, so minutes of traffic
run in seconds with real round trips to a real database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import DatabaseOutage

from webhookd.clock import ManualClock
from webhookd.config import LaneConfig
from webhookd.journal.postgres import PostgresJournal
from webhookd.journal.postgres.lanes import LaneRow, plan
from webhookd.limiter import SHARED_LOG_S, WINDOW_S, Lane, LaneBusy
from webhookd.models import LaneSpec

pytestmark = pytest.mark.slow


class Driver:
    """Simulated time for several lanes: each sleep waits for the driver to reach its end."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.sleeping: list[tuple[float, asyncio.Future[None]]] = []
        self.changed = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleeping.append((self.clock.monotonic() + seconds, wake))
        self.changed.set()
        try:
            await wake
        finally:
            self.sleeping = [(at, f) for at, f in self.sleeping if f is not wake]

    async def step(self, tasks: list[asyncio.Task[None]]) -> None:
        """Once every live task sleeps, move the clock to the earliest wake and wake it."""
        while len(self.sleeping) < sum(not t.done() for t in tasks):
            self.changed.clear()
            waiting = asyncio.ensure_future(self.changed.wait())
            await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        if not self.sleeping:
            return
        at, wake = min(self.sleeping, key=lambda s: s[0])
        if at > self.clock.monotonic():
            self.clock.advance(at - self.clock.monotonic())
        wake.set_result(None)
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def nodes(url: str, clock: ManualClock, n: int) -> AsyncIterator[list[PostgresJournal]]:
    async with contextlib.AsyncExitStack() as stack:
        journals = []
        for _ in range(n):
            journal = PostgresJournal(url, clock=clock, heartbeat_s=3600)
            journals.append(await stack.enter_async_context(journal))
        yield journals


def shared_lane(journal: PostgresJournal, driver: Driver, **limits: Any) -> Lane:
    config = LaneConfig("llm", **limits)
    return Lane(config, clock=driver.clock, sleep=driver.sleep, store=journal, probe_after_s=30)


def busiest_window(times: list[float], amounts: list[float] | None = None) -> float:
    """The most admitted in any ``WINDOW_S`` window ``[s, s + 60)`` (s at an admission)."""
    amounts = amounts if amounts is not None else [1.0] * len(times)
    pairs = sorted(zip(times, amounts, strict=True))
    best = total = 0.0
    lo = 0
    for at, amount in pairs:
        total += amount
        while pairs[lo][0] <= at - WINDOW_S:
            total -= pairs[lo][1]
            lo += 1
        best = max(best, total)
    return best


async def test_a_withdrawn_call_gives_its_request_back_to_the_shared_bucket(pg_url: str) -> None:
    """Calls admitted and then not made (their source paused) go back to the shared bucket,
    requests and tokens, with the node's next request for a chunk: spendable at once."""
    driver = Driver()
    async with nodes(pg_url, driver.clock, 1) as (journal,):
        lane = shared_lane(journal, driver, rpm=60, tpm=6_000, burst_s=3.0)
        taken = [await lane.acquire(100, max_wait_s=0) for _ in range(3)]  # the burst
        with pytest.raises(LaneBusy):
            await lane.acquire(100, max_wait_s=0)
        for reservation in taken:
            lane.withdraw(reservation)
        again = [await lane.acquire(100, max_wait_s=0) for _ in range(3)]
        with pytest.raises(LaneBusy):
            await lane.acquire(100, max_wait_s=0)
    assert [r.admitted_at_s for r in again] == [taken[0].admitted_at_s] * 3


async def test_two_nodes_sharing_a_lane_stay_within_rpm_and_tpm_in_every_window_and_use_it(
    pg_url: str,
) -> None:
    """Two nodes pushing one saturated lane for three minutes: no 60 s window holds more than
    the lane's rpm or its (settled) tpm across both, and together they use over 90 % of it."""
    driver = Driver()
    admitted: list[tuple[float, int]] = []
    rpm, tpm, minutes = 60, 9000, 3

    async with nodes(pg_url, driver.clock, 2) as journals:
        lanes = [shared_lane(j, driver, rpm=rpm, tpm=tpm, burst_s=3.0) for j in journals]
        end = driver.clock.monotonic() + minutes * WINDOW_S

        async def worker(lane: Lane, actual: int) -> None:
            while driver.clock.monotonic() < end:
                try:
                    reservation = await lane.acquire(100, max_wait_s=30)
                except LaneBusy as busy:
                    await driver.sleep(busy.retry_after_s)
                    continue
                lane.settle(reservation, actual)  # refunds go back with the next reservation
                admitted.append((driver.clock.monotonic(), actual))

        workers = [
            asyncio.create_task(worker(lanes[0], 60)),
            asyncio.create_task(worker(lanes[1], 100)),
        ]
        while not all(w.done() for w in workers):
            await driver.step(workers)
        for w in workers:
            w.result()

    times = [at for at, _ in admitted]
    assert busiest_window(times) <= rpm
    assert busiest_window(times, [float(t) for _, t in admitted]) <= tpm
    start = driver.clock.monotonic() - minutes * WINDOW_S
    steady = [at for at in times if at >= start + WINDOW_S]  # past the first minute's burst
    assert len(steady) >= 0.9 * rpm * (minutes - 1)
    share = sum(actual == 60 for _, actual in admitted) / len(admitted)
    assert 0.4 <= share <= 0.6  # and they share it fairly


async def test_a_cooldown_on_one_node_holds_on_the_other(pg_url: str) -> None:
    """After a 429 on one node (its cool-down published), the other node's lane refuses with
    "cooling down" until the cool-down ends, then admits again."""
    driver = Driver()
    async with nodes(pg_url, driver.clock, 2) as (a, b):
        lane_a = shared_lane(a, driver, rpm=600)
        lane_b = shared_lane(b, driver, rpm=600)
        lane_a.cooldown(12)
        await lane_a.publish()
        with pytest.raises(LaneBusy, match="cooling down") as busy:
            await lane_b.acquire(1, max_wait_s=5)
        assert 11 <= busy.value.retry_after_s <= 12
        driver.clock.advance(12)
        assert (await lane_b.acquire(1, max_wait_s=5)).lane == "llm"


async def test_an_open_circuit_holds_on_every_node_and_only_one_node_probes(pg_url: str) -> None:
    """``insufficient_quota`` on one node closes the lane on all; after ``probe_after_s`` one
    call in the whole cluster probes, and its success reopens the lane everywhere."""
    driver = Driver()
    async with nodes(pg_url, driver.clock, 2) as (a, b):
        lane_a = shared_lane(a, driver, rpm=600)
        lane_b = shared_lane(b, driver, rpm=600)
        lane_a.open_circuit("insufficient_quota")
        await lane_a.publish()
        with pytest.raises(LaneBusy, match="circuit open"):
            await lane_b.acquire(1, max_wait_s=5)
        driver.clock.advance(30)
        await lane_b.acquire(1, max_wait_s=5)  # the probe
        with pytest.raises(LaneBusy, match="circuit open"):
            await lane_a.acquire(1, max_wait_s=5)
        lane_b.close_circuit()
        await lane_b.publish()
        driver.clock.advance(30)
        await lane_a.acquire(1, max_wait_s=5)
        assert not lane_a.statistics().circuit_open


async def saturate_across_a_step(pg_url: str, step_s: float) -> list[float]:
    """One node keeping a lane of rpm 60 at its limit for a minute, then ``step_s`` stepping
    its wall clock, then two more minutes: when each call was admitted, in real time."""
    driver = Driver()
    admitted: list[float] = []
    async with nodes(pg_url, driver.clock, 1) as (journal,):
        lane = shared_lane(journal, driver, rpm=60, burst_s=3.0)
        start = driver.clock.monotonic()

        async def worker() -> None:
            stepped = False
            while driver.clock.monotonic() < start + 3 * WINDOW_S:
                if not stepped and driver.clock.monotonic() >= start + WINDOW_S:
                    driver.clock.step_wall(step_s)
                    stepped = True
                try:
                    reservation = await lane.acquire(1, max_wait_s=30)
                except LaneBusy as busy:
                    await driver.sleep(busy.retry_after_s)
                    continue
                admitted.append(reservation.admitted_at_s - start)

        task = asyncio.create_task(worker())
        while not task.done():
            await driver.step([task])
        task.result()
    return admitted


async def test_a_shared_lane_goes_on_at_its_pace_after_the_wall_clock_steps_back(
    pg_url: str,
) -> None:
    """The wall clock set back an hour under a saturated lane: the lane neither wedges (its
    row stamped an hour ahead) nor goes past its limit; it admits at its pace."""
    admitted = await saturate_across_a_step(pg_url, -3_600)
    after = [at for at in admitted if at >= WINDOW_S]
    assert after, "nothing admitted in the two minutes after the step back"
    assert after[0] < WINDOW_S + SHARED_LOG_S, f"first call after the step at {after[0]:.1f} s"
    assert busiest_window(admitted) <= 60
    assert len(after) >= 0.9 * 2 * 60


async def test_a_shared_lane_admits_at_once_two_minutes_after_its_clock_stepped_back_an_hour(
    pg_url: str,
) -> None:
    """One node, a minute of calls at rpm 60, its wall clock set back an hour, two minutes go
    by: its minute is long over, and the lane admits the next call at once."""
    clock = ManualClock()
    async with nodes(pg_url, clock, 1) as (journal,):

        async def nap(seconds: float) -> None:
            clock.advance(seconds)

        lane = Lane(LaneConfig("llm", rpm=60), clock=clock, sleep=nap, store=journal)
        for _ in range(60):
            await lane.acquire(1, max_wait_s=5)
        clock.step_wall(-3_600)
        clock.advance(120)
        try:
            await lane.acquire(1, max_wait_s=0)
        except LaneBusy as busy:
            pytest.fail(f"2 min after the step back the lane still refuses: {busy}")


async def test_a_shared_lane_admits_no_second_minute_at_once_after_the_wall_clock_steps_forward(
    pg_url: str,
) -> None:
    """The wall clock set an hour ahead under a saturated lane: its log still holds the
    minute's calls, so no 60 s window of real time holds more than rpm."""
    admitted = await saturate_across_a_step(pg_url, 3_600)
    assert busiest_window(admitted) <= 60
    assert len([at for at in admitted if at >= WINDOW_S]) >= 0.9 * 2 * 60


async def test_a_cooldown_published_after_a_step_forward_lasts_what_it_said(pg_url: str) -> None:
    """A cool-down written by a node whose clock stepped since it last wrote the row is moved
    with the row's other times: it ends when it said, not a step later."""
    driver = Driver()
    async with nodes(pg_url, driver.clock, 1) as (journal,):
        lane = shared_lane(journal, driver, rpm=600)
        await lane.acquire(1, max_wait_s=5)
        driver.clock.step_wall(3_600)
        lane.cooldown(12)
        await lane.publish()
        driver.clock.advance(12)
        assert (await lane.acquire(1, max_wait_s=5)).lane == "llm"


async def test_an_unreachable_database_makes_the_shared_lane_admit_nothing(
    pg_url: str, db_outage: DatabaseOutage
) -> None:
    """With PostgreSQL refusing connections the lane refuses every call, saying the journal is
    unreachable (the job waits, it is not dead), and admits again once the database is back."""
    driver = Driver()
    async with nodes(pg_url, driver.clock, 1) as (journal,):
        lane = shared_lane(journal, driver, rpm=600)
        await lane.acquire(1, max_wait_s=5)
        driver.clock.advance(5)  # the chunk it holds has expired
        await db_outage.begin()
        for _ in range(3):
            with pytest.raises(LaneBusy, match="journal is unreachable") as busy:
                await lane.acquire(1, max_wait_s=5)
            assert busy.value.retry_after_s > 0
        await db_outage.end()
        assert (await lane.acquire(1, max_wait_s=5)).lane == "llm"


def spec(rpm: int | None = 60, tpm: int | None = None) -> LaneSpec:
    return LaneSpec("llm", rpm, tpm, 3.0, SHARED_LOG_S, 30.0)


def test_plan_grants_the_burst_then_only_the_refill_and_says_when_to_ask_again() -> None:
    """A fresh row grants its burst; then nothing until the refill covers the need, with the
    wait it takes; a chunk given back unspent is granted again at once."""
    row = LaneRow.fresh(spec(), 0.0)
    first = plan(row, spec(), 0.0, need=(1, 0), want=(10, 0))
    assert first.requests == 3  # burst_s = 3 at 1 request/s
    refused = plan(row, spec(), 0.0, need=(1, 0), want=(1, 0))
    assert (refused.requests, refused.retry_s) == (0, 1.0)
    again = plan(row, spec(), 0.0, need=(1, 0), want=(3, 0), returns=[(0.0, -2.0, 0.0)])
    assert again.requests == 2
    later = plan(row, spec(), 2.5, need=(1, 0), want=(5, 0))
    assert later.requests == 2


def test_plan_never_grants_more_than_the_limit_within_the_shared_log() -> None:
    """Grants asked for as fast as the bucket allows add up to at most rpm over any 60 s."""
    row = LaneRow.fresh(spec(rpm=30), 0.0)
    now, grants = 0.0, []
    while now < 300:
        grant = plan(row, spec(rpm=30), now, need=(1, 0), want=(30, 0))
        grants += [now] * int(grant.requests)
        now += max(grant.retry_s, 0.1)
    assert busiest_window(grants) <= 30
    assert len([g for g in grants if g >= 60]) >= 0.9 * 30 * 4


WALL = 1_700_000_000.0  # the wall clock at real time 0, before any step


def saturate_plan(
    row: LaneRow, start: float, real_s: float, step_s: float = 0.0, told: bool = True
) -> tuple[list[float], float]:
    """Grants asked for one at a time, as fast as ``row`` allows, for ``real_s`` of real time
    from ``start``, on a wall clock that reads real time plus ``step_s``; the first ask tells
    that step if ``told``. The real time of each grant, and when it stopped."""
    grants: list[float] = []
    real, stepped_s = start, step_s if told else 0.0
    while real < start + real_s:
        now = WALL + step_s + real
        grant = plan(row, spec(), now, need=(1, 0), want=(1, 0), stepped_s=stepped_s)
        stepped_s = 0.0
        grants += [real] * int(grant.requests)
        real += max(grant.retry_s, 0.05)
    return grants, real


@pytest.mark.parametrize("told", [True, False], ids=["told", "untold"])
def test_plan_goes_on_at_its_pace_after_the_wall_clock_steps_back(told: bool) -> None:
    """A row stamped an hour ahead of the clock (the clock set back under a saturated lane) is
    no reason to refuse for an hour: the lane goes on at its pace, within its limit, whether the
    asking node says its clock stepped or not (another node's, or one restarted since)."""
    row = LaneRow.fresh(spec(), WALL)
    before, real = saturate_plan(row, 0.0, 1.5 * WINDOW_S)
    after, _ = saturate_plan(row, real, 2 * WINDOW_S, step_s=-3_600, told=told)
    assert after, "nothing granted in the two minutes after the step back"
    assert after[0] < real + SHARED_LOG_S
    assert busiest_window(before + after) <= 60
    assert len(after) >= 0.9 * 2 * 60


def test_plan_grants_no_second_minute_at_once_after_the_wall_clock_steps_forward() -> None:
    """Under a saturated lane the clock jumps an hour ahead: the node says so, and the
    row's log and bucket go on as they were, so no 60 s of real time holds more than rpm."""
    row = LaneRow.fresh(spec(), WALL)
    before, real = saturate_plan(row, 0.0, 1.5 * WINDOW_S)
    after, _ = saturate_plan(row, real, 2 * WINDOW_S, step_s=3_600)
    assert busiest_window(before + after) <= 60
    assert len(after) >= 0.9 * 2 * 60


def test_plan_after_an_idle_hour_with_no_step_grants_the_burst_at_once() -> None:
    """An hour with no call is time, not a step: the bucket is full and the log empty."""
    row = LaneRow.fresh(spec(), WALL)
    _, real = saturate_plan(row, 0.0, WINDOW_S + 1)
    grant = plan(row, spec(), WALL + real + 3_600, need=(1, 0), want=(10, 0))
    assert grant.requests == 3
