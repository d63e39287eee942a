"""Lanes: RPM/TPM bounds over every 60 s window, FIFO, reservations, cooldown and circuit."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from webhookd.clock import ManualClock
from webhookd.config import LaneConfig
from webhookd.errors import WebhookdError
from webhookd.limiter import JITTER_GUARD_S, LOG_S, Lane, LaneBusy, Reservation, build_lanes


class SimTime:
    """A ManualClock and a sleep that advances it: simulated time, no real waiting."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.start = self.clock.monotonic()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)

    def lane(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        burst_s: float = 3.0,
        probe_after_s: float | None = 60.0,
        max_cooldown_s: float = 3600.0,
    ) -> Lane:
        config = LaneConfig("llm", rpm=rpm, tpm=tpm, burst_s=burst_s, max_cooldown_s=max_cooldown_s)
        return Lane(config, clock=self.clock, sleep=self.sleep, probe_after_s=probe_after_s)

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.start


class GatedSleep(SimTime):
    """Sleeps that block until the test releases them, to inspect and cancel waiters mid-wait."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gates.append((seconds, gate))
        await gate

    def release(self) -> float:
        """Advance the clock by the oldest pending sleep and end it."""
        seconds, gate = self.gates.pop(0)
        self.clock.advance(seconds)
        gate.set_result(None)
        return seconds


async def run_ready() -> None:
    """Let every ready task run until it blocks (a yield to the loop, not a timed wait)."""
    for _ in range(10):
        await asyncio.sleep(0)


def max_in_any_window(times: list[float], amounts: list[float]) -> float:
    """The largest total admitted in any window [s, s + 60) (the worst one starts at an entry)."""
    worst = 0.0
    for i, start in enumerate(times):
        total = sum(a for t, a in zip(times[i:], amounts[i:], strict=True) if t < start + 60.0)
        worst = max(worst, total)
    return worst


async def saturate(
    lane: Lane, sim: SimTime, sizes: list[int], minutes: float, consumers: int = 8
) -> list[Reservation]:
    """Keep ``consumers`` callers queued on ``lane`` for ``minutes`` of simulated time."""
    admitted: list[Reservation] = []
    end = sim.start + minutes * 60.0
    rng = random.Random(7)

    async def consumer() -> None:
        while sim.clock.monotonic() < end:
            reservation = await lane.acquire(rng.choice(sizes), max_wait_s=math.inf)
            admitted.append(reservation)

    async with asyncio.TaskGroup() as tg:
        for _ in range(consumers):
            tg.create_task(consumer())
    return admitted


@pytest.mark.parametrize(
    ("rpm", "tpm", "sizes", "binding"),
    [
        (600, 20_000, [50, 300, 900, 2_500], "tokens"),  # 2 500 is over the 1 000-token burst
        (30, 1_000_000, [100, 200], "requests"),
        (10, 10_000, [1_000], "requests"),  # the burst is half a request
    ],
)
async def test_saturated_lane_stays_under_limits_in_every_window_and_uses_90_percent(
    rpm: int, tpm: int, sizes: list[int], binding: str
) -> None:
    """Saturated for 5 simulated minutes, no 60 s window exceeds rpm/tpm, not even of arrival
    times that lag admissions by up to the jitter guard, and ≥ 90 % is used."""
    sim = SimTime()
    lane = sim.lane(rpm=rpm, tpm=tpm)
    admitted = await saturate(lane, sim, sizes, minutes=5)
    times = [r.admitted_at_s for r in admitted]
    assert times == sorted(times)
    assert max_in_any_window(times, [1] * len(times)) <= rpm
    assert max_in_any_window(times, [r.tokens for r in admitted]) <= tpm
    # The provider counts arrivals: any delay up to the guard, in any order, stays in bounds.
    rng = random.Random(11)
    arrivals = sorted(
        (r.admitted_at_s + rng.choice([0.0, JITTER_GUARD_S, rng.uniform(0, JITTER_GUARD_S)]), r)
        for r in admitted
    )
    arrived_at = [t for t, _ in arrivals]
    assert max_in_any_window(arrived_at, [1] * len(arrivals)) <= rpm
    assert max_in_any_window(arrived_at, [r.tokens for _, r in arrivals]) <= tpm
    in_run = [r for r in admitted if r.admitted_at_s < sim.start + 300.0]
    used = (
        len(in_run) / (5 * rpm)
        if binding == "requests"
        else sum(r.tokens for r in in_run) / (5 * tpm)
    )
    assert used >= 0.9


@settings(max_examples=60, deadline=None, database=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 20.0),  # gap before the call, s
            st.integers(0, 6_000),  # estimate, tokens (up to a whole minute's worth)
            st.floats(0.0, 1.0),  # actual / estimate at settle time
            st.sampled_from([0.0, 2.0, math.inf]),  # max_wait_s
        ),
        min_size=1,
        max_size=80,
    ),
    burst_s=st.sampled_from([1.0, 3.0, 10.0]),
)
def test_random_traffic_never_exceeds_limits_in_any_window(
    steps: list[tuple[float, int, float, float]], burst_s: float
) -> None:
    """For any sizes, gaps and refunds no 60 s window holds more than rpm requests or tpm tokens."""

    async def scenario() -> tuple[list[float], list[int]]:
        sim = SimTime()
        lane = sim.lane(rpm=20, tpm=6_000, burst_s=burst_s)
        times: list[float] = []
        used: list[int] = []
        for gap_s, estimate, ratio, max_wait_s in steps:
            sim.clock.advance(gap_s)
            try:
                reservation = await lane.acquire(estimate, max_wait_s=max_wait_s)
            except LaneBusy:
                continue
            actual = int(estimate * ratio)
            lane.settle(reservation, actual)
            times.append(reservation.admitted_at_s)
            used.append(actual)
        return times, used

    times, used = asyncio.run(scenario())
    assert max_in_any_window(times, [1] * len(times)) <= 20
    assert max_in_any_window(times, [float(u) for u in used]) <= 6_000


async def test_fresh_lane_bursts_only_burst_s_worth() -> None:
    """A new (or restarted) lane admits burst_s seconds' worth at once, not a minute's."""
    sim = SimTime()
    lane = sim.lane(rpm=600, tpm=60_000)  # 3 s: 30 requests, 3 000 tokens
    for _ in range(30):
        await lane.acquire(10, max_wait_s=0)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(10, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(0.1)

    tokens_lane = sim.lane(tpm=60_000)
    for _ in range(3):
        await tokens_lane.acquire(1_000, max_wait_s=0)
    with pytest.raises(LaneBusy):
        await tokens_lane.acquire(1_000, max_wait_s=0)
    assert sim.slept == []


async def test_large_request_is_not_overtaken_by_small_ones_queued_after_it() -> None:
    """FIFO: a large call waiting for tokens is admitted before small calls that came later."""
    sim = SimTime()
    lane = sim.lane(tpm=6_000)  # 100 tokens/s, burst 300
    await lane.acquire(300, max_wait_s=0)
    order: list[str] = []

    async def call(label: str, tokens: int) -> None:
        await lane.acquire(tokens, max_wait_s=math.inf)
        order.append(label)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(call("large", 250))
        for i in range(5):
            tg.create_task(call(f"small{i}", 10))
    assert order == ["large", "small0", "small1", "small2", "small3", "small4"]
    assert sim.elapsed() == pytest.approx(3.0)  # 250 + 5 × 10 tokens at 100/s, nothing wasted


async def test_settle_refunds_and_charges_the_difference() -> None:
    """Settling refunds an over-estimate (capped at the burst) and charges an under-estimate."""
    sim = SimTime()
    lane = sim.lane(tpm=60_000)  # burst 3 000 tokens
    first = await lane.acquire(3_000, max_wait_s=0)
    lane.settle(first, 1_000)
    assert lane.statistics().tokens_available == 2_000
    second = await lane.acquire(2_000, max_wait_s=0)
    lane.settle(second, 2_500)
    stats = lane.statistics()
    assert stats.tokens_available == -500
    assert stats.tokens_debited_total == 3_500

    third = await lane.acquire(100, max_wait_s=math.inf)  # waits off the debt
    sim.clock.advance(10)  # bucket full again
    lane.settle(third, 0)
    assert lane.statistics().tokens_available == 3_000
    with pytest.raises(ValueError, match="already settled"):
        lane.settle(third, 0)


async def test_withdraw_gives_back_the_request_and_the_tokens() -> None:
    """A call admitted and then not made (its source paused) takes nothing from the lane: its
    request and its tokens go back, and the next call in line is let in at once."""
    sim = GatedSleep()
    lane = sim.lane(rpm=60, tpm=60_000)  # a burst of 3 requests, 3 000 tokens
    taken = [await lane.acquire(1_000, max_wait_s=0) for _ in range(3)]
    waiting = asyncio.create_task(lane.acquire(1_000, max_wait_s=math.inf))
    await run_ready()
    assert not waiting.done()
    lane.withdraw(taken[0])
    reservation = await waiting
    assert reservation.admitted_at_s == sim.start
    stats = lane.statistics()
    assert (stats.requests_available, stats.tokens_available) == (0, 0)
    assert stats.tokens_debited_total == 3_000
    with pytest.raises(ValueError, match="already settled"):
        lane.withdraw(taken[0])


async def test_refund_wakes_the_waiting_head_early() -> None:
    """A refund lets a waiting call in at once instead of after its computed refill time."""
    sim = GatedSleep()
    lane = sim.lane(tpm=6_000)
    held = await lane.acquire(300, max_wait_s=0)
    waiting = asyncio.create_task(lane.acquire(200, max_wait_s=math.inf))
    await run_ready()
    assert [s for s, _ in sim.gates] == [pytest.approx(2.0)]
    lane.settle(held, 50)  # 250 tokens come back
    reservation = await waiting
    assert reservation.admitted_at_s == sim.start
    assert lane.statistics().tokens_available == 50


async def test_observe_remaining_only_lowers_levels() -> None:
    """Upstream's remaining-* headers lower the local levels but never raise them."""
    sim = SimTime()
    lane = sim.lane(rpm=600, tpm=60_000)
    lane.observe_remaining(5, 100)
    stats = lane.statistics()
    assert (stats.requests_available, stats.tokens_available) == (5, 100)
    lane.observe_remaining(10_000, 1_000_000)
    lane.observe_remaining(None, None)
    stats = lane.statistics()
    assert (stats.requests_available, stats.tokens_available) == (5, 100)


