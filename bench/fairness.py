"""``python -m bench fairness``: tenants and priority classes with one node and with two.

One node is ``webhookd serve`` on its SQLite file; two nodes are two ``serve`` processes on one
throwaway PostgreSQL (``bench/cluster.py``), both pinned to the daemon's CPU. The source,
``bench``, takes its tenant from ``X-Tenant`` and its class from ``X-Class``, and forwards each
job to a recording aiohttp target in this process, which notes the order in which jobs start.

- *tenants*: the source is paused before the nodes start; tenant A posts 10,000 webhooks
  (``--quick``: 2,000; ``--size N``), spread over the nodes, then tenant B posts 10; resume.
  Reported: how many of A's jobs started before B's last one (target: a few dozen at most,
  not 10,000); then, with A's flood running, B posts 10 more through one node: A's jobs started
  between that and B's last start. Then the flood is drained: jobs/s, and CPU per job of the
  nodes and of PostgreSQL (its postmaster and backends only).
- *classes*: 300 jobs each of high, normal and low queued, then resumed: the classes among the
  first 260 starts (8:4:1 is 160:80:20).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.cluster import ClusterBusy, Postgres, postgres, running_nodes
from bench.harness import busy_note, placed
from bench.servers import Server, cli, free_port, pause_bench, running_webhookd
from bench.table import Row, scenario_main, verdict

FLOOD = 10_000
QUICK_FLOOD = 2_000
LATE = 10
PER_CLASS = 300
FIRST = 260  # 20 rounds of 8:4:1
B_TARGET = 36  # A's jobs before B's last: "within the first few dozen"
LATE_TARGET = 48
WAIT_S = 180.0


def config(sink_url: str) -> str:
    return f"""\
[workers]
concurrency = 16
shutdown_grace_s = 1

[sources.bench]
tenant = "header:X-Tenant"
priority = {{ default = "normal", by = "header:X-Class", high = ["high"], low = ["low"] }}

[[sources.bench.actions]]
type = "forward"
url = "{sink_url}"
"""


class Sink:
    """Records the ``t`` field of each forwarded body, in arrival order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/sink"
        self.order: list[str] = []
        self.changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/sink", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.order.append(json.loads(await request.read())["t"])
        self.changed.set()
        return web.Response()

    async def until(self, check: Any, timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not check():
                self.changed.clear()
                await self.changed.wait()


async def post(urls: Sequence[str], items: Sequence[tuple[str, dict[str, str]]]) -> None:
    """POST each (t, headers) as ``{"t": t, "n": i}`` through the nodes in turn, 64 at a time."""
    gate = asyncio.Semaphore(64)
    stamp = time.time_ns()

    async def one(http: aiohttp.ClientSession, i: int, t: str, headers: dict[str, str]) -> None:
        body = json.dumps({"t": t, "n": i, "run": stamp})
        async with (
            gate,
            http.post(
                urls[i % len(urls)],
                data=body,
                headers={"Content-Type": "application/json", **headers},
            ) as r,
        ):
            if r.status != 202:
                raise RuntimeError(f"POST answered {r.status}: {await r.text()}")

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(http, i, t, h) for i, (t, h) in enumerate(items)))


def tenants_of(t: str, n: int) -> list[tuple[str, dict[str, str]]]:
    return [(t, {"X-Tenant": t})] * n


