"""Scheduling: priority classes by weighted round robin, per-tenant fairness within a class,
concurrency caps per action, source and tenant, priority rules at intake, and /stats."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_config
from sched_support import Recorder, harness, ingest, intake, positions, serve_target

from webhookd import workers
from webhookd.config import Config
from webhookd.errors import ConfigError
from webhookd.journal import Ready
from webhookd.models import Priority
from webhookd.scheduler import Scheduler
from webhookd.state import IntakeState
from webhookd.stats import AdminContext, collect_stats

# -- the scheduler alone -----------------------------------------------------------------------


def _job(n: int, priority: int = 1, tenant: str = "", source: str = "s") -> Ready:
    return Ready(f"job{n}", source, "a", priority, tenant, None, n)


def test_classes_share_slots_by_their_weights_exactly() -> None:
    """With every class busy, each 13 slots go 8 high, 4 normal, 1 low (smooth WRR)."""
    s = Scheduler(capacity=3000, weights=(8, 4, 1))
    for n in range(3000):
        s.add(_job(n, priority=n % 3))
    picked = [s.pop() for _ in range(13 * 20)]
    assert Counter(j.priority for j in picked if j) == {0: 160, 1: 80, 2: 20}
    # Smooth: low gets its slot inside every window of 13, not all at the end.
    for start in range(0, len(picked), 13):
        assert sum(1 for j in picked[start : start + 13] if j and j.priority == 2) == 1


def test_a_blocked_class_is_skipped_and_banks_no_credit() -> None:
    """While high may not run, normal and low go; once unblocked, high resumes its 8:4:1 share
    at once instead of monopolising the slots to catch up."""
    s = Scheduler(capacity=3000, weights=(8, 4, 1))
    for n in range(3000):
        s.add(_job(n, priority=n % 3))
    while_blocked = [s.pop(lambda j: j.priority != 0) for _ in range(50)]
    assert all(j is not None and j.priority != 0 for j in while_blocked)
    after = [s.pop() for _ in range(13)]
    assert Counter(j.priority for j in after if j) == {0: 8, 1: 4, 2: 1}


def test_tenants_take_turns_and_a_capped_one_is_skipped() -> None:
    """Lanes of one class alternate; a lane whose jobs may not start is passed over."""
    s = Scheduler(capacity=100)
    for n in range(10):
        s.add(_job(n, tenant="a"))
    for n in range(10, 13):
        s.add(_job(n, tenant="b"))
    s.add(_job(13, tenant="c"))
    order = [s.pop() for _ in range(6)]
    assert [j.tenant for j in order if j] == ["a", "b", "c", "a", "b", "a"]
    # "a" capped: "b" still goes, nobody waits for "a".
    job = s.pop(lambda j: j.tenant != "a")
    assert job is not None and job.tenant == "b"
    assert s.pop(lambda j: j.tenant != "a") is None


def test_each_lane_and_the_window_are_bounded() -> None:
    """One tenant cannot take more than its lane's share; the window as a whole is capped."""
    s = Scheduler(capacity=10, lane_capacity=4)
    assert [s.add(_job(n, tenant="a")) for n in range(6)] == [True] * 4 + [False] * 2
    assert s.add(_job(10, tenant="b"))
    assert s.lane_room((1, "s", "a")) == 0 and s.lane_room((1, "s", "b")) == 3
    for n in range(20, 30):
        s.add(_job(n, tenant=f"t{n}"))
    assert len(s) == 10 and s.room == 0


def test_a_run_of_a_blocked_actions_jobs_does_not_hide_the_lanes_other_jobs() -> None:
    """A tenant's model calls (their lane's line full) queued ahead of its forwards: a pop
    passes over the blocked action's jobs without asking about each, and takes a forward;
    jobs with an order key are each asked about, and a lane with none free is blocked."""
    s = Scheduler(capacity=100)
    calls = [Ready(f"call{n}", "s", "model", 1, "t", None, n) for n in range(30)]
    forwards = [Ready(f"fwd{n}", "s", "deliver", 1, "t", None, 30 + n) for n in range(3)]
    for job in (*calls, *forwards):
        s.add(job)
    asked: list[str] = []

    def no_model(job: Ready) -> bool:
        asked.append(job.id)
        return job.action != "model"

    assert [j.id for j in iter(lambda: s.pop(no_model), None)] == ["fwd0", "fwd1", "fwd2"]
    assert asked.count("call0") == 4 and "call1" not in asked  # one ask per pop for the run
    ordered = Scheduler(capacity=100)
    for n in range(20):
        ordered.add(Ready(f"k{n}", "s", "model", 1, "t", f"key{n}", n))
    ordered.add(Ready("fwd", "s", "deliver", 1, "t", None, 20))
    assert ordered.pop(lambda j: j.action != "model") is None  # 9 keys asked, none free
    assert ordered.is_blocked((1, "s", "t"), lambda j: j.action != "model")