async def test_cooldown_refuses_with_remaining_time_then_admits() -> None:
    """After a 429 no call is admitted until Retry-After passes; LaneBusy says how long is left."""
    sim = SimTime()
    lane = sim.lane(rpm=600)
    lane.cooldown(30)
    sim.clock.advance(10)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=math.inf)
    assert busy.value.retry_after_s == pytest.approx(20)
    assert isinstance(busy.value, WebhookdError)
    assert lane.statistics().cooling_until_s == pytest.approx(20)
    sim.clock.advance(20)
    await lane.acquire(1, max_wait_s=0)
    assert lane.statistics().cooling_until_s == 0


@pytest.mark.parametrize("asked_s", [99_999_999.0, math.inf])
async def test_cooldown_is_capped_at_max_cooldown_s(asked_s: float) -> None:
    """A 429 asking for years (or forever) closes the lane for max_cooldown_s, then admits."""
    sim = SimTime()
    lane = Lane(LaneConfig("llm", rpm=600, max_cooldown_s=120), clock=sim.clock, sleep=sim.sleep)
    assert lane.cooldown(asked_s) == 120
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=math.inf)
    assert busy.value.retry_after_s == pytest.approx(120)
    sim.clock.advance(120)
    await lane.acquire(1, max_wait_s=0)
    with pytest.raises(ValueError, match="seconds"):
        lane.cooldown(math.nan)


