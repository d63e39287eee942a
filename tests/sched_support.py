"""Shared parts of the scheduling tests: a recording action, a delivery target that records
arrival order and peak concurrency, batch ingest through the journal, and a pool harness."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import jobs_for, new_event, serving
from procs import poll

from webhookd import actions as action_registry
from webhookd.actions.base import Action, Outcome, Resources
from webhookd.clock import ManualClock
from webhookd.config import Config
from webhookd.journal import Journal, NewEvent
from webhookd.models import Event, Job, Priority, new_boot_id
from webhookd.receiver import Receiver
from webhookd.state import IntakeState
from webhookd.workers import SATURATED_RECHECK_S, WorkerPool

BATCH = 500


class Recorder:
    """A python-level action: records each event as it starts; optionally waits on ``hold``."""

    def __init__(self, on_start: Callable[[Event], None] | None = None) -> None:
        self.started: list[Event] = []
        self.hold: asyncio.Event | None = None
        self.on_start = on_start

    async def run(self, event: Event, job: Job) -> Outcome:
        self.started.append(event)
        if self.on_start is not None:
            self.on_start(event)
        if self.hold is not None:
            await self.hold.wait()
        return Outcome.done()

    async def aclose(self) -> None:
        return None


async def ingest(
    journal: Journal,
    config: Config,
    source: str,
    count: int,
    *,
    tenant: str = "",
    priority: Priority = Priority.NORMAL,
    body: Callable[[int], Mapping[str, Any]] = lambda i: {"n": i},
    order_key: Callable[[int], str | None] = lambda i: None,
) -> None:
    """Journal ``count`` events of ``source`` through the journal's API, ``BATCH`` per commit."""
    src = config.source_for(source)
    assert src is not None
    for start in range(0, count, BATCH):
        items = []
        for i in range(start, min(start + BATCH, count)):
            raw = json.dumps({"tenant": tenant, **body(i)}).encode()
            event = new_event(source, journal.clock.time(), raw, tenant=tenant, priority=priority)
            jobs = jobs_for(src, order_key(i))
            items.append(NewEvent(event, jobs))
        await asyncio.gather(*(journal.ingest(item) for item in items))


@dataclass
class Delivery:
    path: str
    body: dict[str, Any]
    status: int


@dataclass
class DeliveryTarget:
    """A real aiohttp server: records each delivery in arrival order, the peak number of
    requests in flight per path, per first path segment, per tenant (``"tenant:NAME"``), per
    order key (``"order:KEY"``) and in all (``"*"``), and fails chosen ones.

    ``fail[id]`` answers 500 that many times to the delivery whose body has ``"id": id``.
    The first requests are held until ``hold_until`` are in flight at once (waiting at most
    ``hold_timeout_s``), so a cap that allows that many is certainly reached.
    """

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    running: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    hold_until: int = 0
    hold_timeout_s: float = 20.0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        group = "/" + request.path.strip("/").split("/")[0]
        keys = {"*", request.path, group, f"tenant:{body.get('tenant', '')}"}
        if isinstance(body.get("order"), dict):
            keys.add(f"order:{body['order'].get('id')}")
        for key in keys:
            self.running[key] += 1
            self.peak[key] = max(self.peak[key], self.running[key])
        try:
            if self.running["*"] >= self.hold_until:
                self._released.set()
            if not self._released.is_set():
                try:
                    async with asyncio.timeout(self.hold_timeout_s):
                        await self._released.wait()
                except TimeoutError:
                    self._released.set()
            status = 200
            if self.fail.get(body.get("id", ""), 0) > 0:
                self.fail[body["id"]] -= 1
                status = 500
            self.deliveries.append(Delivery(request.path, body, status))
            return web.Response(status=status)
        finally:
            for key in keys:
                self.running[key] -= 1

    def delivered(self, path: str | None = None) -> list[dict[str, Any]]:
        """Bodies answered 2xx, in arrival order."""
        return [
            d.body for d in self.deliveries if d.status == 200 and (path is None or d.path == path)
        ]


