"""Run configured actions the way the daemon does: a real journal, the real pool, burst mode.

``ActionKit`` loads a TOML config, builds its lanes and actions, journals events straight into a
real SQLite file and runs the worker pool in burst mode on a ``ManualClock``: a retry or a
rate-limit wait is reached by advancing the clock, never by sleeping. Lanes sleep by advancing
the same clock, after ``settle_before_nap(lanes)`` (if given) has let the requests they admitted
reach the server, so that simulated time never runs ahead of a request in flight.
Also the sample Python handlers the tests configure (``actionkit:…``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from conftest import jobs_for, new_event

import webhookd
from webhookd import actions as registry
from webhookd import config as config_mod
from webhookd.actions.base import Action, Resources
from webhookd.clock import ManualClock
from webhookd.journal import Journal, NewEvent
from webhookd.limiter import Lane, build_lanes
from webhookd.models import Job
from webhookd.workers import WorkerPool


@dataclass
class ActionKit:
    cfg: config_mod.Config
    clock: ManualClock
    journal: Journal
    pool: WorkerPool
    actions: dict[tuple[str, str], Action]
    lanes: dict[str, Lane]

    async def send(
        self,
        source: str,
        body: bytes | Any = b"{}",
        content_type: str = "application/json",
    ) -> str:
        """Journal one event for ``source`` with a job per action; returns the event id."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        event = new_event(source, self.clock.time(), data, tenant="t", content_type=content_type)
        jobs = jobs_for(self.cfg.sources[source])
        await self.journal.ingest(NewEvent(event, jobs))
        return event.id

    async def run(self) -> float | None:
        """Run what is due now; returns when the next job falls due (``None``: nothing queued)."""
        return await self.pool.run_until_idle()

    async def run_all(self, max_rounds: int = 10_000) -> int:
        """Run, advancing the clock to each next due time, until nothing is queued."""
        for rounds in range(max_rounds):
            due = await self.run()
            if due is None:
                return rounds
            self.clock.advance(max(due - self.clock.time(), 0.0))
        raise AssertionError(f"still busy after {max_rounds} rounds")

    async def job(self, event_id: str) -> Job:
        """The event's only job, with its attempts."""
        detail = await self.journal.get_event(event_id)
        (job,) = detail.jobs
        return job


@asynccontextmanager
async def action_kit(
    tmp_path: Path,
    extra: str,
    *,
    concurrency: int = 8,
    clock: ManualClock | None = None,
    settle_before_nap: Callable[[Mapping[str, Lane]], Awaitable[None]] | None = None,
) -> AsyncIterator[ActionKit]:
    """An ``ActionKit`` for ``extra`` (sources, actions, lanes in TOML)."""
    text = f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[journal]
path = "{tmp_path / "webhookd.db"}"
[workers]
concurrency = {concurrency}
{extra}
"""
    cfg = config_mod.loads(text, "test", kinds=registry.kind_defaults)
    registry.validate(cfg)
    clock = clock or ManualClock()

    async def sleep(seconds: float) -> None:
        if settle_before_nap is not None:
            await settle_before_nap(lanes)
        clock.advance(seconds)
        await asyncio.sleep(0)

    lanes = build_lanes(cfg.lanes, clock=clock, sleep=sleep)
    async with (
        Journal(cfg.journal.path, clock=clock) as journal,
        aiohttp.ClientSession() as http,
    ):
        resources = Resources(
            config=cfg, http=http, lanes=lanes, held=lambda source: source in pool.paused
        )
        actions = registry.build(resources)
        pool = WorkerPool(
            config=cfg,
            journal=journal,
            actions=actions,
            boot_id="boot_kit",
            clock=clock,
            rate_lanes=lanes,  # as the daemon's: lines' room, and a drain's hand-back
        )
        try:
            yield ActionKit(cfg, clock, journal, pool, actions, lanes)
        finally:
            await pool.drain(0)
            for action in actions.values():
                await action.aclose()


def toml_list(items: list[str]) -> str:
    """A TOML array of strings (JSON's string escapes are valid TOML)."""
    return json.dumps(items)


# -- sample handlers for the ``python`` action ------------------------------------------------


async def echo(event: webhookd.Event) -> dict[str, Any]:
    return {"id": event.id, "source": event.source, "body": event.json()}


def sync_echo(event: webhookd.Event) -> dict[str, Any]:
    return {"thread": True, "form": event.form(), "tenant": event.tenant}


async def echo_query(event: webhookd.Event) -> dict[str, str]:
    return {"query": event.query}


async def flaky(event: webhookd.Event) -> None:
    raise RuntimeError("database is locked")


async def please_retry(event: webhookd.Event) -> None:
    raise webhookd.Retry("upstream busy", after_s=120)


async def reject(event: webhookd.Event) -> None:
    raise webhookd.Reject("unknown customer")


async def hang(event: webhookd.Event) -> None:
    await asyncio.Event().wait()


def odd_result(event: webhookd.Event) -> Any:
    return {"when": time.gmtime(0), "set": {1}}


unjsonable_runs: list[str] = []  # the events unjsonable_result ran for


def huge(kind: str) -> Any:
    """A result far past the journal's bound: one long text, or a structure of many rows."""
    return "x" * 200_000 if kind == "text" else {"rows": ["y" * 100] * 2_000}


def huge_result(event: webhookd.Event) -> Any:
    return huge(event.json()["kind"])


class Detached:
    """As an ORM object read after its session closed: its str() and repr() raise."""

    def __repr__(self) -> str:
        raise RuntimeError("Instance is not bound to a Session")

    __str__ = __repr__


class DetachedError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("Instance is not bound to a Session")


def raises_detached(event: webhookd.Event) -> None:
    raise DetachedError()


def unjsonable_result(event: webhookd.Event) -> Any:
    """A result JSON cannot be made of: tuple keys, NaN (which JSON parsers refuse), an int
    past Python's 4,300 digits (also with that limit lifted), or lists nested past the
    recursion limit."""
    unjsonable_runs.append(event.id)
    kind = event.json()["kind"]
    if kind == "deep":
        deep: list[Any] = []
        inner = deep
        for _ in range(100_000):
            inner.append([])
            inner = inner[0]
        return deep
    if kind == "detached":  # an ORM object read after its session closed: its str() raises
        return {"order": Detached(), "id": 7}
    if kind == "lifted":  # the limit lifted for the whole process, as a handler may do
        sys.set_int_max_str_digits(0)
        return {"n": 10**5000, "m": [-(10**4300), 10**4300 - 1]}
    return {"keys": {(1, 2): "b"}, "nan": {"x": float("nan")}, "huge": 10**5000}[kind]