async def test_a_long_projected_wait_reschedules_no_further_than_max_cooldown_s() -> None:
    """A job sent away for a wait the lane projects is asked back within max_cooldown_s."""
    sim = SimTime()
    config = LaneConfig("llm", tpm=60, burst_s=60, max_cooldown_s=30)
    lane = Lane(config, clock=sim.clock, sleep=sim.sleep)
    await lane.acquire(60, max_wait_s=0)  # the whole minute's tokens: the next waits ~60 s
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(60, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(30)


async def test_cooldown_sends_queued_calls_away() -> None:
    """Calls already waiting get LaneBusy when a cooldown starts instead of holding workers."""
    sim = GatedSleep()
    lane = sim.lane(tpm=6_000)
    await lane.acquire(300, max_wait_s=0)
    waiters = [asyncio.create_task(lane.acquire(100, max_wait_s=math.inf)) for _ in range(3)]
    await run_ready()
    assert lane.statistics().waiting == 3
    lane.cooldown(15)
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LaneBusy) for r in results)
    assert [r.retry_after_s for r in results if isinstance(r, LaneBusy)] == [15, 15, 15]
    stats = lane.statistics()
    assert (stats.waiting, stats.busy_total, stats.tokens_debited_total) == (0, 3, 300)


async def test_open_circuit_refuses_probes_once_per_interval_and_closes() -> None:
    """With the circuit open calls are refused; one probe passes per interval until closed."""
    sim = SimTime()
    lane = sim.lane(rpm=600, probe_after_s=60.0)
    lane.open_circuit("insufficient_quota")
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=math.inf)
    assert busy.value.retry_after_s == pytest.approx(60)
    assert "insufficient_quota" in str(busy.value)
    assert lane.statistics().circuit_open
    sim.clock.advance(60)
    await lane.acquire(1, max_wait_s=0)  # the probe
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(60)
    lane.close_circuit()
    await lane.acquire(1, max_wait_s=0)
    assert not lane.statistics().circuit_open


