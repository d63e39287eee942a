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
