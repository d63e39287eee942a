"""Helpers for the operating tests (CLI, admin, metrics, dashboard): config snippets and waits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner, Result
from conftest import Running, make_config, new_event
from procs import poll

from webhookd import config as config_mod
from webhookd.actions.base import Outcome
from webhookd.cli import main
from webhookd.journal import Claimed, Finished, Journal, NewEvent, NewJob
from webhookd.models import new_job_id

TOKEN_ENV = "WEBHOOKD_TEST_ADMIN_TOKEN"


# A second action for the source "shop": a forward to a port nothing listens on, dead at its
# first attempt, beside forward_source's "deliver", which succeeds.
DOWN_ACTION = """
[[sources.shop.actions]]
type = "forward"
name = "down"
url = "http://127.0.0.1:9/down"
retry = { max_attempts = 1 }
"""


def forward_source(
    name: str,
    url: str,
    *,
    max_attempts: int = 1,
    base_s: float = 0.01,
    verify: str = "",
    tenant: str = "",
) -> str:
    """A source that forwards to ``url``; one attempt by default, so a 500 goes dead at once."""
    return f"""
[sources.{name}]
{f"verify = {verify}" if verify else ""}
{f'tenant = "{tenant}"' if tenant else ""}
[[sources.{name}.actions]]
type = "forward"
name = "deliver"
url = "{url}"
retry = {{ max_attempts = {max_attempts}, base_s = {base_s}, factor = 1.0, cap_s = {base_s} }}
"""


def write_config(tmp_path: Path, body: str, *, token: bool = False) -> tuple[Path, Any]:
    """The same config as a file (for the CLI) and parsed (for an in-process daemon)."""
    admin = f'token = "env:{TOKEN_ENV}"' if token else ""
    cfg = make_config(tmp_path, body, admin=admin)
    text = f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
{admin}
[journal]
path = "{cfg.journal.path}"
{body}
"""
    path = tmp_path / "webhookd.toml"
    path.write_text(text, encoding="utf-8")
    return path, cfg


async def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run a CLI command in a thread (it runs its own event loop), beside a running daemon."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, list(args), env=env)


async def event_state(
    http: aiohttp.ClientSession,
    admin_url: str,
    event_id: str,
    state: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 20,
) -> dict[str, Any]:
    """Ask the admin API until the event is in ``state``; returns its document."""
    doc: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal doc
        async with http.get(f"{admin_url}/events/{event_id}", headers=headers) as r:
            doc = await r.json()
        return doc.get("state") == state

    await poll(reached, timeout_s=timeout_s)
    return doc


async def accepted(running: Running, source: str, body: str = '{"n": 1}') -> str:
    """POST a webhook and return the event id it was given (fails unless answered 202)."""
    status, doc = await running.post(f"/hooks/{source}", body)
    assert status == 202, doc
    event_id: str = doc["id"]
    return event_id


def secret_config(
    tmp_path: Path, extra: str, monkeypatch: Any, value: str
) -> Callable[[], config_mod.Config]:
    """A config whose admin token is ``env:`` + a variable holding ``value``."""
    monkeypatch.setenv(TOKEN_ENV, value)
    return lambda: make_config(tmp_path, extra, admin=f'token = "env:{TOKEN_ENV}"')


async def ingest(
    journal: Journal, source: str, n: int, body: bytes = b"{}", order_key: str | None = None
) -> list[str]:
    """Journal ``n`` events of ``source`` with one job each (of ``order_key``, if given), as one
    group commit; job ids."""
    items = []
    for _ in range(n):
        event = new_event(source, journal.clock.time(), body)
        job = NewJob(new_job_id(), "deliver", "forward", 3, order_key)
        items.append(NewEvent(event, (job,)))
    await asyncio.gather(*(journal.ingest(item) for item in items))
    return [item.jobs[0].id for item in items]


class Outcomes:
    """What each event's jobs came to, woken by the pool's ``on_finish``: the state its last
    finished job reached, and how many of its jobs have finished."""

    def __init__(self, running: Running) -> None:
        self.state: dict[str, str] = {}
        self.done: dict[str, int] = {}
        self.changed = asyncio.Event()
        assert running.daemon.pool is not None
        running.daemon.pool.on_finish.append(self._on_finish)

    def _on_finish(self, claimed: Claimed, outcome: Outcome, finished: Finished) -> None:
        self.state[claimed.event.id] = str(finished.state)
        self.done[claimed.event.id] = self.done.get(claimed.event.id, 0) + 1
        self.changed.set()

    async def _until(self, reached: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not reached():
                self.changed.clear()
                await self.changed.wait()

    async def wait(self, event_id: str, state: str, timeout_s: float = 15) -> None:
        """Until the event's last finished job is in ``state``."""
        await self._until(lambda: self.state.get(event_id) == state, timeout_s)

    async def wait_finished(self, event_id: str, jobs: int, timeout_s: float = 20) -> None:
        """Until ``jobs`` of the event's jobs have finished an attempt."""
        await self._until(lambda: self.done.get(event_id, 0) >= jobs, timeout_s)


@contextlib.asynccontextmanager
async def writer_held(journal: Any) -> AsyncIterator[None]:
    """The journal's writer held on its thread, as a stalled disk holds it: everything queued
    behind waits until the block ends."""
    entered, go = threading.Event(), threading.Event()

    def hang(conn: Any) -> None:
        entered.set()
        go.wait(30)

    hung = asyncio.ensure_future(journal._call(hang, transaction=False))
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        yield
    finally:
        go.set()
        await hung