async def test_circuit_without_probing_stays_shut() -> None:
    """With probing disabled the circuit stays open however long one waits, until closed."""
    sim = SimTime()
    lane = sim.lane(rpm=600, probe_after_s=None)
    lane.open_circuit("insufficient_quota")
    sim.clock.advance(3_600)
    with pytest.raises(LaneBusy):
        await lane.acquire(1, max_wait_s=0)
    lane.close_circuit()
    await lane.acquire(1, max_wait_s=0)


async def test_long_projected_wait_raises_at_once_instead_of_waiting() -> None:
    """A call whose wait (counting the queue ahead, and the calls already asked back) would
    exceed max_wait_s is refused at once, and asked back when its turn comes."""
    sim = GatedSleep()
    lane = sim.lane(tpm=6_000)  # 100 tokens/s
    await lane.acquire(300, max_wait_s=0)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(250, max_wait_s=2.0)
    assert busy.value.retry_after_s == pytest.approx(2.5)
    # Its 250 tokens count ahead of what comes next: 1 s alone, 3.5 s behind them.
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(100, max_wait_s=2.0)
    assert busy.value.retry_after_s == pytest.approx(3.5)
    ahead = asyncio.create_task(lane.acquire(150, max_wait_s=10.0))
    await run_ready()
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(100, max_wait_s=2.0)  # behind 350 asked back and 150 in line
    assert busy.value.retry_after_s == pytest.approx(6.0)
    stats = lane.statistics()
    assert (stats.waiting, stats.waits_total, stats.busy_total) == (1, 1, 3)
    sim.release()
    await ahead


@pytest.mark.parametrize("grows_by", ["an under-estimate settled", "the upstream's headers"])
async def test_a_call_whose_wait_grows_in_line_leaves_it_by_max_wait_s(grows_by: str) -> None:
    """A call that joined the line on a short projected wait leaves it with LaneBusy (its job
    rescheduled, its worker freed) once its wait would go past max_wait_s, instead of holding
    its worker until the attempt's timeout_s cuts it off."""
    sim = GatedSleep()
    lane = sim.lane(tpm=6_000)  # 100 tokens/s, a burst of 300
    first = await lane.acquire(100, max_wait_s=0)  # 200 left
    waiting = asyncio.create_task(lane.acquire(300, max_wait_s=2.0))  # 1 s: joins the line
    await run_ready()
    assert lane.waiting == 1 and not waiting.done()
    if grows_by == "an under-estimate settled":
        lane.settle(first, 3_000)  # the prompt took 3,000 tokens: 29 s more to wait
    else:
        lane.observe_remaining(None, 0)  # the provider counts none left: 3 s in all
    sim.release()  # its 1 s nap ends
    await run_ready()
    assert waiting.done(), f"still in line after {sim.elapsed():.1f} s with max_wait_s = 2"
    with pytest.raises(LaneBusy, match="has a long wait") as busy:
        waiting.result()
    assert sim.elapsed() == pytest.approx(1.0)
    assert busy.value.retry_after_s == pytest.approx(29.0 if "settled" in grows_by else 2.0)
    assert lane.waiting == 0


