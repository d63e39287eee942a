"""The worker pool through a seeded random mix of what a busy daemon meets: bursts of webhooks
for sources with caps, an ordered one and the catch-all's many names, attempts that succeed,
fail, raise, wait, time out (into slow mode and out of it) or hold until let go, cancels and
replays, pauses, reloads between two configs, a journal that refuses claims and outcomes now
and then or fails a commit, and a drain. Whenever the pool is idle it counts nothing as
running, and every job due that may start does start: no lane is left stuck."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import jobs_for, make_config, new_event
from sched_support import leftover_counts, until

from webhookd.actions.base import Action, Outcome
from webhookd.clock import ManualClock
from webhookd.config import Config
from webhookd.config.sections import ActionConfig
from webhookd.errors import JournalUnavailable, Reject, Retry
from webhookd.journal import Journal, NewEvent
from webhookd.models import Event, Job, JobState, Priority, new_boot_id
from webhookd.workers import WorkerPool

WORKERS = """concurrency = 4
window = 24
slow_after_timeouts = 2
"""
# Held attempts wait to be let go (``go``) or cut off by timeout_s, whichever comes first.
RETRY = "retry = { max_attempts = 3, base_s = 1, factor = 2, cap_s = 4 }\ntimeout_s = 0.1"
CATCH_ALL_RETRY = RETRY.replace("0.1", "0.05")
# Config A: the catch-all uncapped, a source capped per tenant with an action capped too, an
# ordered source. Config B: the catch-all's action capped, one of its names a source of its
# own, the capped source's caps changed and one action gone, the ordered source gone.
CONFIG_A = f"""
[sources."*"]
[[sources."*".actions]]
type = "log"
name = "a"
{CATCH_ALL_RETRY}
[sources.capped]
concurrency = 2
tenant_concurrency = 1
[[sources.capped.actions]]
type = "log"
name = "x"
{RETRY}
[[sources.capped.actions]]
type = "log"
name = "y"
concurrency = 1
{RETRY}
[sources.ordered]
[[sources.ordered.actions]]
type = "log"
name = "o"
ordered_by = "json:k"
{RETRY}
"""
CONFIG_B = f"""
[sources."*"]
[[sources."*".actions]]
type = "log"
name = "a"
concurrency = 2
{CATCH_ALL_RETRY}
[sources.foo]
[[sources.foo.actions]]
type = "log"
name = "a"
{RETRY}
[sources.capped]
concurrency = 3
tenant_concurrency = 2
[[sources.capped.actions]]
type = "log"
name = "x"
{RETRY}
"""
# What an attempt does, by its number (the last step repeats): the scripts events carry.
STEPS = ["done", "done", "done", "retry", "dead", "raise", "wait", "hold", "timeout"]
NAMES = ["foo", "bar", "baz", "qux"]  # the names senders choose for the catch-all
TENANTS = ["", "t1", "t2"]
SOURCES = ["*", "*", "*", "capped", "capped", "ordered"]


class Scripted:
    """An action that does what its event's body says for each attempt (``{"do": [...]}``):
    ``hold`` waits until ``go`` is set, ``timeout`` until its ``timeout_s`` cuts it off, and
    ``wait`` (which uses no attempt) waits once per job, then goes on as ``done``."""

    def __init__(self, config: ActionConfig, go: asyncio.Event, waited: set[str]) -> None:
        self.config = config
        self.go = go
        self.waited = waited

    async def run(self, event: Event, job: Job) -> Outcome:
        steps = json.loads(event.body)["do"]
        step = steps[min(job.attempts, len(steps)) - 1]
        if step == "retry":
            raise Retry("not yet")
        if step == "dead":
            raise Reject("never")
        if step == "raise":
            raise RuntimeError("a bug")
        if step == "wait" and job.id not in self.waited:
            self.waited.add(job.id)
            return Outcome.wait("cooling down", after_s=1.5)
        if step == "hold":
            await self.go.wait()
        if step == "timeout":
            await asyncio.Event().wait()
        return Outcome.done()

    async def aclose(self) -> None:
        return None


@dataclass
class Flaky:
    """Claims and outcomes the journal refuses now and then, as in an outage."""

    rng: random.Random
    on: bool = False
    refused: int = 0

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        async def flaky(*args: Any) -> Any:
            if self.on and self.rng.random() < 0.25:
                self.refused += 1
                raise JournalUnavailable("journal write failed: disk I/O error")
            return await method(*args)

        return flaky

    def late(self, journal: Journal, meanwhile: Callable[[], None]) -> Callable[..., Any]:
        """The journal's writer, whose commits the loop now and then gets to only a few
        milliseconds after they are on disk (a busy loop), ``meanwhile`` called in between (a
        sweep falling then): reads see them before the commit's waiters and its announcement
        do."""
        in_thread = journal._in_thread

        async def late(fn: Callable[..., Any], *args: Any) -> Any:
            result = await in_thread(fn, *args)
            if fn == journal._write_batch and self.rng.random() < 0.3:
                meanwhile()
                await asyncio.sleep(0.003)
            return result

        return late


@dataclass
class Run:
    """The test's side: its configs and actions, the events it sent, and how it makes more."""

    rng: random.Random
    journal: Journal
    clock: ManualClock
    go: asyncio.Event = field(default_factory=asyncio.Event)
    configs: dict[str, Config] = field(default_factory=dict)
    actions: dict[tuple[str, str], Action] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    waited: set[str] = field(default_factory=set)

    def build(self, name: str) -> tuple[Config, Mapping[tuple[str, str], Action]]:
        """Config ``name``'s actions: those of the same name kept, as a reload keeps them."""
        cfg = self.configs[name]
        built = {}
        for src in cfg.sources.values():
            for action in src.actions:
                key = (src.name, action.name)
                if key not in self.actions:
                    self.actions[key] = Scripted(action, self.go, self.waited)
                built[key] = self.actions[key]
        return cfg, built

    def item(self, cfg: Config) -> NewEvent:
        source = self.rng.choice(SOURCES)
        name = self.rng.choice(NAMES) if source == "*" else source
        steps = self.rng.choices(STEPS, k=self.rng.randint(1, 3))
        order = self.rng.choice(["k1", "k2", "k3"]) if source == "ordered" else None
        body = json.dumps({"do": steps, "k": order}).encode()
        event = new_event(
            name,
            self.clock.time(),
            body,
            tenant=self.rng.choice(TENANTS),
            priority=self.rng.choice(list(Priority)),
        )
        src = cfg.source_for(name)
        assert src is not None
        return NewEvent(event, jobs_for(src, order))

    async def ingest(self, items: list[NewEvent]) -> None:
        """One group commit (most of the time) of ``items``; a refused one is not kept."""
        done = await asyncio.gather(
            *(self.journal.ingest(i) for i in items), return_exceptions=True
        )
        for item, result in zip(items, done, strict=True):
            if not isinstance(result, BaseException):
                self.events.append(item.event.id)
            elif not isinstance(result, JournalUnavailable):
                raise result


