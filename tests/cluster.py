"""Helpers for tests of several real ``webhookd serve`` nodes on one PostgreSQL journal.

A node's config reads its journal URL from ``WEBHOOKD_JOURNAL_URL`` (the ``journal_env`` fixture
in conftest.py sets it to the test's fresh database), so every node started on it shares that
database. ``Load`` keeps a steady stream of unique webhooks going to the nodes while a test
restarts, kills or pauses things, and records what each request was answered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from procs import DaemonProc, Procs, config_text

JSON = {"Content-Type": "application/json"}


def node_config(
    path: Path,
    body: str,
    *,
    lease_s: float = 5,
    workers: str = "",
    server: str = "",
    journal: str = "",
) -> Path:
    """A node's config: loopback port 0, the journal in PostgreSQL, info logs, plus ``body``
    (its sources and anything else) and ``journal`` lines."""
    journal = f'url = "env:WEBHOOKD_JOURNAL_URL"\nlease_s = {lease_s}\n{journal}'
    path.write_text(config_text(journal, body, workers=workers, server=server), encoding="utf-8")
    return path


def pg_config(
    path: Path,
    target_url: str,
    *,
    lease_s: float = 5,
    workers: str = "",
    server: str = "",
    action: str = "",
    journal: str = "",
) -> Path:
    """A node's config with one forward action to ``target_url`` for every source, plus
    ``action`` lines for that action."""
    body = f"""\
[sources."*"]
[[sources."*".actions]]
type = "forward"
url = "{target_url}/any"
{action}"""
    return node_config(path, body, lease_s=lease_s, workers=workers, server=server, journal=journal)


def unique_body(**fields: Any) -> str:
    """``fields`` as JSON with a nonce, so no two bodies are one delivery to the receiver."""
    return json.dumps({**fields, "nonce": uuid.uuid4().hex})


async def post(
    http: aiohttp.ClientSession, url: str, body: str, source: str = "shop"
) -> tuple[int, Any]:
    """Send one webhook; returns its status and JSON answer."""
    async with http.post(f"{url}/hooks/{source}", data=body, headers=JSON) as r:
        return r.status, await r.json()


async def post_acked(
    http: aiohttp.ClientSession, url: str, source: str, doc: dict[str, Any]
) -> str:
    """Send one webhook of ``doc`` (made unique); returns its event id once it is acknowledged."""
    async with http.post(f"{url}/hooks/{source}", data=unique_body(**doc), headers=JSON) as r:
        assert r.status == 202, await r.text()
        event_id: str = (await r.json())["id"]
        return event_id


async def serve_nodes(procs: Procs, config: Path, n: int = 2) -> list[DaemonProc]:
    """``n`` nodes on one config, started at once."""
    return list(await asyncio.gather(*(procs.serve(config) for _ in range(n))))


async def stop(*daemons: DaemonProc) -> None:
    """SIGTERM each node; each exits 0."""
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    assert [await d.wait_exit() for d in daemons] == [0] * len(daemons)


class Load:
    """``senders`` tasks posting unique webhooks until the ``async with`` block ends.

    Sender ``k``'s ``i``-th round goes to ``nodes[(k + i) % len(nodes)]`` (the list is read each
    time, so a restarted node put in its place gets the next posts) and posts one webhook to
    each of ``sources``, its body ``{"sender": k, "i": i, "src": source, "nonce": ...}``.
    Every answer's status goes to ``statuses`` and each acknowledged event id to ``acked`` and
    ``acked_by[source]``. With ``expect`` set any other answer (or no answer) fails the load;
    without it a 503 or a refused connection is backed off ``backoff_s`` and the stream goes
    on, as a provider retries. ``pause_s`` between rounds keeps the stream a trickle.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        nodes: Sequence[DaemonProc],
        *,
        senders: int,
        sources: Sequence[str] = ("shop",),
        expect: int | None = None,
        backoff_s: float = 0.05,
        pause_s: float = 0.0,
    ) -> None:
        self.http = http
        self.nodes = nodes
        self.senders = senders
        self.sources = sources
        self.expect = expect
        self.backoff_s = backoff_s
        self.pause_s = pause_s
        self.statuses: list[int] = []
        self.acked: list[str] = []
        self.acked_by: dict[str, list[str]] = {source: [] for source in sources}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _send(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            node = self.nodes[(k + i) % len(self.nodes)]
            for source in self.sources:
                body = unique_body(sender=k, i=i, src=source)
                try:
                    status, doc = await post(self.http, node.url, body, source)
                except aiohttp.ClientError:
                    if self.expect is not None:
                        raise
                    await asyncio.sleep(self.backoff_s)  # no answer is no acknowledgement
                    continue
                self.statuses.append(status)
                if self.expect is not None:
                    assert status == self.expect, (status, doc)
                if 200 <= status < 300:
                    self.acked.append(doc["id"])
                    self.acked_by[source].append(doc["id"])
                elif status == 503:
                    await asyncio.sleep(self.backoff_s)  # as a provider backs off on Retry-After
            i += 1
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def acked_at_least(self, n: int) -> bool:
        """For ``poll``: whether ``n`` webhooks have been acknowledged so far."""
        return len(self.acked) >= n

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._send(k)) for k in range(self.senders)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