async def test_a_backlog_refused_at_once_is_asked_back_one_turn_apart_in_order() -> None:
    """Calls refused together come back when each one's turn comes, not all at the first:
    at rpm 6 (one call each 10 s once the burst is spent) the refused are asked back 10 s
    apart, in the order they came; a promise lapses at its time, and one past the lane's
    max_cooldown_s is asked back then."""
    sim = SimTime()
    lane = sim.lane(rpm=6, burst_s=10.0, max_cooldown_s=45.0)
    await lane.acquire(1, max_wait_s=0)  # the burst: one call
    retries = []
    for n in range(6):
        with pytest.raises(LaneBusy) as busy:
            await lane.acquire(1, max_wait_s=5.0, key=f"job-{n}")
        retries.append(busy.value.retry_after_s)
    assert retries == pytest.approx([10.0, 20.0, 30.0, 40.0, 45.0, 45.0])
    # A new call at the first's time finds it taken: asked back after the last turn given.
    sim.clock.advance(10.0)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=5.0, key="new")
    assert busy.value.retry_after_s == pytest.approx(45.0)
    # The first comes back a moment late: its turn is still there, and it is admitted at once.
    sim.clock.advance(1.0)
    reservation = await lane.acquire(1, max_wait_s=5.0, key="job-0")
    assert reservation.admitted_at_s == pytest.approx(sim.start + 11.0)


async def test_a_call_asked_back_does_not_count_itself_ahead_when_it_comes_back_early() -> None:
    """A call asked back at its turn that comes a little early (its job picked a moment
    before the time) waits the moment out in line, instead of counting its own promise
    ahead of itself and being refused for a turn later."""
    sim = SimTime()
    lane = sim.lane(rpm=6, burst_s=10.0)
    await lane.acquire(1, max_wait_s=0)
    with pytest.raises(LaneBusy) as first:
        await lane.acquire(1, max_wait_s=5.0, key="job-a")
    with pytest.raises(LaneBusy) as second:
        await lane.acquire(1, max_wait_s=5.0, key="job-b")
    assert (first.value.retry_after_s, second.value.retry_after_s) == pytest.approx((10.0, 20.0))
    sim.clock.advance(9.5)  # job-a, half a second early
    reservation = await lane.acquire(1, max_wait_s=5.0, key="job-a")
    assert reservation.admitted_at_s == pytest.approx(sim.start + 10.0)
    # job-b comes back early too (the clock is at 10 s, job-a's admission), too early to wait
    # it out: asked back at its own turn still, not behind a promise of its own.
    sim.clock.advance(1.0)
    with pytest.raises(LaneBusy) as again:
        await lane.acquire(1, max_wait_s=5.0, key="job-b")
    assert again.value.retry_after_s == pytest.approx(9.0)
    sim.clock.advance(9.0)
    reservation = await lane.acquire(1, max_wait_s=5.0, key="job-b")
    assert reservation.admitted_at_s == pytest.approx(sim.start + 20.0)


async def test_cancelled_waiter_leaves_the_queue_without_debit() -> None:
    """Cancelling a waiting call removes it, debits nothing and lets the next call proceed."""
    sim = GatedSleep()
    lane = sim.lane(tpm=6_000)
    await lane.acquire(300, max_wait_s=0)
    head = asyncio.create_task(lane.acquire(200, max_wait_s=math.inf))
    middle = asyncio.create_task(lane.acquire(50, max_wait_s=math.inf))
    last = asyncio.create_task(lane.acquire(100, max_wait_s=math.inf))
    await run_ready()
    assert lane.statistics().waiting == 3
    middle.cancel()
    head.cancel()
    await run_ready()
    assert head.cancelled() and middle.cancelled()
    assert lane.statistics().waiting == 1
    assert sim.gates[-1][0] == pytest.approx(1.0)  # 100 tokens, not 350
    sim.gates.pop(0)  # the cancelled head's sleep
    sim.release()
    reservation = await last
    assert reservation.admitted_at_s == pytest.approx(sim.start + 1.0)
    stats = lane.statistics()
    assert (stats.waiting, stats.admitted_total, stats.tokens_debited_total) == (0, 2, 400)


