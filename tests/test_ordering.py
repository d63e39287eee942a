"""Ordered delivery per key: ``ordered_by`` computed at intake, and jobs of one (source, action,
key) delivered one at a time in arrival order, across retries, dead letters and restarts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from conftest import make_config
from sched_support import DeliveryTarget, harness, ingest, intake, serve_target

from webhookd.config import Config
from webhookd.journal import Finished
from webhookd.models import JobState, new_boot_id

ORDERED = """
[sources.orders]
tenant = "json:shop"
[[sources.orders.actions]]
type = "forward"
url = "{url}/orders"
ordered_by = "json:order.id"
retry = {{ max_attempts = {attempts}, base_s = 10, factor = 2, cap_s = 100 }}
"""


def _config(tmp_path: Path, target: DeliveryTarget, attempts: int = 5) -> Config:
    return make_config(
        tmp_path, ORDERED.format(url=target.url, attempts=attempts), workers="concurrency = 8"
    )


def _body(key: str, n: int, shop: str = "s1") -> dict[str, Any]:
    return {"id": f"{key}-{n}", "order": {"id": key}, "shop": shop, "n": n}


async def _post(http: aiohttp.ClientSession, bodies: Sequence[dict[str, Any]]) -> None:
    """POST each body in turn: the arrival order is the list's order."""
    for body in bodies:
        async with http.post("/hooks/orders", data=json.dumps(body)) as r:
            assert r.status == 202, await r.text()


def _sequence(target: DeliveryTarget, key: str) -> list[tuple[int, int]]:
    """(n, status) of every delivery attempt of ``key``, in arrival order."""
    return [(d.body["n"], d.status) for d in target.deliveries if d.body["order"]["id"] == key]


def _index(target: DeliveryTarget, event: str, status: int = 200) -> int:
    return next(
        i for i, d in enumerate(target.deliveries) if d.body["id"] == event and d.status == status
    )


async def test_same_key_jobs_arrive_one_at_a_time_in_order(tmp_path: Path) -> None:
    """Five keys × six events posted interleaved: each key's events arrive in posting order,
    never two of a key in flight at once, while different keys are delivered side by side."""
    async with serve_target() as target:
        target.hold_until = 5  # the five heads at once
        cfg = _config(tmp_path, target)
        async with harness(tmp_path, cfg) as h:
            async with intake(h) as http:
                await _post(http, [_body(f"k{k}", n) for n in range(6) for k in range(5)])
            await h.drain(h.pool())
    for k in range(5):
        assert _sequence(target, f"k{k}") == [(n, 200) for n in range(6)]
        assert target.peak[f"order:k{k}"] == 1
    assert target.peak["*"] == 5


async def test_a_retrying_job_holds_back_only_its_own_key(tmp_path: Path) -> None:
    """The first event of k0 fails twice then succeeds: k0's later events (including one
    that arrives while it waits) wait for it, and k1's events are delivered meanwhile."""
    async with serve_target() as target:
        target.fail["k0-0"] = 2
        cfg = _config(tmp_path, target)
        async with harness(tmp_path, cfg) as h:
            pool = h.pool()
            h.journal.on_commit = pool.notify  # live intake feeds the window, as in the daemon
            async with intake(h) as http:
                await _post(http, [_body(k, n) for n in range(4) for k in ("k0", "k1")])
                due = await pool.run_until_idle()
                assert due is not None  # k0-0 waits for its retry
                await _post(http, [_body("k0", 4), _body("k1", 4)])
                await pool.run_until_idle()
            await h.drain(pool)
    assert _sequence(target, "k0") == [(0, 500), (0, 500), (0, 200), (1, 200), (2, 200),
                                       (3, 200), (4, 200)]  # fmt: skip
    assert _sequence(target, "k1") == [(n, 200) for n in range(5)]
    assert _index(target, "k1-4") < _index(target, "k0-0")


async def test_a_dead_job_releases_its_key(tmp_path: Path) -> None:
    """When the first event of a key is dead-lettered, the later ones of that key go on."""
    async with serve_target() as target:
        target.fail["k0-0"] = 10
        cfg = _config(tmp_path, target, attempts=2)
        async with harness(tmp_path, cfg) as h:
            async with intake(h) as http:
                await _post(http, [_body("k0", n) for n in range(3)])
            await h.drain(h.pool())
            dead = await h.journal.event_ids_with_jobs("dead")
    assert _sequence(target, "k0") == [(0, 500), (0, 500), (1, 200), (2, 200)]
    assert len(dead) == 1