def test_a_blocked_lane_is_found_and_cut_back_to_its_oldest_jobs() -> None:
    """A lane none of whose first jobs may start is blocked (one with a job past them that
    could is too: a pop never looks that far); trimming keeps its oldest jobs, frees their
    room, and a job dropped can be taken again, behind the ones kept."""
    s = Scheduler(capacity=40)
    for n in range(20):
        s.add(_job(n, tenant="a"))
    for n in range(20, 25):
        s.add(_job(n, tenant="b"))
    capped_a = lambda j: j.tenant != "a" or j.id == "job19"  # noqa: E731
    assert s.blocked(capped_a) == [(1, "s", "a")]
    assert s.blocked(capped_a, above=20) == []
    assert s.is_blocked((1, "s", "a"), capped_a) and not s.is_blocked((1, "s", "b"), capped_a)
    assert not s.is_blocked((1, "s", "nobody"), capped_a)
    assert s.trim((1, "s", "a"), 4) == 16
    assert s.lanes() == {(1, "s", "a"): 4, (1, "s", "b"): 5} and s.room == 31
    assert "job4" not in s and s.add(_job(4, tenant="a"))
    assert s.trim((1, "s", "b"), 0) == 5 and (1, "s", "b") not in s.lanes()
    assert [j.id for j in iter(s.pop, None)] == ["job0", "job1", "job2", "job3", "job4"]


# -- the pool over a real journal --------------------------------------------------------------

LOG_SOURCE = """
[sources.shop]
tenant = "json:tenant"
{more}
[[sources.shop.actions]]
type = "log"
"""


def _log_config(tmp_path: Path, more: str = "", pool: str = "concurrency = 4") -> Config:
    return make_config(tmp_path, LOG_SOURCE.format(more=more), workers=pool)


async def test_a_small_tenant_is_not_stuck_behind_a_big_backlog(tmp_path: Path) -> None:
    """Tenant A has 10,000 queued, tenant B then sends 10: all of B's jobs start within the
    first few dozen job slots, whether A's jobs reached the window live or from the journal."""
    cfg = _log_config(tmp_path)
    recorder = Recorder()
    async with harness(tmp_path, cfg, {("shop", "log"): recorder}) as h:
        pool = h.pool()
        h.journal.on_commit = pool.notify  # as the daemon wires it: live jobs enter the window
        await ingest(h.journal, cfg, "shop", 10_000, tenant="A")
        await ingest(h.journal, cfg, "shop", 10, tenant="B")

        def stop_when_b_done(_: object) -> None:
            if sum(1 for e in recorder.started if e.tenant == "B") == 10:
                pool.stop()

        recorder.on_start = stop_when_b_done
        await pool.run_until_idle()
    slots = positions(recorder.started, lambda e: e.tenant == "B")
    assert len(slots) == 10
    assert max(slots) < 36, slots


async def test_a_fresh_pool_refills_fairly_from_a_journal_backlog(tmp_path: Path) -> None:
    """A pool started on a journal already holding A's 10,000 and B's 10 serves B early."""
    cfg = _log_config(tmp_path)
    recorder = Recorder()
    async with harness(tmp_path, cfg, {("shop", "log"): recorder}) as h:
        await ingest(h.journal, cfg, "shop", 10_000, tenant="A")
        await ingest(h.journal, cfg, "shop", 10, tenant="B")
        pool = h.pool()
        recorder.on_start = lambda _: (
            pool.stop() if sum(e.tenant == "B" for e in recorder.started) == 10 else None
        )
        await pool.run_until_idle()
    slots = positions(recorder.started, lambda e: e.tenant == "B")
    assert len(slots) == 10 and max(slots) < 36, slots


