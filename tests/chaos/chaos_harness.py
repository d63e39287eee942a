"""The chaos harness: signed webhooks under continuous load, ``kill -9`` at random moments.

A sender posts GitHub-signed webhooks (each with its own ``X-GitHub-Delivery`` id) from several
connections at once and, like a provider, sends every delivery again until it gets a 2xx. A
killer waits for a random number of fresh acknowledgements, then ``kill -9``s the daemon and
starts it again on the same journal. A recording target counts what the daemon forwards.

Afterwards :func:`check` holds the run to the delivery guarantees (every acknowledged webhook
journaled once and forwarded, nothing journaled that was not sent, a repeat only for a job a
kill interrupted) and returns the counts.
Used by ``tests/chaos/test_chaos.py`` (a few rounds) and ``python -m bench chaos`` (hundreds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import signal
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from procs import DaemonProc, Procs, Target, get_json, poll, write_config

SECRET = "chaos-secret"


@dataclass
class Delivery:
    """One webhook as the provider sees it: sent until acknowledged."""

    delivery_id: str
    body: bytes
    event_id: str | None = None  # from the first 2xx
    ids_seen: set[str] = field(default_factory=set)  # every id any 2xx named (must be one)
    refused: int = 0  # non-2xx answers and connection errors before the ack


@dataclass
class Report:
    rounds: int
    sent: int
    acked: int
    refused: int
    delivered: int
    duplicates: int
    journaled: int

    def line(self) -> str:
        return (
            f"chaos: kills={self.rounds} deliveries={self.sent} acked={self.acked} "
            f"refused_then_retried={self.refused} journaled={self.journaled} "
            f"delivered={self.delivered} duplicates={self.duplicates} lost=0"
        )


def config(tmp: Path, target_url: str) -> Path:
    return write_config(
        tmp / "webhookd.toml",
        tmp / "webhookd.db",
        f"""