async def test_order_holds_across_a_restart(tmp_path: Path) -> None:
    """A key's head left running by a crashed boot, and another key's head waiting for a
    retry: a new pool with a new boot id on the same journal file still delivers in order."""
    async with serve_target() as target:
        target.fail["k1-0"] = 1
        cfg = _config(tmp_path, target)
        async with harness(tmp_path, cfg) as h:
            async with intake(h) as http:
                await _post(http, [_body(k, n) for n in range(3) for k in ("k0", "k1")])
            # Boot A: k0's head is claimed and the process dies during the attempt …
            heads = await h.journal.ready(h.clock.time(), 10)
            k0_head = next(j for j in heads if j.order_key == "k0")
            await h.journal.claim([k0_head.id], "boot_crashed")
            # … after another pool of it ran k1's head once (it failed: retry pending). That
            # pool is never drained or stopped: it is simply gone, as with kill -9.
            first = h.pool("boot_crashed")
            await first.run_until_idle()
            assert _sequence(target, "k1") == [(0, 500)] and _sequence(target, "k0") == []
        async with harness(tmp_path, cfg) as h:  # the same file, a fresh Journal and clock
            boot = new_boot_id()
            recovered = await h.journal.recover(boot, cfg.workers.max_recoveries)
            assert recovered.requeued == 1
            await h.drain(h.pool(boot))
    assert _sequence(target, "k0") == [(n, 200) for n in range(3)]
    assert _sequence(target, "k1") == [(0, 500)] + [(n, 200) for n in range(3)]


async def test_the_journal_offers_only_the_head_of_each_key(tmp_path: Path) -> None:
    """``ready`` returns the oldest unfinished job per (source, action, key), so the rule
    holds for any pool reading the journal; unordered jobs and other actions are unaffected;
    a dead job releases its key, and takes it back when replayed."""
    cfg = make_config(
        tmp_path,
        """
[sources.orders]
[[sources.orders.actions]]
type = "log"
name = "log"
ordered_by = "json:k"
[[sources.orders.actions]]
type = "log"
name = "audit"
ordered_by = "json:k"
""",
    )
    async with harness(tmp_path, cfg, {}) as h:
        # Events 0-2 carry key "a", event 3 none; each event has a log and an audit job.
        await ingest(h.journal, cfg, "orders", 4, order_key=lambda i: "a" if i < 3 else None)
        now = h.clock.time()

        async def ready() -> dict[tuple[str, int], str]:
            """(action, event number) → job id of the jobs that may start now."""
            return {(j.action, (j.seq - 1) // 2): j.id for j in await h.journal.ready(now, 100)}

        first = await ready()
        assert set(first) == {("log", 0), ("audit", 0), ("log", 3), ("audit", 3)}
        await h.journal.claim([first[("log", 0)]], "boot")
        assert set(await ready()) == {("audit", 0), ("log", 3), ("audit", 3)}
        await h.journal.finish([_finished(first[("log", 0)], now, JobState.DONE)])
        second = await ready()
        assert ("log", 1) in second and ("log", 2) not in second
        await h.journal.claim([second[("log", 1)]], "boot")
        await h.journal.finish([_finished(second[("log", 1)], now, JobState.DEAD)])
        assert ("log", 2) in await ready()  # a dead job does not hold its key
        # Replayed, the dead job is the oldest unfinished of its key again: it goes first.
        await h.journal.replay(await h.journal.event_ids_with_jobs("dead"))
        third = await ready()
        assert ("log", 1) in third and ("log", 2) not in third


def _finished(job_id: str, now: float, state: JobState) -> Finished:
    return Finished(job_id, 1, state, now, now, str(state))


async def test_a_replayed_older_job_waits_while_a_newer_one_of_its_key_runs(
    tmp_path: Path,
) -> None:
    """The head of a key dies, the next one starts; replaying the dead one while the next runs
    must not start it beside it (a running job holds its key whatever its age): it goes when
    the running one is done."""
    cfg = make_config(
        tmp_path,
        '[sources.orders]\n[[sources.orders.actions]]\ntype = "log"\nname = "log"\n'
        'ordered_by = "json:k"\n',
    )
    async with harness(tmp_path, cfg, {}) as h:
        await ingest(h.journal, cfg, "orders", 2, order_key=lambda i: "a")
        now = h.clock.time()
        [older] = await h.journal.ready(now, 10)
        await h.journal.claim([older.id], "boot")
        await h.journal.finish([_finished(older.id, now, JobState.DEAD)])
        [newer] = await h.journal.ready(now, 10)
        assert [c.job.id for c in await h.journal.claim([newer.id], "boot")] == [newer.id]
        await h.journal.replay(await h.journal.event_ids_with_jobs("dead"))
        assert await h.journal.ready(now, 10) == []
        assert await h.journal.claim([older.id], "boot") == []
        await h.journal.finish([_finished(newer.id, now, JobState.DONE)])
        assert [j.id for j in await h.journal.ready(now, 10)] == [older.id]