@asynccontextmanager
async def serve_target() -> AsyncIterator[DeliveryTarget]:
    t = DeliveryTarget()
    app = web.Application()
    app.router.add_post("/{tail:.*}", t.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        t.url = str(server.make_url("")).rstrip("/")
        try:
            yield t
        finally:
            t._released.set()  # let held requests end before the server closes


@dataclass
class Harness:
    """A real journal on a manual clock, and a way to make worker pools on it."""

    config: Config
    journal: Journal
    clock: ManualClock
    actions: Mapping[tuple[str, str], Action]

    def pool(self, boot_id: str | None = None) -> WorkerPool:
        return WorkerPool(
            config=self.config,
            journal=self.journal,
            actions=self.actions,
            boot_id=boot_id or new_boot_id(),
            clock=self.clock,
            rng=lambda: 0.0,  # the shortest backoff, so a test knows when a retry falls due
        )

    async def drain(self, pool: WorkerPool, max_rounds: int = 50) -> None:
        """Run until nothing is queued, moving the clock to each retry as it falls due."""
        for _ in range(max_rounds):
            due = await pool.run_until_idle()
            if due is None:
                return
            self.clock.advance(max(due - self.clock.time(), 0.0))
        raise AssertionError(f"still busy after {max_rounds} rounds")


@asynccontextmanager
async def harness(
    tmp_path: Path,
    config: Config,
    actions: Mapping[tuple[str, str], Action] | None = None,
    db: str = "journal.db",
) -> AsyncIterator[Harness]:
    """Open a journal on a manual clock; build the configured actions unless given."""
    clock = ManualClock()
    async with Journal(tmp_path / db, clock=clock) as journal, aiohttp.ClientSession() as http:
        built: Mapping[tuple[str, str], Action] = (
            actions
            if actions is not None
            else action_registry.build(Resources(config=config, http=http))
        )
        try:
            yield Harness(config, journal, clock, built)
        finally:
            if actions is None:
                for action in built.values():
                    await action.aclose()


@asynccontextmanager
async def intake(h: Harness) -> AsyncIterator[aiohttp.ClientSession]:
    """The real receiver on loopback in front of the harness's journal; a client for it."""
    receiver = Receiver(h.config, h.journal, IntakeState(), clock=h.clock)
    async with (
        serving(receiver) as address,
        aiohttp.ClientSession(base_url=f"http://{address}") as http,
    ):
        yield http


def positions(events: Sequence[Event], predicate: Callable[[Event], bool]) -> list[int]:
    """Where (0-based start slots) the events matching ``predicate`` started."""
    return [i for i, e in enumerate(events) if predicate(e)]


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """``procs.poll`` of a check of this process's state, asked every few milliseconds."""

    async def holds() -> bool:
        return check()

    await poll(holds, timeout_s=timeout_s, interval_s=0.005)


def leftover_counts(pool: WorkerPool) -> dict[str, object]:
    """What an idle pool (no job running, being claimed or written claimed) still counts as
    running: every count its caps and lanes are judged by, by name, those not empty. Each
    is a job's until the job ends; one left once all have ended stays for good, and a cap
    (or slow mode's limit of one) it reaches lets none of its jobs start again."""
    assert not pool._running, "not idle: a job's task runs"
    counts: dict[str, object] = {
        "running_by_action": pool.admission._running_by_action,
        "running_by_source": pool.admission._running_by_source,
        "running_by_tenant": pool.admission._running_by_tenant,
        "running_by_lane": pool.admission._running_by_lane,
        "counted_as": pool.admission.counted_as,
        "held_caps": pool._held_caps,
        "acting": pool._acting,
        "reserved": pool._reserved,
        "claiming_jobs": pool._claiming_jobs,
        "to_lane": pool._to_lane,
        "to_lane_count": pool._to_lane_count,
        "attempting": pool._attempting,
        "attempts_on": pool._attempts_on,
        "attempts_of": pool._attempts_of,
        "handed_back": pool._handed_back,
        "cut_kept": pool._cut_kept,
        # A cap found full is looked at again within SATURATED_RECHECK_S, never later.
        "saturated_for_good": {
            key: until
            for key, until in pool._saturated.items()
            if until > pool.clock.monotonic() + SATURATED_RECHECK_S
        },
    }
    return {name: value for name, value in counts.items() if value}