[sources.gh]
verify = {{ scheme = "github", secret = "{SECRET}" }}
[[sources.gh.actions]]
type = "forward"
url = "{target_url}/gh"
retry = {{ max_attempts = 50, base_s = 0.05, factor = 1.5, cap_s = 0.5 }}
""",
        # The kills come from outside and often, so a job may be running at several of them:
        # lift the poison-pill limit, which is for jobs that crash the daemon themselves.
        workers="shutdown_grace_s = 5\nmax_recoveries = 1000",
    )


def _signed(d: Delivery) -> dict[str, str]:
    mac = hmac.new(SECRET.encode(), d.body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": d.delivery_id,
        "X-Hub-Signature-256": f"sha256={mac}",
    }


class Chaos:
    def __init__(self, procs: Procs, cfg: Path, *, deliveries: int, connections: int = 16):
        self.procs, self.cfg = procs, cfg
        nonce = uuid.uuid4().hex
        self.todo: asyncio.Queue[Delivery] = asyncio.Queue()
        self.deliveries = [
            Delivery(str(uuid.uuid4()), json.dumps({"n": i, "nonce": nonce}).encode())
            for i in range(deliveries)
        ]
        for d in self.deliveries:
            self.todo.put_nowait(d)
        self.connections = connections
        self.daemon: DaemonProc | None = None
        self.up = asyncio.Event()
        self.acked = 0
        self.ack_moved = asyncio.Event()

    async def _send(self, http: aiohttp.ClientSession) -> None:
        while True:
            d = await self.todo.get()
            await self.up.wait()
            assert self.daemon is not None
            try:
                async with http.post(
                    f"{self.daemon.url}/hooks/gh", data=d.body, headers=_signed(d)
                ) as r:
                    doc = await r.json(content_type=None)
                    ok = 200 <= r.status < 300
            except (aiohttp.ClientError, ValueError, TimeoutError):
                ok = False
            if ok:
                d.ids_seen.add(doc["id"])
                if d.event_id is None:
                    d.event_id = doc["id"]
                    self.acked += 1
                    self.ack_moved.set()
            else:
                d.refused += 1
                self.todo.put_nowait(d)  # the provider retries it
            self.todo.task_done()

    async def run(self, rounds: int, rng: random.Random) -> int:
        """Send everything, killing the daemon ``rounds`` times along the way."""
        self.daemon = await self.procs.serve(self.cfg)
        self.up.set()
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.connections, force_close=True)
        kills = 0
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            senders = [asyncio.create_task(self._send(http)) for _ in range(self.connections)]
            try:
                per_round = max(len(self.deliveries) // (rounds + 1), 1)
                for _ in range(rounds):
                    goal = self.acked + rng.randint(1, per_round)
                    while self.acked < goal and self.acked < len(self.deliveries):
                        self.ack_moved.clear()
                        await self.ack_moved.wait()
                    if self.acked >= len(self.deliveries):
                        break
                    self.up.clear()
                    self.daemon.signal(signal.SIGKILL)
                    assert await self.daemon.wait_exit() == -signal.SIGKILL
                    kills += 1
                    self.daemon = await self.procs.serve(self.cfg)
                    self.up.set()
                await self.todo.join()
            finally:
                for task in senders:
                    task.cancel()
                for task in senders:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return kills

    async def settle(self, target: Target) -> None:
        """Wait for every acknowledged webhook to be forwarded, then stop the daemon cleanly."""
        assert self.daemon is not None
        acked = {d.event_id for d in self.deliveries}
        await target.wait_for(lambda: acked <= set(target.ids), timeout_s=60)
        admin = self.daemon.admin_url
        async with aiohttp.ClientSession() as http:

            async def idle() -> bool:
                status, stats = await get_json(http, f"{admin}/stats")
                jobs: dict[str, int] = stats["jobs"] if stats else {}  # type: ignore[assignment]
                return status == 200 and jobs["queued"] + jobs["running"] == 0

            await poll(idle, timeout_s=30, interval_s=0.05)
        self.daemon.signal(signal.SIGTERM)
        assert await self.daemon.wait_exit() == 0

    def check(self, journal: Path, target: Target, kills: int) -> Report:
        """Hold the run to the guarantees; returns the counts."""
        with contextlib.closing(sqlite3.connect(journal)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows = db.execute("SELECT id, dedup_key, body FROM events").fetchall()
            states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        by_delivery = {d.delivery_id: d for d in self.deliveries}
        journaled: dict[str, str] = {}
        for event_id, dedup_key, body in rows:
            delivery_id = dedup_key.split(":", 2)[-1]
            d = by_delivery.get(delivery_id)
            assert d is not None, f"journal holds {event_id} ({dedup_key}), which nobody sent"
            assert bytes(body) == d.body
            assert delivery_id not in journaled, f"delivery {delivery_id} journaled twice"
            journaled[delivery_id] = event_id
        for d in self.deliveries:
            assert d.event_id is not None, "a delivery was never acknowledged"
            assert d.ids_seen == {d.event_id}, f"one delivery, several ids: {d.ids_seen}"
            # Anything journaled was acknowledged in the end (the provider's retry found it).
            assert journaled.get(d.delivery_id) == d.event_id, "acknowledged but not journaled"
        assert states == {"done": len(journaled)}, states
        delivered = set(target.ids)
        assert set(journaled.values()) == delivered, "a journaled event was not forwarded"
        by_event = {d.event_id: d.body for d in self.deliveries}
        for arrival in target.arrivals:
            assert arrival.body == by_event[arrival.event_id]
        duplicates = len(target.arrivals) - len(delivered)
        # A repeat is only allowed for a job that was running when a kill landed: at most the
        # pool's concurrency (32 by default) per kill.
        assert duplicates <= kills * 32, duplicates
        return Report(
            rounds=kills,
            sent=len(self.deliveries),
            acked=sum(1 for d in self.deliveries if d.event_id),
            refused=sum(d.refused for d in self.deliveries),
            delivered=len(delivered),
            duplicates=duplicates,
            journaled=len(journaled),
        )


async def chaos(tmp: Path, *, rounds: int, deliveries: int, seed: int) -> Report:
    """One whole chaos run in ``tmp``; raises AssertionError when a guarantee breaks."""
    target = Target()
    await target.start()
    procs = Procs()
    try:
        cfg = config(tmp, target.url)
        run = Chaos(procs, cfg, deliveries=deliveries)
        kills = await run.run(rounds, random.Random(seed))
        await run.settle(target)
        return run.check(tmp / "webhookd.db", target, kills)
    finally:
        await procs.aclose()
        await target.aclose()