@pytest.mark.parametrize(("weights", "slots"), [((8, 4, 1), 130), ((3, 2, 1), 60)])
async def test_low_priority_progresses_under_steady_high_load(
    tmp_path: Path, weights: tuple[int, int, int], slots: int
) -> None:
    """With all three classes queued, the first slots go at the configured ratio ± 2."""
    high, normal, low = weights
    cfg = make_config(
        tmp_path,
        LOG_SOURCE.format(more=""),
        workers=f"concurrency = 1\n[workers.weights]\nhigh = {high}\nnormal = {normal}\n"
        f"low = {low}",
    )
    recorder = Recorder()
    async with harness(tmp_path, cfg, {("shop", "log"): recorder}) as h:
        for priority in Priority:
            await ingest(h.journal, cfg, "shop", slots, tenant="t", priority=priority)
        pool = h.pool()
        recorder.on_start = lambda _: pool.stop() if len(recorder.started) >= slots else None
        await pool.run_until_idle()
    seen = Counter(e.priority for e in recorder.started[:slots])
    rounds = slots // sum(weights)
    for priority, weight in zip(Priority, weights, strict=True):
        assert abs(seen[priority] - weight * rounds) <= 2, (seen, weights)
    assert seen[Priority.LOW] >= rounds - 2  # low is never starved


# -- caps, observed by a real target -----------------------------------------------------------

CAPS = """
[sources.deploys]
{deploys}
[[sources.deploys.actions]]
type = "forward"
name = "deploy"
url = "{url}/deploys/deploy"
concurrency = 1
[[sources.deploys.actions]]
type = "forward"
name = "notify"
url = "{url}/deploys/notify"
concurrency = 3

[sources.free]
[[sources.free.actions]]
type = "forward"
url = "{url}/free"
"""


async def test_action_caps_are_never_exceeded(tmp_path: Path) -> None:
    """``concurrency = 1`` serialises an action and ``= 3`` allows three, while the pool has
    room for more; the target never sees more in flight, and does see the caps reached."""
    async with serve_target() as target:
        cfg = make_config(
            tmp_path, CAPS.format(url=target.url, deploys=""), workers="concurrency = 8"
        )
        target.hold_until = 4  # 1 deploy + 3 notify at once
        async with harness(tmp_path, cfg) as h:
            await ingest(h.journal, cfg, "deploys", 30)
            await h.drain(h.pool())
    assert len(target.delivered("/deploys/deploy")) == 30
    assert len(target.delivered("/deploys/notify")) == 30
    assert target.peak["/deploys/deploy"] == 1
    assert target.peak["/deploys/notify"] == 3


async def test_a_source_cap_bounds_its_jobs_without_holding_up_other_sources(
    tmp_path: Path,
) -> None:
    """A source with ``concurrency = 2`` never has more than two jobs in flight; another
    source uses the rest of the pool meanwhile."""
    async with serve_target() as target:
        cfg = make_config(
            tmp_path,
            CAPS.format(url=target.url, deploys="concurrency = 2"),
            workers="concurrency = 8",
        )
        target.hold_until = 8  # 2 of the capped source + 6 of the free one
        async with harness(tmp_path, cfg) as h:
            await ingest(h.journal, cfg, "deploys", 20)
            await ingest(h.journal, cfg, "free", 40)
            await h.drain(h.pool())
    assert len(target.delivered()) == 20 * 2 + 40
    assert target.peak["/deploys"] == 2
    assert target.peak["*"] == 8


async def test_a_tenant_cap_skips_the_capped_tenant_instead_of_waiting(tmp_path: Path) -> None:
    """``tenant_concurrency = 2``: no tenant ever has more than two jobs in flight, and the pool
    fills its other slots with other tenants' jobs (six in flight with three tenants)."""
    async with serve_target() as target:
        cfg = make_config(
            tmp_path,
            f"""
[sources.shop]
tenant = "json:tenant"
tenant_concurrency = 2
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/shop"
""",
            workers="concurrency = 8",
        )
        target.hold_until = 6
        async with harness(tmp_path, cfg) as h:
            await ingest(h.journal, cfg, "shop", 60, tenant="big")
            await ingest(h.journal, cfg, "shop", 10, tenant="mid")
            await ingest(h.journal, cfg, "shop", 5, tenant="small")
            await h.drain(h.pool())
    assert len(target.delivered()) == 75
    for tenant in ("big", "mid", "small"):
        assert target.peak[f"tenant:{tenant}"] == 2, target.peak
    assert target.peak["*"] == 6


def test_tenant_concurrency_is_validated(tmp_path: Path) -> None:
    """A zero or non-integer ``tenant_concurrency`` is a config error naming the key."""
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, "[sources.x]\ntenant_concurrency = 0\n")
    assert err.value.key == "sources.x.tenant_concurrency"


# -- intake: priority rules land in the journal ------------------------------------------------