async def test_oversize_request_goes_through_on_a_full_bucket_and_leaves_debt() -> None:
    """A call bigger than the burst is admitted on a full bucket; later calls wait off the debt."""
    sim = SimTime()
    lane = sim.lane(tpm=6_000)  # burst 300
    await lane.acquire(1_000, max_wait_s=0)
    assert lane.statistics().tokens_available == -700
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(100, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(8.0)
    reservation = await lane.acquire(1_000, max_wait_s=math.inf)  # full again after 10 s
    assert reservation.admitted_at_s == pytest.approx(sim.start + 10.0)


async def test_request_larger_than_a_minute_waits_for_an_empty_window() -> None:
    """A call over the per-minute limit does not deadlock: it goes alone once the log is empty."""
    sim = SimTime()
    lane = sim.lane(tpm=6_000)
    first = await lane.acquire(100, max_wait_s=0)
    big = await lane.acquire(9_000, max_wait_s=math.inf)
    assert big.admitted_at_s == pytest.approx(first.admitted_at_s + LOG_S)


async def test_unlimited_dimension_and_build_lanes() -> None:
    """build_lanes makes one lane per config; a lane without tpm never waits on tokens."""
    sim = SimTime()
    lanes = build_lanes(
        {"a": LaneConfig("a", rpm=60), "b": LaneConfig("b", tpm=600)},
        clock=sim.clock,
        sleep=sim.sleep,
    )
    assert sorted(lanes) == ["a", "b"]
    await lanes["a"].acquire(10_000_000, max_wait_s=0)
    stats = lanes["a"].statistics()
    assert (stats.tokens_available, stats.requests_available) == (None, 2.0)
    assert lanes["b"].statistics().requests_available is None


# -- a restart: the lane seeded with the calls of the minute before ---------------------------


async def test_a_seeded_lane_admits_only_what_the_calls_before_it_left_of_the_window() -> None:
    """A restarted daemon's lane, seeded with the earlier process's calls (their wall-clock
    times and tokens), admits no more than its limits less them until each ages out of the
    window: not a fresh lane's minute on top (a lane of 120 rpm let 127 calls through one
    60 s window across a restart)."""
    sim = SimTime()
    wall = sim.clock.time()
    config = {"rpm": 6, "tpm": 6_000, "burst_s": 60.0}  # fresh: a whole minute at once
    lane = sim.lane(**config)  # type: ignore[arg-type]
    before = [(wall - 70.0, 1_000), (wall - 50.0, 1_000), (wall - 40.0, 1_000), (wall - 1.0, 2_000)]
    assert lane.seed(before) == 3  # 70 s ago is out of the window
    for _ in range(2):  # 3 requests and 4,000 tokens of the window used: 2 calls of 1,000 left
        await lane.acquire(1_000, max_wait_s=0)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1_000, max_wait_s=0, key="job")
    assert busy.value.retry_after_s == pytest.approx(LOG_S - 50.0)  # the call 50 s ago leaves
    sim.clock.advance(LOG_S - 50.0)
    await lane.acquire(1_000, max_wait_s=0, key="job")
    assert sim.slept == []
    fresh = sim.lane(**config)  # type: ignore[arg-type]
    for _ in range(6):  # what the restart let through before
        await fresh.acquire(1_000, max_wait_s=0)


