"""Limits that must hold across the cluster: real ``webhookd serve`` nodes on one PostgreSQL.

An action's ``concurrency``, per-key order (``ordered_by``) and a source's pause are promises
about the whole cluster, not about one process: a sink on loopback records what each request
overlapped with and in which order they came, whichever node sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cluster import Load, pg_config, post_acked, serve_nodes, stop
from procs import DaemonProc, Procs, Target, settled_event

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("journal_env"),
]


@dataclass
class Seen:
    event_id: str
    doc: dict[str, Any]
    at: float
    status: int = 0


@dataclass
class Sink(Target):
    """A loopback target recording each request (event id, body, arrival time, answer) and the
    most requests it ever had in flight at once. Each request is held ``hold_s``; the first
    attempt of an event whose body says ``"fail_once": true`` answers 500; an event whose body
    says ``"hang": true`` is held until ``release`` is set."""

    hold_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            doc = json.loads(await request.read())
            event_id = request.headers.get("webhook-id", "")
            first = all(s.event_id != event_id for s in self.seen)
            seen = Seen(event_id, doc, time.time())
            self.seen.append(seen)
            self.changed.set()
            if doc.get("hang"):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 60)
            elif self.hold_s:
                await asyncio.sleep(self.hold_s)  # the target's own work, while others overlap
            seen.status = 500 if doc.get("fail_once") and first else 200
            return web.Response(status=seen.status)
        finally:
            self.in_flight -= 1
            self.changed.set()

    def delivered(self) -> set[str]:
        return {s.event_id for s in self.seen if s.status == 200}

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Until ``predicate()`` holds, woken by each arrival and answer."""
        await super().wait_for(predicate, timeout_s)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as s:
        yield s


def cluster_config(
    path: Path, sink_url: str, *, action: str = "", workers: str = "", lease_s: float = 5
) -> Path:
    """Every node's config: loopback port 0, the journal in PostgreSQL, one forward action with
    quick retries for every source, plus ``action`` lines."""
    retry = "retry = { max_attempts = 10, base_s = 0.05, factor = 1, cap_s = 0.1 }"
    return pg_config(path, sink_url, lease_s=lease_s, workers=workers, action=f"{retry}\n{action}")


async def test_concurrency_1_holds_across_two_nodes(
    tmp_path: Path,
    procs: Procs,
    sink: Sink,
    http: aiohttp.ClientSession,
) -> None:
    """An action with ``concurrency = 1`` fed through two nodes: the target never sees two of
    its requests at once, and every job is done on its first attempt (a job that waited for
    the cluster's slot did not use one)."""
    cfg = cluster_config(tmp_path / "webhookd.toml", sink.url, action="concurrency = 1")
    a, b = await serve_nodes(procs, cfg)
    sink.hold_s = 0.03
    ids = await asyncio.gather(
        *(post_acked(http, (a, b)[i % 2].url, "deploy", {"i": i}) for i in range(24))
    )
    await sink.wait_for(lambda: set(ids) <= sink.delivered() and sink.in_flight == 0)
    assert sink.max_in_flight == 1
    assert sorted(s.event_id for s in sink.seen) == sorted(ids)  # each once
    for event_id in ids[:4]:  # the target's answer comes before the node records the outcome
        doc = await settled_event(http, a.admin_url, event_id)
        assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]
    await stop(a, b)  # a drain ends only once every outcome is recorded (and logged)
    done_on = [d.log.count("outcome=done") for d in (a, b)]
    assert sum(done_on) == len(ids)


def arrival_order_holds(seen: list[Seen]) -> dict[str, list[int]]:
    """Each key's arrivals as event numbers; a retry repeats a number, never goes back."""
    by_key: dict[str, list[int]] = {}
    for s in seen:
        by_key.setdefault(s.doc["key"], []).append(s.doc["n"])
    return by_key