def idle(pool: WorkerPool) -> bool:
    """Nothing running, being claimed or written claimed."""
    return not (pool._running or pool._reserved or pool._claiming.locked())


async def due_that_may_start(journal: Journal, paused: frozenset[str]) -> list[str]:
    """The journal's queued jobs due now that their order key lets start, of sources not
    paused."""
    lanes = [lane for lane in await journal.queued_lanes(None, 10_000) if lane[1] not in paused]
    ready = await journal.ready_in_lanes(journal.clock.time(), [(lane, 10_000) for lane in lanes])
    return [job.id for job in ready]


async def quiesce(pool: WorkerPool, journal: Journal, timeout_s: float = 8.0) -> None:
    """Until the pool is idle with no job due that may start (poked as a sweep would); then
    it must count nothing as running."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if idle(pool) and not await due_that_may_start(journal, pool.paused) and idle(pool):
            break
        if asyncio.get_running_loop().time() > deadline:
            stuck = await due_that_may_start(journal, pool.paused)
            raise AssertionError(
                f"jobs due that may start never started: {len(stuck)}, running"
                f" {len(pool._running)}, counted as running: {leftover_counts(pool)}"
                if idle(pool)
                else f"jobs never ended: {list(pool._running)}"
            )
        # A sweep's turn, shortened: no event says "every due job has started" (only a read
        # of the journal does), so the pool is poked and looked at again, up to the deadline.
        pool.poke()
        await asyncio.sleep(0.005)
    assert leftover_counts(pool) == {}


async def test_a_random_mix_of_everything_leaves_no_running_count_and_no_lane_stuck(
    tmp_path: Path,
) -> None:
    """Random interleavings of ingests, outcomes of every kind, slow mode, cancels, replays,
    pauses, reloads, refused claims and outcomes, a failed commit and a drain: an idle pool
    always counts nothing as running, and every due job that may start starts."""
    rng = random.Random(20261206)
    clock = ManualClock()
    configs = {
        name: make_config(tmp_path, text, workers=WORKERS)
        for name, text in (("A", CONFIG_A), ("B", CONFIG_B))
    }
    flaky = Flaky(random.Random(7))
    async with Journal(configs["A"].journal.path, clock=clock) as journal:
        run = Run(rng, journal, clock, configs=configs)
        cfg, actions = run.build("A")
        pool = WorkerPool(
            config=cfg,
            journal=journal,
            actions=actions,
            boot_id=new_boot_id(),
            clock=clock,
            rng=random.Random(3).random,  # its own: the steps stay those of the seed
        )
        journal.on_commit = pool.notify
        journal.starter = pool
        journal.on_pause_change = pool.pause_changed
        journal.claim = flaky.wrap(journal.claim)  # type: ignore[method-assign]
        journal.claim_capped = flaky.wrap(journal.claim_capped)  # type: ignore[method-assign]
        journal.finish = flaky.wrap(journal.finish)  # type: ignore[method-assign]
        journal._in_thread = flaky.late(journal, pool.poke)  # type: ignore[method-assign]
        dispatcher = asyncio.create_task(pool.run())
        current, paused = "A", set()
        slow_seen = idle_checks = 0
        for step in range(100):
            op = rng.choices(
                [
                    *("ingest", "burst", "timeouts", "cancel", "replay", "pause", "reload"),
                    *("go", "time", "flaky"),
                ],
                weights=[30, 6, 3, 8, 6, 5, 4, 12, 10, 4],
            )[0]
            if op == "ingest":
                await run.ingest([run.item(cfg) for _ in range(rng.randint(1, 4))])
            elif op == "burst":
                items = [run.item(cfg) for _ in range(rng.randint(8, 24))]
                if rng.random() < 0.3:  # a value no journal stores: the rest go in alone
                    bad = items[0]
                    items[0] = NewEvent(
                        new_event("foo", clock.time(), b'{"do": ["done"]}', tenant="\udcff"),
                        bad.jobs,
                    )
                await run.ingest(items)
            elif op == "timeouts":  # a downstream that stops answering: slow mode
                name = rng.choice(NAMES)
                src = cfg.source_for(name)
                assert src is not None
                body = b'{"do": ["timeout", "timeout", "done"]}'
                await run.ingest(
                    [NewEvent(new_event(name, clock.time(), body), jobs_for(src)) for _ in "abcd"]
                )
            elif op == "cancel" and run.events:
                await journal.cancel(rng.sample(run.events, min(3, len(run.events))))
            elif op == "replay" and run.events:
                await journal.replay(rng.sample(run.events, min(3, len(run.events))))
                pool.poke()
            elif op == "pause":
                source = rng.choice(["foo", "bar", "capped", "ordered"])
                if source in paused:
                    paused.discard(source)
                    await journal.resume(source)
                else:
                    paused.add(source)
                    await journal.pause(source)
                await pool.pause_applied()
            elif op == "reload":
                current = "B" if current == "A" else "A"
                cfg, actions = run.build(current)
                pool.reconfigure(cfg, actions)
            elif op == "go":
                run.go.set()  # the held attempts return
                await asyncio.sleep(0)
                run.go = asyncio.Event()
                for action in run.actions.values():
                    assert isinstance(action, Scripted)
                    action.go = run.go
            elif op == "time":
                clock.advance(rng.uniform(0.5, 5.0))  # retries and waits fall due
                pool.poke()
            elif op == "flaky":
                flaky.on = not flaky.on
            await asyncio.sleep(0)
            slow_seen += bool(pool.slow)
            if idle(pool):
                idle_checks += 1
                assert leftover_counts(pool) == {}, f"step {step}: {op}"
            if step % 25 == 24:  # let everything due run, then look
                flaky.on = False
                run.go.set()
                await quiesce(pool, journal)

        # The end: everything goes, every job reaches its end.
        flaky.on = False
        run.go.set()
        for source in paused:
            await journal.resume(source)
        await pool.pause_applied()
        for _ in range(500):  # a retry, or the next job of an order key, each time
            await quiesce(pool, journal)
            due = await journal.next_run_at(pool.paused, after=clock.time())
            if due is None:
                break
            clock.advance(due - clock.time())
        else:
            raise AssertionError("jobs still queued after 500 rounds")

        states = {
            job.id: job.state
            for event_id in run.events
            for job in (await journal.get_event(event_id)).jobs
        }
        assert set(states.values()) <= {JobState.DONE, JobState.DEAD, JobState.CANCELLED}

        # A drain with attempts held: cut off, re-queued, and nothing left counted; the next
        # start runs them.
        run.go = asyncio.Event()
        for action in run.actions.values():
            assert isinstance(action, Scripted)
            action.go = run.go
        pool.slow.clear()
        held = [
            NewEvent(
                new_event("bar", clock.time(), b'{"do": ["hold", "done"]}'),
                jobs_for(cfg.sources["*"]),
            )
            for _ in range(6)
        ]
        await run.ingest(held)
        await until(lambda: len(pool._running) >= 2)
        assert await pool.drain(0.0) >= 2
        await dispatcher
        assert leftover_counts(pool) == {}
        after = WorkerPool(
            config=cfg, journal=journal, actions=actions, boot_id=new_boot_id(), clock=clock
        )
        run.go.set()
        assert await after.run_until_idle() is None
        assert leftover_counts(after) == {}
        for item in held:
            assert [j.state for j in (await journal.get_event(item.event.id)).jobs] == ["done"]
        # What was exercised, so that a change that stops it shows.
        assert (flaky.refused > 0, slow_seen > 0, idle_checks > 0) == (True, True, True)