async def test_a_seeded_lane_adds_no_fresh_burst_on_top_of_the_calls_before_it() -> None:
    """The bucket is what the earlier calls left of it, not full: a process that spent its
    burst half a second before it stopped leaves its successor half a second of refill."""
    sim = SimTime()
    wall = sim.clock.time()
    lane = sim.lane(rpm=600, burst_s=3.0)  # 30 at once when fresh, then 10 a second
    assert lane.seed([(wall - 0.5, 0)] * 30) == 30
    for _ in range(5):
        await lane.acquire(0, max_wait_s=0)
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(0, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(0.1)
    assert lane.statistics().admitted_total == 5  # this process's own, for the metrics


async def test_seeding_keeps_the_latest_rpm_of_the_window_and_only_on_a_lane_unused() -> None:
    """A call dated after now (the wall clock stepped back since) counts as now; of more calls
    than a window holds the latest ``rpm`` are kept, which decide the next admission alone. A
    lane seeds once, before it admits anything, and never a shared one (its log is the
    journal's)."""
    sim = SimTime()
    wall = sim.clock.time()
    lane = sim.lane(rpm=4)
    calls = [(wall - 10.0 - i, 1) for i in range(6)] + [(wall + 30.0, 1), (wall - LOG_S, 1)]
    assert lane.seed(calls) == lane.most_seeded == 4
    with pytest.raises(LaneBusy) as busy:
        await lane.acquire(1, max_wait_s=0)
    assert busy.value.retry_after_s == pytest.approx(LOG_S - 12.0)  # now, -10, -11 and -12 kept
    with pytest.raises(ValueError, match="seeded already"):
        lane.seed([])
    used = sim.lane(rpm=4)
    await used.acquire(1, max_wait_s=0)
    with pytest.raises(ValueError, match="admitted"):
        used.seed([(wall - 1.0, 1)])

    class Store:  # never asked: seeding refuses first
        pass

    shared = Lane(LaneConfig("llm", rpm=4), clock=sim.clock, store=Store())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shared"):
        shared.seed([])


@settings(max_examples=60, deadline=None, database=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 20.0),  # gap before the call, s
            st.integers(0, 6_000),  # estimate, tokens (up to a whole minute's worth)
            st.floats(0.0, 1.0),  # actual / estimate at settle time
            st.sampled_from([0.0, 2.0, math.inf]),  # max_wait_s
        ),
        min_size=1,
        max_size=60,
    ),
    restart_at=st.floats(0.0, 1.0),  # where in the steps, as a share of them
    down_s=st.floats(0.0, 90.0),
    burst_s=st.sampled_from([1.0, 3.0, 60.0]),
)
# A minute's calls at once, a restart, and another minute's at once: 40 in a window unseeded.
@example(steps=[(0.0, 100, 1.0, math.inf)] * 40, restart_at=0.5, down_s=1.0, burst_s=60.0)
def test_a_restart_at_any_moment_keeps_every_window_within_the_limits(
    steps: list[tuple[float, int, float, float]], restart_at: float, down_s: float, burst_s: float
) -> None:
    """Random traffic through a lane that a restart (``down_s`` long) replaces at any point by
    a new lane seeded with the calls before it, as the journal keeps them (wall-clock times,
    tokens used): no 60 s window of the two processes' calls together holds more than rpm
    requests or tpm tokens."""

    async def scenario() -> tuple[list[float], list[int]]:
        sim = SimTime()
        lane = sim.lane(rpm=20, tpm=6_000, burst_s=burst_s)
        times: list[float] = []
        used: list[int] = []
        for n, (gap_s, estimate, ratio, max_wait_s) in enumerate(steps):
            if n == int(restart_at * len(steps)):
                sim.clock.advance(down_s)
                lane = sim.lane(rpm=20, tpm=6_000, burst_s=burst_s)
                offset = sim.clock.time() - sim.clock.monotonic()  # the journal's wall clock
                lane.seed([(t + offset, u) for t, u in zip(times, used, strict=True)])
            sim.clock.advance(gap_s)
            try:
                reservation = await lane.acquire(estimate, max_wait_s=max_wait_s)
            except LaneBusy:
                continue
            actual = int(estimate * ratio)
            lane.settle(reservation, actual)
            times.append(reservation.admitted_at_s)
            used.append(actual)
        return times, used

    times, used = asyncio.run(scenario())
    assert max_in_any_window(times, [1] * len(times)) <= 20
    assert max_in_any_window(times, [float(u) for u in used]) <= 6_000