async def test_ordered_by_holds_across_nodes_with_retries_and_a_killed_node(
    tmp_path: Path,
    procs: Procs,
    sink: Sink,
    http: aiohttp.ClientSession,
) -> None:
    """Jobs of one ``ordered_by`` key reach the target in arrival order whichever of two nodes
    runs them, through failed first attempts and a ``kill -9`` of the node holding a key's
    job: the key waits for that job's lease to be recovered, then goes on in order."""
    cfg = cluster_config(
        tmp_path / "webhookd.toml", sink.url, action='ordered_by = "json:key"', lease_s=2
    )
    sink.hold_s = 0.01
    doomed = await procs.serve(cfg)
    keys = ["k1", "k2", "k3"]
    per_key = 12
    hung = ("k1", 4)
    ids: list[str] = []

    async def send(daemons: list[DaemonProc], ns: range) -> None:
        for n in ns:
            for k, key in enumerate(keys):
                doc = {"key": key, "n": n, "fail_once": (n + k) % 3 == 0, "hang": (key, n) == hung}
                ids.append(await post_acked(http, daemons[(n + k) % len(daemons)].url, "shop", doc))

    await send([doomed], range(0, 6))  # the first half through the node that will die
    await sink.wait_for(lambda: any(s.doc["hang"] for s in sink.seen))
    survivor = await procs.serve(cfg)
    await send([doomed, survivor], range(6, per_key))
    await sink.wait_for(lambda: len(sink.delivered()) >= 20)
    await doomed.kill9()
    sink.release.set()  # the doomed node's request is gone with it; a re-run is not held
    await sink.wait_for(lambda: set(ids) <= sink.delivered())
    by_key = arrival_order_holds(sink.seen)
    for key in keys:
        assert by_key[key] == sorted(by_key[key]), (key, by_key[key])
        assert set(by_key[key]) == set(range(per_key))
    assert by_key["k1"].count(hung[1]) == 2  # the hung job ran again once its lease was recovered
    await survivor.wait_said(r"re-queued \d+ job\(s\) of silent node")
    await stop(survivor)


async def test_pause_holds_a_sources_jobs_on_every_node_within_a_second(
    tmp_path: Path,
    procs: Procs,
    sink: Sink,
    http: aiohttp.ClientSession,
) -> None:
    """``webhookd pause shop`` while webhooks flow through two nodes: within a second neither
    node starts a job of ``shop`` (other sources go on), and ``resume`` delivers what waited."""
    # The fallback sweep is half a minute away: only a prompt signal can stop the jobs in time.
    cfg = cluster_config(tmp_path / "webhookd.toml", sink.url, workers="sweep_interval_s = 30")
    a, b = await serve_nodes(procs, cfg)
    await asyncio.gather(a.wait_said("listening on"), b.wait_said("listening on"))
    sink.hold_s = 0.01
    # A steady trickle to both sources, not a flood the machine cannot take; each one taken.
    async with Load(
        http, [a, b], senders=2, sources=("shop", "other"), expect=202, pause_s=0.01
    ) as load:
        await sink.wait_for(lambda: sum(s.doc["src"] == "shop" for s in sink.seen) >= 10)
        out = await procs.cli("pause", "shop", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        paused_at = time.time()
        # The nodes keep delivering the other source well past the second the pause may take.
        await sink.wait_for(
            lambda: any(s.doc["src"] == "other" and s.at > paused_at + 2.5 for s in sink.seen)
        )
    shop, other = load.acked_by["shop"], load.acked_by["other"]
    late = [s for s in sink.seen if s.doc["src"] == "shop" and s.at > paused_at + 1.0]
    assert late == []
    held = set(shop) - sink.delivered()
    assert held  # webhooks kept coming in while paused: they wait
    out = await procs.cli("resume", "shop", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    await sink.wait_for(lambda: set(shop) | set(other) <= sink.delivered(), timeout_s=20)
    await stop(a, b)