async def _tenants(servers: list[Server], sink: Sink, flood: int, pg: Postgres | None) -> Any:
    urls = [s.url for s in servers]
    config = servers[0].config
    assert config is not None
    await post(urls, tenants_of("A", flood))
    await post(urls, tenants_of("B", LATE))
    cpu_before = sum(s.cpu_s() for s in servers)
    pg_before = pg.cpu_s() if pg is not None else 0.0
    began = time.monotonic()
    await asyncio.to_thread(cli, "resume", "bench", config=config)
    await sink.until(lambda: sink.order.count("B") >= LATE)
    last_b = max(i for i, t in enumerate(sink.order) if t == "B")
    a_before = sink.order[:last_b].count("A")
    await sink.until(lambda: len(sink.order) >= min(200, flood // 4))
    await post(urls[:1], tenants_of("B", LATE))
    posted = len(sink.order)
    await sink.until(lambda: sink.order.count("B") >= 2 * LATE)
    last_b = max(i for i, t in enumerate(sink.order) if t == "B")
    a_meanwhile = sink.order[posted:last_b].count("A")
    total = flood + 2 * LATE
    await sink.until(lambda: len(sink.order) >= total)
    drain_s = time.monotonic() - began
    return {
        "flood": flood,
        "a_before_last_b": a_before,
        "a_while_late_b": a_meanwhile,
        "drain_s": drain_s,
        "jobs_per_s": total / drain_s,
        "node_cpu_ms_per_job": 1000 * (sum(s.cpu_s() for s in servers) - cpu_before) / total,
        "pg_cpu_ms_per_job": (1000 * (pg.cpu_s() - pg_before) / total if pg is not None else None),
    }


async def _classes(servers: list[Server], sink: Sink) -> Any:
    config = servers[0].config
    assert config is not None
    items = [
        (cls, {"X-Class": cls, "X-Tenant": "one"})
        for _ in range(PER_CLASS)
        for cls in ("high", "normal", "low")
    ]
    await post([s.url for s in servers], items)
    await asyncio.to_thread(cli, "resume", "bench", config=config)
    await sink.until(lambda: len(sink.order) >= FIRST)
    return dict(Counter(sink.order[:FIRST]))


@contextmanager
def _nodes(count: int, sink_url: str, cpu: int | None, pg: Postgres | None) -> Iterator[Any]:
    def pause(config: Path) -> None:
        pause_bench(config, None if pg is None else pg.url)

    if count == 1:
        with running_webhookd(config(sink_url), cpu=cpu, probe=False, before_start=pause) as s:
            yield [s]
    else:
        assert pg is not None
        with running_nodes(
            config(sink_url), nodes=count, journal_url=pg.url, cpu=cpu, before_start=pause
        ) as servers:
            yield servers


async def _database(server: Postgres, name: str) -> Postgres:
    import asyncpg

    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return Postgres(server.url.rsplit("/", 1)[0] + "/" + name, server.data_dir)


async def _part(
    part: str, servers: list[Server], sink: Sink, flood: int, db: Postgres | None
) -> Any:
    await sink.start()
    try:
        if part == "tenants":
            return await _tenants(servers, sink, flood, db)
        return await _classes(servers, sink)
    finally:
        await sink.aclose()


def _one_setup(count: int, flood: int, cpu: int | None, pg: Postgres | None) -> dict[str, Any]:
    result: dict[str, Any] = {"nodes": count}
    for part in ("tenants", "classes"):
        db = asyncio.run(_database(pg, f"bench_{part}")) if pg is not None else None
        # The sink starts on the run's own loop once the nodes are up: nothing is forwarded
        # before then, since the source is paused until the run resumes it.
        sink = Sink(free_port())
        with _nodes(count, sink.url, cpu, db) as servers:
            busy = ClusterBusy(servers, db)
            result[part] = asyncio.run(_part(part, servers, sink, flood, db))
            result[f"{part}_other_cpu_pct"] = busy.other_pct()
    return result


def measure(quick: bool = False, size: int | None = None) -> dict[str, Any]:
    flood = size or (QUICK_FLOOD if quick else FLOOD)
    with placed() as cpu:
        one = _one_setup(1, flood, cpu, None)
        with postgres() as pg:
            two = _one_setup(2, flood, cpu, pg)
    return {"one_node": one, "two_nodes": two}


def rows(result: dict[str, Any]) -> list[Row]:
    out = []
    for key, label in (("one_node", "1 node"), ("two_nodes", "2 nodes")):
        r = result[key]
        t, c = r["tenants"], r["classes"]
        out += [
            Row(
                "fairness",
                f"{label}: A's jobs started before B's 10th (A has {t['flood']:,} queued)",
                f"{t['a_before_last_b']}",
                f"≤ {B_TARGET}",
                verdict(t["a_before_last_b"] <= B_TARGET),
            ),
            Row(
                "fairness",
                f"{label}: A's jobs started while B's 10 posted mid-flood waited",
                f"{t['a_while_late_b']}",
                f"≤ {LATE_TARGET}",
                verdict(t["a_while_late_b"] <= LATE_TARGET),
            ),
            Row(
                "fairness",
                f"{label}: high:normal:low in the first {FIRST} starts",
                f"{c.get('high', 0)}:{c.get('normal', 0)}:{c.get('low', 0)}",
                "160:80:20 (8:4:1)",
                verdict(c.get("low", 0) > 0 and c.get("high", 0) > c.get("normal", 0)),
            ),
            Row(
                "fairness",
                f"{label}: drain, CPU per job (nodes; PostgreSQL)",
                f"{t['jobs_per_s']:,.0f} jobs/s; {t['node_cpu_ms_per_job']:.2f} ms"
                + (
                    f"; {t['pg_cpu_ms_per_job']:.2f} ms"
                    if t["pg_cpu_ms_per_job"] is not None
                    else ""
                ),
                "",
                "",
            ),
        ]
    return out


def notes(result: dict[str, Any]) -> list[str]:
    out = []
    for key in ("one_node", "two_nodes"):
        for part in ("tenants", "classes"):
            note = busy_note(result[key].get(f"{part}_other_cpu_pct"))
            if note:
                out.append(f"fairness ({key.replace('_', ' ')}, {part}): {note}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "fairness",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="a flood of 2,000 jobs instead of 10,000",
        size_help="tenant A's flood, in jobs",
    )


if __name__ == "__main__":
    sys.exit(main())