RULES = """
[sources.shop]
tenant = "header:X-Shop"
priority = { default = "normal", high = ["vip"], low = ["free"] }
[[sources.shop.actions]]
type = "log"

[sources.billing]
priority = { default = "low", by = "json:type", high = ["invoice.payment_failed"] }
[[sources.billing.actions]]
type = "log"

[sources.sms]
priority = { by = "form:Plan", high = ["gold"], low = ["trial"] }
[[sources.sms.actions]]
type = "log"

[sources.ci]
priority = "high"
[[sources.ci.actions]]
type = "log"
"""


@pytest.mark.parametrize(
    ("path", "body", "headers", "expected"),
    [
        ("/hooks/shop", b"{}", {"X-Shop": "vip"}, "high"),
        ("/hooks/shop", b"{}", {"X-Shop": "free"}, "low"),
        ("/hooks/shop", b"{}", {"X-Shop": "someone"}, "normal"),
        ("/hooks/billing", b'{"type": "invoice.payment_failed"}', {}, "high"),
        ("/hooks/billing", b'{"type": "customer.updated"}', {}, "low"),
        ("/hooks/sms", b"Plan=gold&Body=hi", {}, "high"),
        ("/hooks/sms", b"Plan=trial&Body=hi", {}, "low"),
        ("/hooks/ci", b"{}", {}, "high"),
    ],
)
async def test_priority_rules_classify_at_intake(
    tmp_path: Path, path: str, body: bytes, headers: dict[str, str], expected: str
) -> None:
    """A tenant, a JSON field, a form field or the source default sets the class, and the
    class is what the journal stores for the event and hands the scheduler for its job."""
    cfg = make_config(tmp_path, RULES)
    async with harness(tmp_path, cfg, {}) as h:
        async with intake(h) as http, http.post(path, data=body, headers=headers) as r:
            assert r.status == 202
            event_id = (await r.json())["id"]
        detail = await h.journal.get_event(event_id)
        assert detail.as_dict()["priority"] == expected
        ready = await h.journal.ready(h.clock.time(), 10)
        assert [Priority(j.priority).label for j in ready] == [expected]


# -- /stats ------------------------------------------------------------------------------------


async def test_stats_show_each_class_and_tenant(tmp_path: Path) -> None:
    """/stats reports, per class and per tenant, the queued count, the running count and the
    age of the oldest queued event."""
    cfg = _log_config(tmp_path, pool="concurrency = 1")
    recorder = Recorder()
    recorder.hold = asyncio.Event()
    async with harness(tmp_path, cfg, {("shop", "log"): recorder}) as h:
        await ingest(h.journal, cfg, "shop", 5, tenant="acme", priority=Priority.HIGH)
        h.clock.advance(30)
        await ingest(h.journal, cfg, "shop", 3, tenant="zeta", priority=Priority.LOW)
        h.clock.advance(10)
        pool = h.pool()
        started = asyncio.Event()
        recorder.on_start = lambda _: started.set()
        run = asyncio.create_task(pool.run_until_idle())
        await asyncio.wait_for(started.wait(), 30)
        ctx = AdminContext(cfg, h.journal, pool, IntakeState(), "boot", h.clock.time())
        stats = await collect_stats(ctx)
        recorder.hold.set()
        await run
    classes = {c["priority"]: c for c in stats["scheduler"]}
    high, low = classes["high"], classes["low"]
    assert (high["queued"], high["running"], high["weight"]) == (4, 1, 8)
    assert high["oldest_age_s"] == 40.0
    assert [(t["tenant"], t["queued"], t["running"]) for t in high["tenants"]] == [("acme", 4, 1)]
    assert (low["queued"], low["running"], low["oldest_age_s"]) == (3, 0, 10.0)
    assert low["tenants"][0]["tenant"] == "zeta"
    assert classes["normal"]["queued"] == 0 and classes["normal"]["tenants"] == []


async def test_lanes_beyond_one_refill_are_visited_in_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more tenants than a refill looks at, a cursor walks on through the journal's lanes,
    so the last tenant starts while the others are still busy, not after they drain (which,
    walking from the first lane each time, would be slot 180 of 200)."""
    monkeypatch.setattr(workers, "MAX_LANES_PER_REFILL", 3)
    cfg = _log_config(tmp_path, pool="concurrency = 2")
    recorder = Recorder()
    async with harness(tmp_path, cfg, {("shop", "log"): recorder}) as h:
        for n in range(10):
            await ingest(h.journal, cfg, "shop", 20, tenant=f"t{n}")
        await h.drain(h.pool())
    assert len(recorder.started) == 200
    firsts = {e.tenant: i for i, e in reversed(list(enumerate(recorder.started)))}
    assert len(firsts) == 10 and max(firsts.values()) < 120, firsts
